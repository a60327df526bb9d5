//! The one source of truth for the CUDA side of the packed layout: the `#define` preamble generated from the Rust
//! definitions in [`crate::format`], the kernel sources, their specialisations and the NVRTC options.
//!
//! This module needs neither the `cuda` feature nor a GPU, so the preamble and the specialisation list are tested
//! everywhere; compiling the programs needs NVRTC (see `tests/cuda_ptx.rs`).

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::format::{Bits, GroupAxis, MetaDtype, QuantSpec};

/// Helpers shared by every kernel, compiled after the preamble.
pub const COMMON_SOURCE: &str = include_str!("common.cuh");
/// Quantize + pack and dequantize + unpack kernels.
pub const QUANT_SOURCE: &str = include_str!("quant.cu");
/// Fused decode attention over packed keys and values, its reduction, and the f16 baseline.
pub const ATTN_SOURCE: &str = include_str!("attn.cu");

/// Bytes every device stream buffer keeps after its last code: word-wide tile loads and straddling codes read
/// up to this far past the end.
pub const PAD_BYTES: usize = 16;
/// Tokens per attention tile (one shared-memory load of packed keys and values).
pub const ATTN_TILE: usize = 64;
/// Threads per attention block.
pub const ATTN_THREADS: usize = 128;
/// Largest number of query heads per KV head the attention kernels handle.
pub const MAX_GQA: usize = 8;
/// Smallest group size the attention kernels handle (bounds the metadata held per tile).
pub const MIN_ATTN_GROUP: usize = 16;
/// Head dimensions with compiled attention specialisations.
pub const HEAD_DIMS: [usize; 2] = [64, 128];
/// u32 entries per sequence in the `lens` array of the attention kernels: quantized keys, quantized values, sinks,
/// total tokens, key tail ring start, value tail ring start, two reserved.
pub const LENS_STRIDE: usize = 8;
/// Threads per block of the elementwise quantization kernels.
pub const QUANT_THREADS: usize = 256;

/// Element type of queries and outputs (and of sources to quantize).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// The code the kernels receive (`ADQ_DTYPE_*`).
    pub const fn code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
        }
    }

    /// Bytes of one element.
    pub const fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// The code of a width in the kernels (`ADQ_WIDTH_ID_*`): its position in [`Bits::ALL`].
pub fn width_id(bits: Bits) -> usize {
    Bits::ALL.iter().position(|&b| b == bits).expect("Bits::ALL lists every width")
}

/// Bits per code of a 2^b-level width in the stream; 0 for ternary, which stores five digits per byte.
pub const fn code_bits(bits: Bits) -> usize {
    match bits {
        Bits::B1_58 => 0,
        b => b.nominal() as usize,
    }
}

/// The code of a group axis in the kernels (`ADQ_AXIS_*`).
pub const fn axis_code(axis: GroupAxis) -> u32 {
    match axis {
        GroupAxis::PerToken => 0,
        GroupAxis::PerChannel => 1,
    }
}

/// The code of a metadata type in the kernels (`ADQ_META_*`).
pub const fn meta_code(meta: MetaDtype) -> u32 {
    match meta {
        MetaDtype::F16 => 0,
        MetaDtype::F32 => 1,
    }
}

/// Scalar parameters of the attention kernels, passed by value; `AdqAttnParams` in attn.cu mirrors it, and the
/// preamble carries its size and field offsets so that the CUDA side checks the mirror with `static_assert`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AttnParams {
    pub batch: u32,
    pub n_q_heads: u32,
    pub n_kv_heads: u32,
    pub gqa: u32,
    pub k_axis: u32,
    pub k_group_shift: u32,
    pub v_axis: u32,
    pub v_group_shift: u32,
    pub meta_dtype: u32,
    pub q_dtype: u32,
    /// Tokens per split (a multiple of [`ATTN_TILE`]).
    pub chunk: u32,
    pub n_splits: u32,
    pub sink_cap: u32,
    pub window_cap: u32,
    /// Bytes between the packed key streams of two (sequence, KV head) pairs.
    pub k_stream_stride: u64,
    pub v_stream_stride: u64,
    /// Metadata entries between two (sequence, KV head) pairs.
    pub k_meta_stride: u64,
    pub v_meta_stride: u64,
    pub sm_scale: f32,
    pub reserved: u32,
}

