//! A small, defensive GGUF (v2 and v3) reader, and a writer used by tests and fuzz seeds.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata count `u64`, the metadata
//! key/value pairs, the tensor table (name, `u32` rank, `u64` dims with the fastest-varying first, `u32` ggml type,
//! `u64` offset), padding to `general.alignment` (default 32), then the tensor data, each tensor at its offset
//! from the start of the data section.
//!
//! Every count, length and offset is checked against the bytes that remain before anything is allocated, so a
//! truncated or hostile file gives [`ModelError::Gguf`] rather than a panic, an out-of-bounds read or a huge
//! allocation.
//! A parsed value can take far more memory than its bytes in the file (one `u8` array element is a whole
//! [`Value`]), so the header is also charged, before each allocation, what it will take in memory, against a budget
//! of [`MAX_MEMORY_PER_FILE_BYTE`] times the file's length.

use std::collections::BTreeMap;
use std::path::Path;

use crate::quant::{dequantize, GgmlType};
use crate::{ModelError, Result};

/// The four magic bytes at the start of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's maximum tensor rank.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files use one level).
pub const MAX_ARRAY_DEPTH: usize = 3;
/// Default alignment of the data section and of each tensor.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// The parsed header may take at most this many bytes of memory per byte of the file.
///
/// Each metadata entry and array element is a [`Value`] (32 bytes on 64-bit targets) plus a string's bytes, while
/// the file may spend 1 byte on it: a file of `u8` arrays would otherwise ask for 32 times its size.
/// The densest arrays of real files, `i32` token types and `f32` scores, take 4 bytes in the file and one `Value`
/// in memory, 8 times as much; SmolLM2's whole metadata (vocabulary and merges) takes 3.1 times its bytes, so even
/// a vocabulary-only file (no tensors) fits.
/// What is charged: every key and string (length plus a `String`), every metadata entry and array element (a
/// `Value`), and every tensor entry (a [`TensorInfo`], its dimensions, and its name twice: the table and the check
/// for duplicates); the maps' own nodes are not, and add a few hundred bytes.
pub const MAX_MEMORY_PER_FILE_BYTE: usize = 8;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions with the fastest-varying first (ggml's `ne`): a `[out][in]` weight has `dims = [in, out]`.
    pub dims: Vec<usize>,
    /// The ggml type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    /// Total elements (product of `dims`, checked for overflow).
    pub n_elements: usize,
}

impl TensorInfo {
    /// Dimensions slowest-varying first, as row-major shapes are usually written (`[out, in]` for a weight).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF header: metadata and tensor table, with every tensor's extent checked against the file size.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Start of the data section in the file.
    pub data_offset: usize,
    /// Length of the whole file the header was parsed from.
    pub file_len: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    /// Bytes of memory the header may still take (see [`MAX_MEMORY_PER_FILE_BYTE`]).
    budget: usize,
}