const _: () = assert!(std::mem::size_of::<AttnParams>() == 96);
const _: () = assert!(std::mem::offset_of!(AttnParams, k_stream_stride) == 56);

/// Shared-memory plan of one attention specialisation (bytes, each region 16-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnSmem {
    pub tile_off: usize,
    pub tile_bytes: usize,
    pub meta_entries: usize,
    pub kmeta_off: usize,
    pub vmeta_off: usize,
    pub q_off: usize,
    pub s_off: usize,
    pub stat_off: usize,
    pub total: usize,
}

impl AttnSmem {
    /// The plan for one head dimension: an f32 tile of [`ATTN_TILE`] rows (or the packed key and value bytes of a
    /// tile), the scales and minima of a tile's groups for keys and for values, the scaled queries, the scores and
    /// the softmax statistics.
    pub const fn for_head_dim(head_dim: usize) -> AttnSmem {
        const fn up16(x: usize) -> usize {
            x.div_ceil(16) * 16
        }
        let exact = ATTN_TILE * (head_dim + 1) * 4;
        let packed = 2 * (ATTN_TILE * head_dim + PAD_BYTES);
        let tile_bytes = up16(if exact > packed { exact } else { packed });
        let meta_entries = ATTN_TILE * head_dim / MIN_ATTN_GROUP;
        let tile_off = 0;
        let kmeta_off = tile_off + tile_bytes;
        let vmeta_off = kmeta_off + up16(2 * meta_entries * 4);
        let q_off = vmeta_off + up16(2 * meta_entries * 4);
        let s_off = q_off + up16(MAX_GQA * head_dim * 4);
        let stat_off = s_off + up16(2 * MAX_GQA * ATTN_TILE * 4);
        let total = stat_off + up16(3 * MAX_GQA * 4);
        AttnSmem { tile_off, tile_bytes, meta_entries, kmeta_off, vmeta_off, q_off, s_off, stat_off, total }
    }

    fn defines(&self) -> Vec<String> {
        vec![
            format!("-DADQ_SMEM_TILE_OFF={}", self.tile_off),
            format!("-DADQ_SMEM_TILE_BYTES={}", self.tile_bytes),
            format!("-DADQ_SMEM_META_ENTRIES={}", self.meta_entries),
            format!("-DADQ_SMEM_KMETA_OFF={}", self.kmeta_off),
            format!("-DADQ_SMEM_VMETA_OFF={}", self.vmeta_off),
            format!("-DADQ_SMEM_Q_OFF={}", self.q_off),
            format!("-DADQ_SMEM_S_OFF={}", self.s_off),
            format!("-DADQ_SMEM_STAT_OFF={}", self.stat_off),
            format!("-DADQ_SMEM_BYTES={}", self.total),
        ]
    }
}

/// Every `#define` of the preamble as (name, value), in order. [`preamble`] prints exactly these.
pub fn preamble_defines() -> Vec<(String, String)> {
    let mut d: Vec<(String, String)> = Vec::new();
    let mut put = |name: String, value: String| d.push((name, value));
    put("ADQ_NUM_WIDTHS".into(), Bits::ALL.len().to_string());
    for (i, b) in Bits::ALL.iter().enumerate() {
        let (unit_codes, unit_bytes) = b.unit();
        put(format!("ADQ_WIDTH_ID_{}", b.name().replace('.', "_")), i.to_string());
        put(format!("ADQ_W{i}_LEVELS"), b.levels().to_string());
        put(format!("ADQ_W{i}_CODE_BITS"), code_bits(*b).to_string());
        put(format!("ADQ_W{i}_UNIT_CODES"), unit_codes.to_string());
        put(format!("ADQ_W{i}_UNIT_BYTES"), unit_bytes.to_string());
        put(format!("ADQ_W{i}_TERNARY"), u32::from(*b == Bits::B1_58).to_string());
    }
    for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
        put(format!("ADQ_AXIS_{}", axis.to_string().to_ascii_uppercase()), axis_code(axis).to_string());
    }
    for meta in [MetaDtype::F16, MetaDtype::F32] {
        let name = format!("{meta:?}").to_ascii_uppercase();
        put(format!("ADQ_META_{name}"), meta_code(meta).to_string());
        put(format!("ADQ_META_{name}_BYTES"), meta.bytes().to_string());
    }
    for dt in [DType::F32, DType::F16, DType::Bf16] {
        put(format!("ADQ_DTYPE_{}", format!("{dt:?}").to_ascii_uppercase()), dt.code().to_string());
    }
    put("ADQ_PAD_BYTES".into(), PAD_BYTES.to_string());
    put("ADQ_ATTN_TILE".into(), ATTN_TILE.to_string());
    put("ADQ_ATTN_THREADS".into(), ATTN_THREADS.to_string());
    put("ADQ_MAX_GQA".into(), MAX_GQA.to_string());
    put("ADQ_MIN_GROUP".into(), MIN_ATTN_GROUP.to_string());
    put("ADQ_LENS_STRIDE".into(), LENS_STRIDE.to_string());
    put("ADQ_SIZEOF_ATTN_PARAMS".into(), std::mem::size_of::<AttnParams>().to_string());
    put(
        "ADQ_OFFSETOF_ATTN_PARAMS_K_STREAM_STRIDE".into(),
        std::mem::offset_of!(AttnParams, k_stream_stride).to_string(),
    );
    put("ADQ_OFFSETOF_ATTN_PARAMS_SM_SCALE".into(), std::mem::offset_of!(AttnParams, sm_scale).to_string());
    d
}