impl<'a> Reader<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(ModelError::Gguf { offset: self.pos, msg: msg.into() })
    }

    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return self.err(format!("truncated: {what} needs {n} bytes, {} remain", self.remaining()));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A `u64` count of items each at least `min_item` bytes long, bounded by the bytes that remain.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item.max(1)) as u64;
        if n > max {
            return self
                .err(format!("{what} is {n}, but only {} bytes remain (at most {max} items fit)", self.remaining()));
        }
        Ok(n as usize)
    }

    /// Charges `bytes` of memory about to be allocated for `what` against the budget.
    fn charge(&mut self, bytes: usize, what: &str) -> Result<()> {
        if bytes > self.budget {
            let limit = MAX_MEMORY_PER_FILE_BYTE.saturating_mul(self.b.len());
            return self.err(format!(
                "{what} would take {bytes} bytes of memory, more than the {} bytes left of the header's limit of \
                 {limit} ({MAX_MEMORY_PER_FILE_BYTE} per byte of this {}-byte file)",
                self.budget,
                self.b.len()
            ));
        }
        self.budget -= bytes;
        Ok(())
    }

    /// A string; charged its length plus a `String`.
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        self.charge(n.saturating_add(std::mem::size_of::<String>()), what)?;
        let s = self.take(n, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    /// The smallest encoding of a value of type `ty` (used to bound array lengths before allocating).
    fn min_size(ty: u32) -> usize {
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10 | 11 | 12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>("u8")?[0]),
            1 => Value::I8(self.arr::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.arr("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.arr("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.arr("f32")?)),
            7 => match self.arr::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return self.err(format!("bool value {b} is neither 0 nor 1")),
            },
            // The `Value` holding the string is charged by its array or its metadata entry.
            8 => {
                let n = self.count(1, "string length")?;
                self.charge(n, "string")?;
                Value::String(String::from_utf8_lossy(self.take(n, "string")?).into_owned())
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return self.err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"));
                }
                let ety = self.u32("array element type")?;
                if ety > 12 {
                    return self.err(format!("unknown array element type {ety}"));
                }
                let n = self.count(Self::min_size(ety), "array length")?;
                self.charge(n.saturating_mul(std::mem::size_of::<Value>()), "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.arr("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.arr("f64")?)),
            _ => return self.err(format!("unknown metadata value type {ty}")),
        })
    }
}