/// The preamble prepended to every program: the `#define`s of [`preamble_defines`], then the `AdqWidth<W>`
/// specialisations built from them.
pub fn preamble() -> String {
    let mut s = String::from("// Generated from adaquant_kernels::format by cuda::layout::preamble(); do not edit.\n");
    for (name, value) in preamble_defines() {
        let _ = writeln!(s, "#define {name} {value}");
    }
    s.push_str("template <int W>\nstruct AdqWidth;\n");
    for i in 0..Bits::ALL.len() {
        let _ = writeln!(
            s,
            "template <>\nstruct AdqWidth<{i}> {{\n    static constexpr unsigned levels = ADQ_W{i}_LEVELS;\n    \
             static constexpr unsigned code_bits = ADQ_W{i}_CODE_BITS;\n    \
             static constexpr unsigned unit_codes = ADQ_W{i}_UNIT_CODES;\n    \
             static constexpr unsigned unit_bytes = ADQ_W{i}_UNIT_BYTES;\n    \
             static constexpr bool ternary = ADQ_W{i}_TERNARY != 0;\n}};"
        );
    }
    // Lloyd-Max levels (crate::quant::codebook) of the widths that have them, as exact f32 literals in constant
    // memory, and `adq_lloyd<W>(code)` to look one up.
    s.push_str("template <int W>\n__device__ __forceinline__ float adq_lloyd(unsigned code);\n");
    for (i, b) in Bits::ALL.iter().enumerate() {
        let Some(levels) = crate::quant::codebook::levels(*b) else { continue };
        let list: Vec<String> = levels.iter().map(|l| format!("{l:?}f")).collect();
        let _ = writeln!(
            s,
            "__constant__ float adq_lloyd_w{i}[{}] = {{{}}};\ntemplate <>\n__device__ __forceinline__ float \
             adq_lloyd<{i}>(unsigned code) {{ return adq_lloyd_w{i}[code]; }}",
            levels.len(),
            list.join(", ")
        );
    }
    s
}

/// One compiled program: a kernel file and the values of its compile-time parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelSpec {
    /// `quant.cu` for one width: `adq_quant_meta`, `adq_pack`, `adq_dequant`.
    Quant { bits: Bits },
    /// `attn.cu` fused over packed keys and values: `adq_attn_split`, `adq_attn_reduce`.
    Attn { k: Bits, v: Bits, head_dim: usize },
    /// `attn.cu` baseline over f16 keys and values: `adq_attn_f16_split`, `adq_attn_reduce`.
    AttnF16 { head_dim: usize },
    /// `attn.cu` fused over Lloyd-Max keys and values (one scale per group, levels looked up from a table):
    /// `adq_attn_split`, `adq_attn_reduce`.
    AttnLloyd { k: Bits, v: Bits, head_dim: usize },
}

impl KernelSpec {
    /// Every specialisation adaquant compiles: each width for the quantization kernels, every (key width,
    /// value width, head dimension) for the fused attention, and each head dimension for the baseline.
    pub fn all() -> Vec<KernelSpec> {
        let mut v: Vec<KernelSpec> = Bits::ALL.iter().map(|&bits| KernelSpec::Quant { bits }).collect();
        for head_dim in HEAD_DIMS {
            for k in Bits::ALL {
                for vb in Bits::ALL {
                    v.push(KernelSpec::Attn { k, v: vb, head_dim });
                }
            }
            v.push(KernelSpec::AttnF16 { head_dim });
            for k in Bits::ALL.into_iter().filter(|b| crate::quant::codebook::levels(*b).is_some()) {
                for vb in Bits::ALL.into_iter().filter(|b| crate::quant::codebook::levels(*b).is_some()) {
                    v.push(KernelSpec::AttnLloyd { k, v: vb, head_dim });
                }
            }
        }
        v
    }

    /// Checks that a head dimension has attention specialisations.
    pub fn check_head_dim(head_dim: usize) -> Result<()> {
        if HEAD_DIMS.contains(&head_dim) {
            Ok(())
        } else {
            Err(Error::Cuda(format!(
                "head_dim {head_dim} has no CUDA attention kernel: supported head dimensions are {HEAD_DIMS:?}"
            )))
        }
    }

    /// File name of the kernel source (for messages).
    pub fn file(&self) -> &'static str {
        match self {
            KernelSpec::Quant { .. } => "quant.cu",
            KernelSpec::Attn { .. } | KernelSpec::AttnF16 { .. } | KernelSpec::AttnLloyd { .. } => "attn.cu",
        }
    }

    /// The kernel functions of the program.
    pub fn functions(&self) -> &'static [&'static str] {
        match self {
            KernelSpec::Quant { .. } => &["adq_quant_meta", "adq_pack", "adq_dequant"],
            KernelSpec::Attn { .. } | KernelSpec::AttnLloyd { .. } => &["adq_attn_split", "adq_attn_reduce"],
            KernelSpec::AttnF16 { .. } => &["adq_attn_f16_split", "adq_attn_reduce"],
        }
    }

    /// The full program text: preamble, common helpers, kernel file.
    pub fn program(&self) -> String {
        let body = match self {
            KernelSpec::Quant { .. } => QUANT_SOURCE,
            KernelSpec::Attn { .. } | KernelSpec::AttnF16 { .. } | KernelSpec::AttnLloyd { .. } => ATTN_SOURCE,
        };
        format!("{}\n// ---- common.cuh\n{COMMON_SOURCE}\n// ---- {}\n{body}", preamble(), self.file())
    }

    /// The `-D` options that specialise the program.
    pub fn defines(&self) -> Vec<String> {
        match *self {
            KernelSpec::Quant { bits } => vec![format!("-DADQ_WIDTH={}", width_id(bits))],
            KernelSpec::Attn { k, v, head_dim } => {
                let mut d = vec![
                    format!("-DADQ_K_WIDTH={}", width_id(k)),
                    format!("-DADQ_V_WIDTH={}", width_id(v)),
                    format!("-DADQ_HEAD_DIM={head_dim}"),
                ];
                d.extend(AttnSmem::for_head_dim(head_dim).defines());
                d
            }
            KernelSpec::AttnF16 { head_dim } => {
                let mut d = vec!["-DADQ_BASELINE=1".to_string(), format!("-DADQ_HEAD_DIM={head_dim}")];
                d.extend(AttnSmem::for_head_dim(head_dim).defines());
                d
            }
            KernelSpec::AttnLloyd { k, v, head_dim } => {
                let mut d = KernelSpec::Attn { k, v, head_dim }.defines();
                d.extend(["-DADQ_K_LLOYD=1".to_string(), "-DADQ_V_LLOYD=1".to_string()]);
                d
            }
        }
    }

    /// NVRTC options: the defines, C++17, and exact (unfused) arithmetic for the quantization kernels so that
    /// their codes equal the host reference bit for bit.
    pub fn nvrtc_options(&self) -> Vec<String> {
        let mut o = self.defines();
        o.push("--std=c++17".into());
        if matches!(self, KernelSpec::Quant { .. }) {
            o.push("--fmad=false".into());
        }
        o
    }

    /// File name of the precompiled PTX of this specialisation for `arch`, such as `attn_K4_V2_d128.compute_90.ptx`
    /// (see `ADAQUANT_PTX_DIR` in the `cuda` module).
    pub fn ptx_file(&self, arch: &str) -> String {
        let stem = match self {
            KernelSpec::Quant { bits } => format!("quant_{}", bits.name().replace('.', "_")),
            KernelSpec::Attn { k, v, head_dim } => {
                format!("attn_K{}_V{}_d{head_dim}", k.name().replace('.', "_"), v.name().replace('.', "_"))
            }
            KernelSpec::AttnF16 { head_dim } => format!("attn_f16_d{head_dim}"),
            KernelSpec::AttnLloyd { k, v, head_dim } => {
                format!("attn_lloyd_K{}_V{}_d{head_dim}", k.name().replace('.', "_"), v.name().replace('.', "_"))
            }
        };
        format!("{stem}.{arch}.ptx")
    }

    /// A short name for logs and errors, such as `attn.cu[K4 V2 d128]`.
    pub fn name(&self) -> String {
        match self {
            KernelSpec::Quant { bits } => format!("quant.cu[{bits}]"),
            KernelSpec::Attn { k, v, head_dim } => format!("attn.cu[K{k} V{v} d{head_dim}]"),
            KernelSpec::AttnF16 { head_dim } => format!("attn.cu[f16 d{head_dim}]"),
            KernelSpec::AttnLloyd { k, v, head_dim } => format!("attn.cu[Lloyd-Max K{k} V{v} d{head_dim}]"),
        }
    }
}