impl Gguf {
    /// Parses the header of a GGUF file held in `bytes` and checks every tensor's extent.
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader { b: bytes, pos: 0, budget: MAX_MEMORY_PER_FILE_BYTE.saturating_mul(bytes.len()) };
        let magic = r.arr::<4>("magic")?;
        if &magic != MAGIC {
            return Err(ModelError::Gguf {
                offset: 0,
                msg: format!("bad magic {magic:02x?}, expected \"GGUF\"; is this a GGUF file?"),
            });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return r.err(format!("GGUF version {version} is not supported (only 2 and 3)"));
        }
        // A tensor entry takes at least 8 (name length) + 4 (rank) + 8 (one dimension) + 4 (type) + 8 (offset)
        // bytes; a metadata entry at least 8 (key length) + 4 (type) + 1 byte.
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let rem = r.remaining() as u64;
        if n_kv > rem / 13 {
            return r.err(format!("metadata count {n_kv} cannot fit in the {rem} bytes that remain"));
        }
        if n_tensors > rem / 32 {
            return r.err(format!("tensor count {n_tensors} cannot fit in the {rem} bytes that remain"));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key length")?;
            r.charge(std::mem::size_of::<Value>(), "metadata entry")?;
            let ty = r.u32("metadata value type")?;
            let v = r.value(ty, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return r.err(format!("duplicate metadata key `{key}`"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a <= 1 << 16 && a.is_power_of_two() => a as usize,
                _ => return r.err(format!("general.alignment {v:?} is not a power of two in 1..=65536")),
            },
        };
        r.charge((n_tensors as usize).saturating_mul(std::mem::size_of::<TensorInfo>()), "tensor table")?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name length")?;
            // The copy of the name kept to find duplicates.
            r.charge(name.len() + std::mem::size_of::<String>(), "tensor name")?;
            let rank = r.u32("tensor rank")? as usize;
            if rank == 0 || rank > MAX_DIMS {
                return r.err(format!("tensor `{name}` has rank {rank}; ranks 1..={MAX_DIMS} are allowed"));
            }
            r.charge(rank * std::mem::size_of::<usize>(), "tensor dimensions")?;
            let mut dims = Vec::with_capacity(rank);
            let mut n_elements: usize = 1;
            for _ in 0..rank {
                let d = r.u64("tensor dimension")?;
                let d = usize::try_from(d).ok().filter(|&d| d > 0);
                let Some(d) = d else {
                    return r.err(format!("tensor `{name}` has a zero or oversized dimension"));
                };
                n_elements = match n_elements.checked_mul(d) {
                    Some(n) if n <= isize::MAX as usize / 4 => n,
                    _ => return r.err(format!("tensor `{name}` has an element count that overflows")),
                };
                dims.push(d);
            }
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let Ok(offset) = usize::try_from(offset) else {
                return r.err(format!("tensor `{name}` offset {offset} overflows"));
            };
            if !offset.is_multiple_of(alignment) {
                return r
                    .err(format!("tensor `{name}` offset {offset} is not a multiple of the alignment {alignment}"));
            }
            if !names.insert(name.clone()) {
                return r.err(format!("duplicate tensor name `{name}`"));
            }
            tensors.push(TensorInfo { name, dims, type_id, offset, n_elements });
        }
        let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
        let file_len = bytes.len();
        for t in &tensors {
            // Unknown types are reported when the tensor is read, so a file with one exotic tensor still opens.
            let Some(ty) = GgmlType::from_id(t.type_id) else { continue };
            if !t.dims[0].is_multiple_of(ty.block_elems()) {
                return Err(ModelError::Gguf {
                    offset: data_offset,
                    msg: format!(
                        "tensor `{}` row length {} is not a multiple of the {:?} block size {}",
                        t.name,
                        t.dims[0],
                        ty,
                        ty.block_elems()
                    ),
                });
            }
            let size = ty.bytes_for(t.n_elements);
            let end = size.and_then(|s| data_offset.checked_add(t.offset)?.checked_add(s));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(ModelError::Gguf {
                        offset: data_offset,
                        msg: format!(
                            "tensor `{}` ({:?}, {} elements at data offset {}) runs past the end of the {file_len}-byte file",
                            t.name, ty, t.n_elements, t.offset
                        ),
                    })
                }
            }
        }
        Ok(Gguf { version, metadata, tensors, data_offset, file_len })
    }

    /// The table entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Metadata value `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The raw bytes of tensor `t` within `bytes` (the same file the header was parsed from).
    pub fn tensor_bytes<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Result<&'a [u8]> {
        let ty = self.tensor_type(t)?;
        let size = ty.bytes_for(t.n_elements);
        let start = self.data_offset.checked_add(t.offset);
        match (start, size) {
            (Some(s), Some(n))
                if bytes.len() == self.file_len && s.checked_add(n).is_some_and(|e| e <= bytes.len()) =>
            {
                Ok(&bytes[s..s + n])
            }
            _ => Err(ModelError::Gguf {
                offset: self.data_offset,
                msg: format!("tensor `{}` lies outside the {}-byte buffer", t.name, bytes.len()),
            }),
        }
    }

    /// The ggml type of tensor `t`, or a typed error naming the unsupported type.
    pub fn tensor_type(&self, t: &TensorInfo) -> Result<GgmlType> {
        GgmlType::from_id(t.type_id).ok_or_else(|| ModelError::UnsupportedTensorType {
            tensor: t.name.clone(),
            type_id: t.type_id,
            name: GgmlType::name_of_id(t.type_id),
        })
    }

    /// Tensor `t` dequantized to f32, in ggml order (fastest dimension last in row-major terms).
    pub fn dequantize(&self, bytes: &[u8], t: &TensorInfo) -> Result<Vec<f32>> {
        let ty = self.tensor_type(t)?;
        let src = self.tensor_bytes(bytes, t)?;
        let mut out = vec![0.0f32; t.n_elements];
        dequantize(ty, src, &mut out);
        Ok(out)
    }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    pub header: Gguf,
    map: memmap2::Mmap,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; adaquant never writes model files while
        // it reads them. A file truncated underneath a live mapping is the one case memory maps cannot guard.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(path, e))?;
        let header = Gguf::parse(&map)?;
        Ok(GgufFile { header, map })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tensor `name` dequantized to f32, or [`ModelError::MissingTensor`].
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, &TensorInfo)> {
        let t = self.header.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        Ok((self.header.dequantize(&self.map, t)?, t))
    }
}

/// Builds GGUF files in memory (for tests, fuzz seeds and small synthetic models).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Adds a tensor given its dims (fastest first), ggml type id and raw bytes.
    pub fn tensor_raw(&mut self, name: &str, dims: &[usize], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), type_id, data));
        self
    }

    /// Adds an f32 tensor with a row-major `shape` (slowest first, as [`TensorInfo::shape`] returns).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor_raw(name, &dims, 0, bytes)
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => Self::put_str(out, s),
            Value::Array(a) => {
                out.extend(a.first().map_or(4, Value::type_id).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for e in a {
                    Self::put_value(out, e);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }

    /// The file's bytes (version 3, default alignment).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            Self::put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        out.resize(out.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT, 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()))
            .meta("llama.block_count", Value::U32(2))
            .meta("tokens", Value::Array(vec![Value::String("a".into()), Value::String("b".into())]))
            .tensor_f32("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .tensor_f32("b", &[3], &[7.0, 8.0, 9.0]);
        w.to_bytes()
    }

    fn gguf_err(bytes: &[u8]) -> String {
        match Gguf::parse(bytes) {
            Err(ModelError::Gguf { msg, .. }) => msg,
            other => panic!("expected a GGUF error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(2));
        assert_eq!(g.get("tokens").and_then(Value::as_array).map(|a| a.len()), Some(2));
        let t = g.tensor("w").unwrap();
        assert_eq!(t.shape(), vec![2, 3]);
        assert_eq!(g.dequantize(&bytes, t).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(g.dequantize(&bytes, g.tensor("b").unwrap()).unwrap(), vec![7.0, 8.0, 9.0]);
        assert_eq!(g.tensor("b").unwrap().offset % DEFAULT_ALIGNMENT, 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for n in 0..bytes.len() {
            // The last tensor ends exactly at the end, so every shorter prefix must fail.
            assert!(Gguf::parse(&bytes[..n]).is_err(), "prefix of {n} bytes parsed");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert!(gguf_err(&b).contains("bad magic"));
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(gguf_err(&b).contains("version 1"));
    }

    #[test]
    fn absurd_counts() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(gguf_err(&b).contains("tensor count"));
        let mut b = sample();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(gguf_err(&b).contains("metadata count"));
        // A huge string length for the first key.
        let mut b = sample();
        b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(gguf_err(&b).contains("key length"));
    }

    #[test]
    fn huge_array_length() {
        let mut w = GgufWriter::new();
        w.meta("a", Value::Array(vec![Value::U32(1)]));
        let mut b = w.to_bytes();
        // Key "a": 24-byte header, 8-byte length, 1 byte, 4-byte type, 4-byte element type, then the length.
        let at = 24 + 8 + 1 + 4 + 4;
        b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(gguf_err(&b).contains("array length"));
    }

    #[test]
    fn arrays_are_bounded_by_their_memory_not_only_their_bytes() {
        // 4096 one-byte elements: 4 KiB in the file, 128 KiB as `Value`s, over the budget of 8 per file byte.
        let mut w = GgufWriter::new();
        w.meta("bytes", Value::Array(vec![Value::U8(7); 4096]));
        let msg = gguf_err(&w.to_bytes());
        assert!(msg.contains("array would take 131072 bytes of memory"), "{msg}");
        assert!(msg.contains("8 per byte"), "{msg}");
        // The same claim in a truncated file is refused before the array is allocated.
        let b = w.to_bytes();
        assert!(gguf_err(&b[..b.len() / 2]).contains("array"));
        // `i32` arrays, the densest in real files (token types), fit: 4 bytes in the file, 32 in memory.
        let mut w = GgufWriter::new();
        w.meta("types", Value::Array(vec![Value::I32(1); 4096]));
        let g = Gguf::parse(&w.to_bytes()).unwrap();
        assert_eq!(g.get("types").and_then(Value::as_array).map(<[Value]>::len), Some(4096));
        // Arrays of arrays are charged at every level: each inner array of 64 bytes takes 76 bytes in the file
        // (4 type, 8 length, 64 elements) and 65 `Value`s in memory.
        let mut w = GgufWriter::new();
        w.meta("rows", Value::Array(vec![Value::Array(vec![Value::U8(1); 64]); 64]));
        assert!(gguf_err(&w.to_bytes()).contains("array would take 2048 bytes of memory"));
    }

    #[test]
    fn unknown_value_type_and_deep_nesting() {
        let mut w = GgufWriter::new();
        w.meta("a", Value::U32(1));
        let mut b = w.to_bytes();
        b[24 + 8 + 1..24 + 8 + 1 + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(gguf_err(&b).contains("unknown metadata value type"));
        let mut v = Value::Array(vec![Value::U8(1)]);
        for _ in 0..MAX_ARRAY_DEPTH {
            v = Value::Array(vec![v]);
        }
        let mut w = GgufWriter::new();
        w.meta("deep", v);
        assert!(gguf_err(&w.to_bytes()).contains("nested"));
    }

    fn one_tensor(dims: &[usize], ty: u32, data: Vec<u8>) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.tensor_raw("t", dims, ty, data);
        w.to_bytes()
    }

    #[test]
    fn bad_tensor_entries() {
        // Rank 0 and rank 5.
        assert!(gguf_err(&one_tensor(&[], 0, vec![])).contains("rank"));
        assert!(gguf_err(&one_tensor(&[1, 1, 1, 1, 1], 0, vec![0; 4])).contains("rank"));
        // Zero dimension, and dimensions whose product overflows.
        assert!(gguf_err(&one_tensor(&[0], 0, vec![])).contains("zero"));
        assert!(gguf_err(&one_tensor(&[1 << 32, 1 << 32], 0, vec![])).contains("overflows"));
        // Data past the end of the file.
        assert!(gguf_err(&one_tensor(&[1000], 0, vec![0; 16])).contains("past the end"));
        // Row not a whole number of blocks.
        assert!(gguf_err(&one_tensor(&[33], 8, vec![0; 64])).contains("block size"));
        // Offset past the end, and a misaligned offset.
        let mut b = one_tensor(&[4], 0, vec![0; 16]);
        let off_at = 24 + 8 + 1 + 4 + 8 + 4;
        b[off_at..off_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(gguf_err(&b).contains("past the end"));
        b[off_at..off_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::parse(&b).is_err());
        b[off_at..off_at + 8].copy_from_slice(&3u64.to_le_bytes());
        assert!(gguf_err(&b).contains("alignment"));
    }

    #[test]
    fn unknown_tensor_type_is_typed_on_read() {
        let b = one_tensor(&[4], 77, vec![0; 16]);
        let g = Gguf::parse(&b).unwrap();
        let t = g.tensor("t").unwrap();
        assert!(matches!(g.dequantize(&b, t), Err(ModelError::UnsupportedTensorType { type_id: 77, .. })));
        // A known type that adaquant does not dequantize (Q2_K).
        let b = one_tensor(&[256], 10, vec![0; 84]);
        let g = Gguf::parse(&b).unwrap();
        let err = g.dequantize(&b, g.tensor("t").unwrap()).unwrap_err();
        assert!(err.to_string().contains("Q2_K"), "{err}");
    }

    #[test]
    fn duplicates_and_bad_alignment() {
        let mut w = GgufWriter::new();
        w.meta("k", Value::U8(1)).meta("k", Value::U8(2));
        assert!(gguf_err(&w.to_bytes()).contains("duplicate metadata"));
        let mut w = GgufWriter::new();
        w.tensor_f32("t", &[1], &[0.0]).tensor_f32("t", &[1], &[0.0]);
        assert!(gguf_err(&w.to_bytes()).contains("duplicate tensor"));
        let mut w = GgufWriter::new();
        w.meta("general.alignment", Value::U32(24));
        assert!(gguf_err(&w.to_bytes()).contains("alignment"));
        let mut w = GgufWriter::new();
        w.meta("flag", Value::Bool(true));
        let mut b = w.to_bytes();
        // Header (24), key length (8), "flag" (4), value type (4), then the bool byte.
        b[40] = 7;
        assert!(gguf_err(&b).contains("bool"));
    }
}