/// GPU architectures the PTX compile test covers (virtual architectures, so the PTX JIT-compiles on newer cards).
pub const ARCHS: [&str; 2] = ["compute_80", "compute_90"];

// ---- Host-side helpers shared by the CUDA implementation and its stand-in.

/// Tokens of one side that are quantized after `tokens` tokens, exactly as the CPU cache decides: everything past
/// the sinks and the residual window, per-channel sides in whole groups.
pub fn quantized_tokens(spec: &QuantSpec, tokens: usize, residual: usize, sinks: usize) -> usize {
    let free = tokens.saturating_sub(sinks + residual);
    match spec.axis {
        GroupAxis::PerToken => free,
        GroupAxis::PerChannel => free / spec.group * spec.group,
    }
}

/// Bytes of a device stream buffer holding `tokens` tokens: the packed codes, the read-ahead pad, rounded to 16.
pub fn stream_stride(bits: Bits, tokens: usize, head_dim: usize) -> usize {
    (bits.packed_bytes(tokens * head_dim) + PAD_BYTES).div_ceil(16) * 16
}

/// Median of a non-empty slice (sorts it).
pub fn median(x: &mut [f64]) -> f64 {
    x.sort_by(|a, b| a.total_cmp(b));
    x[x.len() / 2]
}

/// Host f32 values as raw bytes of `dtype` (round to nearest even).
pub fn to_dtype_bytes(x: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::Bf16 => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// Raw bytes of `dtype` as f32 values.
pub fn from_dtype_bytes(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::Bf16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_is_listed_once() {
        let all = KernelSpec::all();
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len());
        assert_eq!(all.len(), Bits::ALL.len() + HEAD_DIMS.len() * (Bits::ALL.len() * Bits::ALL.len() + 1 + 5 * 5));
    }

    #[test]
    fn shared_memory_plan_fits_the_regions() {
        for d in HEAD_DIMS {
            let s = AttnSmem::for_head_dim(d);
            assert!(s.tile_bytes >= ATTN_TILE * (d + 1) * 4);
            assert!(s.tile_bytes >= 2 * (ATTN_TILE * d + PAD_BYTES));
            assert!(s.kmeta_off >= s.tile_off + s.tile_bytes);
            assert!(s.total <= 99 * 1024, "{d}: {} bytes of shared memory exceed what sm_80 grants", s.total);
            for off in [s.kmeta_off, s.vmeta_off, s.q_off, s.s_off, s.stat_off, s.total] {
                assert_eq!(off % 16, 0);
            }
        }
    }

    #[test]
    fn unsupported_head_dim_is_an_error() {
        assert!(KernelSpec::check_head_dim(128).is_ok());
        assert!(matches!(KernelSpec::check_head_dim(96), Err(Error::Cuda(m)) if m.contains("96")));
    }
}
