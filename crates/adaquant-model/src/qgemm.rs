//! Linear layers whose weights stay in their GGUF block formats: `out = x · Wᵀ` with the activations `x`
//! quantized to 8 bits per block and integer dot products inside each block, as llama.cpp does
//! (ggml-cpu `quants.c`, `ggml_vec_dot_q4_1_q8_1` and friends, and its repacked `q4_0_8x8` GEMM, ggml commit
//! d99724f2).
//!
//! A token then reads the packed weight bytes (about 0.6 bytes per weight for Q4_1) instead of f32 copies (4 bytes),
//! which is what bounds single-token decoding on a CPU.
//!
//! # The order of operations, the contract every path keeps
//! Like [`crate::gemm`], every output element is computed by one fixed sequence of operations whatever the batch, so
//! the forward stays batch-invariant (one forward over a window equals token-by-token decoding, bit for bit).
//!
//! Activations (per row, per block of 32 for the 32-element formats, of 256 for the K-quants): `d = max|x| / 127`,
//! `q = round_ties_even(x / d)` clamped to ±127 (all zero when `d == 0`), and for the 32-element formats also
//! `s = d · Σq` (llama.cpp's `block_q8_1`), for the K-quants the sums of each 16 codes (`block_q8_K.bsums`).
//! Scales stay f32 (llama.cpp rounds the 32-element ones to f16).
//!
//! 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), for one output element: one f32 chain `acc` and, for the
//! formats with a minimum (Q4_1, Q5_1), one f32 chain `summ`, both starting at zero; for each block `b` in order,
//! 1. the exact integer `p = Σ_j w_j · q_j` over the block's 32 elements (weight codes with their offset removed:
//!    `c - 8` for Q4_0, `c - 16` for Q5_0, `c` for Q4_1, Q5_1 and Q8_0);
//! 2. `acc = fma(dw_b · dx_b, p, acc)` (the scale product rounded to f32 first, `p` converted exactly);
//! 3. with a minimum, `summ = fma(mw_b, s_b, summ)`;
//!
//! and the result is `acc + summ` with a minimum, `acc` without.
//!
//! K-quants (Q4_K, Q5_K, Q6_K), for one output element: for each super-block in order, the exact integers
//! `I = Σ_sub scale_sub · Σ w·q` (and for Q4_K/Q5_K `M = Σ_sub min_sub · Σ q`) are formed, then
//! `acc = fma(dw · dx, I, acc)` and `acc = fma(-(dminw · dx), M, acc)`.
//!
//! [`qmatmul_t_ref`] spells the contract out in scalar code, from the GGUF bytes of each row; the SIMD kernels must
//! equal it bit for bit, and the tests check that on awkward sizes, and check both against an f64 product over the
//! dequantized weights.
//!
//! # The interleaved layout of the 32-element formats
//! Since no step mixes output elements, the fast kernels hold eight output rows in the eight lanes of one
//! register (llama.cpp's repacking). At load, [`PackedMatrix::new`] interleaves the rows in groups of eight (the
//! last group padded with zero rows); group `g`, block `b` is one record of eight blocks' bytes, as many bytes as
//! the eight GGUF blocks:
//! - the eight rows' scales `d` (f16, lane order), then for Q4_1/Q5_1 the eight minimums `m`;
//! - Q4_0, Q4_1, Q5_0, Q5_1: four 32-byte vectors; byte `4r + t` of vector `v` is byte `4v + t` of row `r`'s
//!   GGUF nibbles, so the low nibbles of vector `v` are elements `4v..4v + 4` of the eight rows and the high
//!   nibbles elements `16 + 4v..16 + 4v + 4`; Q5_0/Q5_1 then add 32 bytes whose byte `4r + t` holds in bit `c` the
//!   fifth bit of element `4c + t` of row `r`;
//! - Q8_0: eight 32-byte vectors, byte `4r + t` of vector `c` being element `4c + t` of row `r` plus 128 (unsigned).
//!
//! A 4-byte chunk of activation codes, broadcast to all lanes, then multiplies the same chunk of eight rows in one
//! `vpdpbusd` (AVX-512 VNNI, unsigned weight codes times signed activations, four products summed into each 32-bit
//! lane) or `vpmaddubsw` + `vpmaddwd` (AVX2); the unsigned codes' offset (8, 16 or 128) comes off as
//! `offset · Σq`. The kernels run tiles of eight activation rows by eight weight rows for the 4- and 5-bit formats
//! (one weight block unpacked for eight rows) and four by sixteen for Q8_0 (one activation broadcast for two
//! groups); a single row (decoding) takes sixteen weight rows at a time.

use crate::quant::{dequantize, GgmlType, QK_K};
use crate::{ModelError, Result};
use half::f16;
use rayon::prelude::*;

/// Elements of a 32-element block.
const QK: usize = 32;
/// Weight rows per interleaved group: the lanes of one f32 register.
const GR: usize = 8;
/// Activation rows per parallel task.
const MC: usize = 32;
/// Weight rows per parallel task (whole groups).
const NC: usize = 64;
/// Below this many multiply-adds one thread is faster than waking the pool.
const PAR_MIN_MACS: usize = 1 << 17;

/// A weight matrix `[rows][cols]` (output features by input features) held in one ggml block format.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// K-quants: the GGUF rows as they are. 32-element formats: groups of eight rows interleaved (module docs).
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Wraps `data`, `rows` rows of `cols` elements each in format `ty` (GGUF row-major bytes); the 32-element
    /// formats are interleaved in groups of eight rows here.
    ///
    /// Errors when `ty` is not a block format with an integer product here, when `cols` is not a whole number of
    /// blocks, or when `data` has the wrong length.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !Self::supports(ty) {
            return Err(ModelError::InvalidInput(format!(
                "packed products take Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K weights, not {ty:?}"
            )));
        }
        let row_bytes = ty.bytes_for(cols).ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "a {ty:?} row of {cols} elements is not a whole number of {}-element blocks",
                ty.block_elems()
            ))
        })?;
        let want = row_bytes.checked_mul(rows);
        if want != Some(data.len()) {
            return Err(ModelError::InvalidInput(format!(
                "{rows} x {cols} {ty:?} weights need {want:?} bytes, got {}",
                data.len()
            )));
        }
        let data = if is_32(ty) { interleave(ty, rows, cols, &data) } else { data };
        Ok(PackedMatrix { ty, rows, cols, row_bytes, data })
    }

    /// Whether `ty` has an integer-dot product here.
    pub fn supports(ty: GgmlType) -> bool {
        is_32(ty) || matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the matrix holds (with the zero rows that pad the last group of eight).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The GGUF bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> Vec<u8> {
        if !is_32(self.ty) {
            return self.data[r * self.row_bytes..(r + 1) * self.row_bytes].to_vec();
        }
        let bb = self.ty.block_bytes();
        let nb = self.cols / QK;
        let gb = GR * bb;
        let (g, lane) = (r / GR, r % GR);
        let mut out = vec![0u8; self.row_bytes];
        for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
            take_block(self.ty, &self.data[(g * nb + b) * gb..][..gb], lane, blk);
        }
        out
    }

    /// Row `r` dequantized to f32.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.cols];
        dequantize(self.ty, &self.row_bytes(r), &mut out);
        out
    }

    /// The whole matrix dequantized to f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            dequantize(self.ty, &self.row_bytes(r), o);
        }
        out
    }

    /// The activation format this weight format multiplies with.
    fn act_kind(&self) -> ActKind {
        if is_32(self.ty) {
            ActKind::Q8Block
        } else {
            ActKind::Q8K
        }
    }
}

/// Whether `ty` is one of the 32-element formats, held interleaved.
fn is_32(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0)
}

/// Offset of the minimums in an interleaved record (after the eight f16 scales).
const MIN_AT: usize = 2 * GR;

/// Offset of the code vectors in an interleaved record of `ty`.
const fn codes_at(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        4 * GR
    } else {
        2 * GR
    }
}

/// Offset of the fifth bits in an interleaved record of Q5_0/Q5_1 (after the four nibble vectors).
const fn high_at(ty: GgmlType) -> usize {
    codes_at(ty) + 4 * 32
}

/// Where the nibbles (and for Q5 the fifth bits `qh`) sit in a GGUF block of `ty`.
fn gguf_parts(ty: GgmlType) -> (usize, Option<usize>) {
    match ty {
        GgmlType::Q4_0 => (2, None),
        GgmlType::Q4_1 => (4, None),
        GgmlType::Q5_0 => (6, Some(2)),
        GgmlType::Q5_1 => (8, Some(4)),
        _ => (2, None),
    }
}

/// Groups of eight rows, block by block, as the module documentation lays them out.
fn interleave(ty: GgmlType, rows: usize, cols: usize, src: &[u8]) -> Vec<u8> {
    let bb = ty.block_bytes();
    let nb = cols / QK;
    let row_bytes = nb * bb;
    let gb = GR * bb;
    let groups = rows.div_ceil(GR);
    let mut out = vec![0u8; groups * nb * gb];
    for (gi, rec) in out.chunks_exact_mut(gb).enumerate() {
        let (g, b) = (gi / nb, gi % nb);
        for lane in 0..GR {
            let r = g * GR + lane;
            if r < rows {
                put_block(ty, &src[r * row_bytes + b * bb..][..bb], lane, rec);
            }
        }
    }
    out
}

/// Writes GGUF block `blk` into lane `lane` of the interleaved record `rec`.
fn put_block(ty: GgmlType, blk: &[u8], lane: usize, rec: &mut [u8]) {
    rec[2 * lane..2 * lane + 2].copy_from_slice(&blk[0..2]);
    if has_min(ty) {
        rec[MIN_AT + 2 * lane..MIN_AT + 2 * lane + 2].copy_from_slice(&blk[2..4]);
    }
    let at = codes_at(ty);
    if ty == GgmlType::Q8_0 {
        for c in 0..8 {
            for t in 0..4 {
                rec[at + 32 * c + 4 * lane + t] = blk[2 + 4 * c + t] ^ 0x80;
            }
        }
        return;
    }
    let (qs, qh) = gguf_parts(ty);
    for v in 0..4 {
        rec[at + 32 * v + 4 * lane..][..4].copy_from_slice(&blk[qs + 4 * v..qs + 4 * v + 4]);
    }
    if let Some(qh) = qh {
        let bits = u32::from_le_bytes([blk[qh], blk[qh + 1], blk[qh + 2], blk[qh + 3]]);
        let hi = high_at(ty);
        for t in 0..4 {
            let mut byte = 0u8;
            for c in 0..8 {
                byte |= (((bits >> (4 * c + t)) & 1) as u8) << c;
            }
            rec[hi + 4 * lane + t] = byte;
        }
    }
}

/// The inverse of [`put_block`]: the GGUF block of lane `lane` of `rec`.
fn take_block(ty: GgmlType, rec: &[u8], lane: usize, blk: &mut [u8]) {
    blk[0..2].copy_from_slice(&rec[2 * lane..2 * lane + 2]);
    if has_min(ty) {
        blk[2..4].copy_from_slice(&rec[MIN_AT + 2 * lane..MIN_AT + 2 * lane + 2]);
    }
    let at = codes_at(ty);
    if ty == GgmlType::Q8_0 {
        for c in 0..8 {
            for t in 0..4 {
                blk[2 + 4 * c + t] = rec[at + 32 * c + 4 * lane + t] ^ 0x80;
            }
        }
        return;
    }
    let (qs, qh) = gguf_parts(ty);
    for v in 0..4 {
        blk[qs + 4 * v..qs + 4 * v + 4].copy_from_slice(&rec[at + 32 * v + 4 * lane..][..4]);
    }
    if let Some(qh) = qh {
        let hi = high_at(ty);
        let mut bits = 0u32;
        for t in 0..4 {
            let byte = rec[hi + 4 * lane + t];
            for c in 0..8 {
                bits |= (((byte >> c) & 1) as u32) << (4 * c + t);
            }
        }
        blk[qh..qh + 4].copy_from_slice(&bits.to_le_bytes());
    }
}

/// How activations are quantized for a weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    /// 32-element blocks with f32 `d`, `s = d · Σq` and the integer `Σq`.
    Q8Block,
    /// 256-element blocks with f32 `d` and sums of each 16 codes.
    Q8K,
}

impl ActKind {
    fn block(self) -> usize {
        match self {
            ActKind::Q8Block => QK,
            ActKind::Q8K => QK_K,
        }
    }
}

/// Activation rows quantized to 8 bits per block for one weight format.
#[derive(Clone, Debug)]
pub struct QuantizedRows {
    kind: ActKind,
    n: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    qsum: Vec<i32>,
    bsums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x` (`n` rows of `k`) for products with `w`; `k` must equal `w.cols()`.
    pub fn new(x: &[f32], n: usize, k: usize, w: &PackedMatrix) -> Result<Self> {
        if k != w.cols || x.len() != n * k {
            return Err(ModelError::InvalidInput(format!(
                "activations of {} values as {n} x {k} do not fit weights with {} columns",
                x.len(),
                w.cols
            )));
        }
        let kind = w.act_kind();
        let bl = kind.block();
        let blocks = n * k / bl;
        // Blocks are independent: rows go to the pool in chunks, each block by the same steps on every path.
        let vector = quant_simd();
        let mut qs = vec![0i8; n * k];
        let mut meta = vec![(0.0f32, 0i32); blocks];
        let rows_per_task = (QUANT_PAR_MIN / k.max(1)).max(1);
        let work = |xs: &[f32], qs: &mut [i8], meta: &mut [(f32, i32)]| {
            for ((xs, qs), meta) in xs.chunks_exact(bl).zip(qs.chunks_exact_mut(bl)).zip(meta.iter_mut()) {
                *meta = quantize_block(xs, qs, vector);
            }
        };
        if n * k < 2 * QUANT_PAR_MIN || k == 0 {
            work(x, &mut qs, &mut meta);
        } else {
            x.par_chunks(rows_per_task * k)
                .zip(qs.par_chunks_mut(rows_per_task * k).zip(meta.par_chunks_mut(rows_per_task * k / bl)))
                .for_each(|(xs, (qs, meta))| work(xs, qs, meta));
        }
        let d: Vec<f32> = meta.iter().map(|m| m.0).collect();
        let (s, qsum, bsums) = match kind {
            ActKind::Q8Block => {
                (meta.iter().map(|&(d, sum)| d * sum as f32).collect(), meta.iter().map(|m| m.1).collect(), Vec::new())
            }
            ActKind::Q8K => {
                (Vec::new(), Vec::new(), qs.chunks_exact(16).map(|c| c.iter().map(|&v| v as i32).sum()).collect())
            }
        };
        let q = QuantizedRows { kind, n, k, qs, d, s, qsum, bsums };
        Ok(q)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    /// The value row `i` stands for, dequantized (for error bounds in tests and studies).
    pub fn dequantize_row(&self, i: usize) -> Vec<f32> {
        let bl = self.kind.block();
        let per_row = self.k / bl;
        (0..self.k).map(|j| self.qs[i * self.k + j] as f32 * self.d[i * per_row + j / bl]).collect()
    }
}

/// Activation values per parallel quantization task (and half the size below which one thread does it all).
const QUANT_PAR_MIN: usize = 1 << 14;

/// Whether activation blocks are quantized with AVX2 (the same codes and scales as the scalar steps).
fn quant_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    if adaquant_kernels::simd::active() >= adaquant_kernels::simd::SimdLevel::Avx2 {
        return true;
    }
    false
}

/// One activation block: `d = max|x| / 127`, codes `round_ties_even(x / d)` clamped to ±127 into `qs`; returns
/// `(d, Σq)`. With `vector` (AVX2 detected) eight values at a time, the same steps.
fn quantize_block(xs: &[f32], qs: &mut [i8], vector: bool) -> (f32, i32) {
    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    #[cfg(target_arch = "x86_64")]
    if vector && id.is_finite() && xs.len().is_multiple_of(32) {
        // SAFETY: AVX2 was detected; `xs` and `qs` have the same length, a multiple of 32.
        return (d, unsafe { avx2::quantize_codes(xs, qs, id) });
    }
    let _ = vector;
    let mut sum = 0i32;
    for (o, &v) in qs.iter_mut().zip(xs) {
        let c = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        *o = c;
        sum += c as i32;
    }
    (d, sum)
}

/// `out[n][m] = x · Wᵀ` by the contract of the module documentation, on the fastest path this CPU has.
pub fn qmatmul_t(x: &QuantizedRows, w: &PackedMatrix, out: &mut [f32]) -> Result<()> {
    run(x, w, out, Kernel::detect())
}

/// The contract in scalar code: the bit-exact twin of [`qmatmul_t`].
pub fn qmatmul_t_ref(x: &QuantizedRows, w: &PackedMatrix, out: &mut [f32]) -> Result<()> {
    run(x, w, out, Kernel::Scalar)
}

/// Quantizes `x` and multiplies: the whole linear layer.
pub fn linear(x: &[f32], n: usize, w: &PackedMatrix, out: &mut [f32]) -> Result<()> {
    let q = QuantizedRows::new(x, n, w.cols, w)?;
    qmatmul_t(&q, w, out)
}

fn run(x: &QuantizedRows, w: &PackedMatrix, out: &mut [f32], kernel: Kernel) -> Result<()> {
    if x.k != w.cols || x.kind != w.act_kind() || out.len() != x.n * w.rows {
        return Err(ModelError::InvalidInput(format!(
            "product of {} x {} activations with {} x {} {:?} weights into {} outputs",
            x.n,
            x.k,
            w.rows,
            w.cols,
            w.ty,
            out.len()
        )));
    }
    let (n, m) = (x.n, w.rows);
    if n == 0 || m == 0 {
        return Ok(());
    }
    let row_blocks = n.div_ceil(MC);
    let col_blocks = m.div_ceil(NC);
    let dst = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * MC..((rb + 1) * MC).min(n);
        let cols = cb * NC..((cb + 1) * NC).min(m);
        // SAFETY: tasks cover disjoint rectangles of `out`, whose length was checked above; `cols` starts at a
        // multiple of NC, itself a multiple of GR, so it covers whole groups.
        unsafe { kernel.block(x, w, dst, rows, cols) };
    };
    if n * m * x.k < PAR_MIN_MACS {
        (0..row_blocks * col_blocks).for_each(task);
    } else {
        (0..row_blocks * col_blocks).into_par_iter().for_each(task);
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint elements from different tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `at` is in bounds of the buffer and no other thread writes it.
    #[inline]
    unsafe fn write(&self, at: usize, v: f32) {
        // SAFETY: as documented.
        unsafe { *self.0.add(at) = v };
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Scalar,
    /// AVX2, FMA and F16C: `vpmaddubsw` + `vpmaddwd` integer dots.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 VL and VNNI on 256-bit registers: `vpdpbusd` integer dots.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            use adaquant_kernels::simd::{active, SimdLevel};
            let level = active();
            if level >= SimdLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
                return Kernel::Vnni;
            }
            if level >= SimdLevel::Avx2 {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Computes `out[rows][cols]` (`out` is `x.n` by `w.rows`).
    ///
    /// # Safety
    /// `dst` points at the `x.n * w.rows` outputs, `rows` and `cols` are in bounds, `cols.start` is a multiple of
    /// `GR`, the kernel is available on this CPU, and no other thread writes this rectangle.
    unsafe fn block(self, x: &QuantizedRows, w: &PackedMatrix, dst: OutPtr, rows: Range, cols: Range) {
        let (k, m) = (x.k, w.rows);
        if !is_32(w.ty) {
            let nb = k / QK_K;
            for j in cols {
                let wr = w.row_bytes(j);
                for i in rows.clone() {
                    let d = &x.d[i * nb..(i + 1) * nb];
                    let bs = &x.bsums[i * (k / 16)..(i + 1) * (k / 16)];
                    let v = dot_k(w.ty, &wr, &x.qs[i * k..(i + 1) * k], d, bs);
                    // SAFETY: in bounds and ours (the caller's contract).
                    unsafe { dst.write(i * m + j, v) };
                }
            }
            return;
        }
        match self {
            Kernel::Scalar => {
                let nb = k / QK;
                for j in cols {
                    let wr = w.row_bytes(j);
                    for i in rows.clone() {
                        let (d, s) = (&x.d[i * nb..(i + 1) * nb], &x.s[i * nb..(i + 1) * nb]);
                        let v = dot_32_ref(w.ty, &wr, &x.qs[i * k..(i + 1) * k], d, s);
                        // SAFETY: in bounds and ours (the caller's contract).
                        unsafe { dst.write(i * m + j, v) };
                    }
                }
            }
            // SAFETY: the caller's contract; AVX2, FMA and F16C were detected.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::block_avx2(x, w, dst.0, rows, cols) },
            // SAFETY: the caller's contract; AVX-512 F/BW/VL, VNNI, AVX2, FMA and F16C were detected.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { avx2::block_vnni(x, w, dst.0, rows, cols) },
        }
    }
}

type Range = std::ops::Range<usize>;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The weight codes of one 32-element block with their offset removed, element order, plus `(d, min)`.
fn block_codes_32(ty: GgmlType, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut c = [0i32; QK];
    let nib = |qs: &[u8], c: &mut [i32; QK], off: i32| {
        for j in 0..16 {
            c[j] = (qs[j] & 0xF) as i32 - off;
            c[j + 16] = (qs[j] >> 4) as i32 - off;
        }
    };
    let high = |qh: u32, c: &mut [i32; QK]| {
        for (j, v) in c.iter_mut().enumerate() {
            *v += (((qh >> j) & 1) << 4) as i32;
        }
    };
    match ty {
        GgmlType::Q4_0 => {
            nib(&b[2..18], &mut c, 8);
            (c, f16_at(b, 0), 0.0)
        }
        GgmlType::Q4_1 => {
            nib(&b[4..20], &mut c, 0);
            (c, f16_at(b, 0), f16_at(b, 2))
        }
        GgmlType::Q5_0 => {
            nib(&b[6..22], &mut c, 0);
            high(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &mut c);
            for v in &mut c {
                *v -= 16;
            }
            (c, f16_at(b, 0), 0.0)
        }
        GgmlType::Q5_1 => {
            nib(&b[8..24], &mut c, 0);
            high(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &mut c);
            (c, f16_at(b, 0), f16_at(b, 2))
        }
        GgmlType::Q8_0 => {
            for j in 0..QK {
                c[j] = b[2 + j] as i8 as i32;
            }
            (c, f16_at(b, 0), 0.0)
        }
        _ => unreachable!("only 32-element formats reach here"),
    }
}

fn has_min(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// One element of a 32-element format by the contract, in scalar code, from the GGUF bytes of the weight row.
fn dot_32_ref(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0.0f32;
    let mut summ = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (c, dw, mw) = block_codes_32(ty, blk);
        let q = &qs[b * QK..(b + 1) * QK];
        let p: i32 = c.iter().zip(q).map(|(&c, &q)| c * q as i32).sum();
        acc = (dw * d[b]).mul_add(p as f32, acc);
        if has_min(ty) {
            summ = mw.mul_add(s[b], summ);
        }
    }
    if has_min(ty) {
        acc + summ
    } else {
        acc
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of Q4_K and Q5_K.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    let (a, b) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    };
    (a as i32, b as i32)
}

/// One element of a K-quant format by the contract (exact integers per super-block, then two fused steps).
fn dot_k(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], bsums: &[i32]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let q = &qs[b * QK_K..(b + 1) * QK_K];
        let bs = &bsums[b * 16..(b + 1) * 16];
        match ty {
            GgmlType::Q4K | GgmlType::Q5K => {
                let dw = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let (qh, ql) =
                    if ty == GgmlType::Q5K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
                let (mut isum, mut msum) = (0i32, 0i32);
                for sub in 0..8 {
                    let (sc, mn) = scale_min_k4(sub, scales);
                    let bytes = &ql[32 * (sub / 2)..32 * (sub / 2) + 32];
                    let shift = 4 * (sub % 2);
                    let mut p = 0i32;
                    for l in 0..32 {
                        let mut c = ((bytes[l] >> shift) & 0xF) as i32;
                        if let Some(qh) = qh {
                            c |= (((qh[l] >> sub) & 1) as i32) << 4;
                        }
                        p += c * q[32 * sub + l] as i32;
                    }
                    isum += sc * p;
                    msum += mn * (bs[2 * sub] + bs[2 * sub + 1]);
                }
                let dx = d[b];
                acc = (dw * dx).mul_add(isum as f32, acc);
                acc = (-(dmin * dx)).mul_add(msum as f32, acc);
            }
            GgmlType::Q6K => {
                let dw = f16_at(blk, 208);
                let mut isum = 0i32;
                for half in 0..2 {
                    let ql = &blk[64 * half..64 * half + 64];
                    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
                    let qo = &q[128 * half..128 * half + 128];
                    let mut sub = [0i32; 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let c1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let c2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let c3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let c4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        sub[is] += c1 * qo[l] as i32;
                        sub[is + 2] += c2 * qo[l + 32] as i32;
                        sub[is + 4] += c3 * qo[l + 64] as i32;
                        sub[is + 6] += c4 * qo[l + 96] as i32;
                    }
                    for t in 0..8 {
                        isum += (sc[t] as i8) as i32 * sub[t];
                    }
                }
                acc = (dw * d[b]).mul_add(isum as f32, acc);
            }
            _ => unreachable!("only K-quants reach here"),
        }
    }
    acc
}

/// The interleaved kernels (module docs): lanes are eight output rows, tiles of `RT` activation rows by `GT`
/// groups, one exact integer dot per element and block, then the contract's fused steps.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{codes_at, high_at, QuantizedRows, Range, GR, MIN_AT, QK};
    use crate::qgemm::PackedMatrix;
    use crate::quant::GgmlType;
    use std::arch::x86_64::*;

    /// Groups per tile of a single activation row (decoding, and the rows left after whole tiles).
    const GD: usize = 2;

    /// Format ids of the const parameter `F`.
    const F_Q4_0: u8 = 0;
    const F_Q4_1: u8 = 1;
    const F_Q5_0: u8 = 2;
    const F_Q5_1: u8 = 3;
    const F_Q8_0: u8 = 4;

    const fn ty_of(f: u8) -> GgmlType {
        match f {
            F_Q4_0 => GgmlType::Q4_0,
            F_Q4_1 => GgmlType::Q4_1,
            F_Q5_0 => GgmlType::Q5_0,
            F_Q5_1 => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        }
    }

    /// The codes `round_ties_even(x · id)` clamped to ±127 of `xs` into `qs`, 32 at a time; returns their sum.
    /// `id` is finite; NaN products become 0 and the rounding, clamp and conversion equal the scalar steps.
    ///
    /// # Safety
    /// AVX2 is available; `xs` and `qs` have the same length, a multiple of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_codes(xs: &[f32], qs: &mut [i8], id: f32) -> i32 {
        debug_assert!(xs.len() == qs.len() && xs.len().is_multiple_of(32));
        // SAFETY: every load and store below is inside `xs` and `qs` (32 values per step).
        unsafe {
            let idv = _mm256_set1_ps(id);
            let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let mut sum = _mm256_setzero_si256();
            let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (x, q) in xs.chunks_exact(32).zip(qs.chunks_exact_mut(32)) {
                let mut c = [_mm256_setzero_si256(); 4];
                for (t, c) in c.iter_mut().enumerate() {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * t)), idv);
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    // A NaN (from a NaN or infinite input) becomes code 0, as `NaN as i8` does.
                    let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
                    *c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
                    sum = _mm256_add_epi32(sum, *c);
                }
                let p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
                _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, _mm256_permutevar8x32_epi32(p, perm));
            }
            let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }
    }

    /// [`groups`] on AVX2: `vpmaddubsw` + `vpmaddwd` dots.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `out` holds `x.n * w.rows` outputs of which this call alone writes
    /// `rows x cols`; `rows` are rows of `x`, `cols` rows of `w` starting at a multiple of eight; `w` is 32-element.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_avx2(x: &QuantizedRows, w: &PackedMatrix, out: *mut f32, rows: Range, cols: Range) {
        // SAFETY: as documented.
        unsafe {
            match w.ty {
                GgmlType::Q4_0 => groups::<F_Q4_0, false>(x, w, out, rows, cols),
                GgmlType::Q4_1 => groups::<F_Q4_1, false>(x, w, out, rows, cols),
                GgmlType::Q5_0 => groups::<F_Q5_0, false>(x, w, out, rows, cols),
                GgmlType::Q5_1 => groups::<F_Q5_1, false>(x, w, out, rows, cols),
                _ => groups::<F_Q8_0, false>(x, w, out, rows, cols),
            }
        }
    }

    /// [`groups`] with AVX-512 VNNI: `vpdpbusd` dots on 256-bit registers.
    ///
    /// # Safety
    /// As [`block_avx2`], and AVX-512 F/BW/VL and VNNI are available.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn block_vnni(x: &QuantizedRows, w: &PackedMatrix, out: *mut f32, rows: Range, cols: Range) {
        // SAFETY: as documented.
        unsafe {
            match w.ty {
                GgmlType::Q4_0 => groups::<F_Q4_0, true>(x, w, out, rows, cols),
                GgmlType::Q4_1 => groups::<F_Q4_1, true>(x, w, out, rows, cols),
                GgmlType::Q5_0 => groups::<F_Q5_0, true>(x, w, out, rows, cols),
                GgmlType::Q5_1 => groups::<F_Q5_1, true>(x, w, out, rows, cols),
                _ => groups::<F_Q8_0, true>(x, w, out, rows, cols),
            }
        }
    }

    /// Walks the rectangle in tiles of `RT` activation rows by `GT` groups: eight rows by one group for the
    /// 4- and 5-bit formats (the unpacked nibbles serve eight rows), four rows by two groups for Q8_0 (nothing to
    /// unpack, one broadcast serves two groups); measured on SmolLM2's shapes.
    #[inline(always)]
    unsafe fn groups<const F: u8, const V: bool>(
        x: &QuantizedRows,
        w: &PackedMatrix,
        out: *mut f32,
        rows: Range,
        cols: Range,
    ) {
        // SAFETY: the callers' contract.
        unsafe {
            if F == F_Q8_0 {
                walk::<F, V, 4, 2>(x, w, out, rows, cols)
            } else {
                walk::<F, V, 8, 1>(x, w, out, rows, cols)
            }
        }
    }

    /// Whole tiles of `RT` rows by `GT` groups (then single groups), then the rows left one at a time by `GD`
    /// groups (then single groups). Every element follows the same steps in every tile shape.
    #[inline(always)]
    unsafe fn walk<const F: u8, const V: bool, const RT: usize, const GT: usize>(
        x: &QuantizedRows,
        w: &PackedMatrix,
        out: *mut f32,
        rows: Range,
        cols: Range,
    ) {
        let (g_start, g_end) = (cols.start / GR, cols.end.div_ceil(GR));
        let full = rows.start + (rows.end - rows.start) / RT * RT;
        // SAFETY: the callers' contract covers every tile below (rows and groups in bounds).
        unsafe {
            let mut g = g_start;
            while g < g_end {
                let wide = g + GT <= g_end;
                for i in (rows.start..full).step_by(RT) {
                    if wide {
                        tile::<F, V, RT, GT>(x, w, out, i, g);
                    } else {
                        tile::<F, V, RT, 1>(x, w, out, i, g);
                    }
                }
                g += if wide { GT } else { 1 };
            }
            for i in full..rows.end {
                let mut g = g_start;
                while g + GD <= g_end {
                    tile::<F, V, 1, GD>(x, w, out, i, g);
                    g += GD;
                }
                while g < g_end {
                    tile::<F, V, 1, 1>(x, w, out, i, g);
                    g += 1;
                }
            }
        }
    }

    /// The two code vectors of pair `v` (0..4) of one record: elements `4v..4v + 4` and `16 + 4v..16 + 4v + 4` of
    /// the eight rows, unsigned with their offset (with `V`), or for Q8_0 without `V` signed with none.
    #[inline(always)]
    unsafe fn pair<const F: u8, const V: bool>(rec: *const u8, v: usize) -> (__m256i, __m256i) {
        // SAFETY: `rec` points at one whole record of format `F` (the callers' contract).
        unsafe {
            let ty = ty_of(F);
            let at = rec.add(codes_at(ty));
            if F == F_Q8_0 {
                let a = _mm256_loadu_si256(at.add(32 * v) as *const __m256i);
                let b = _mm256_loadu_si256(at.add(32 * (v + 4)) as *const __m256i);
                if V {
                    return (a, b);
                }
                let flip = _mm256_set1_epi8(-128);
                return (_mm256_xor_si256(a, flip), _mm256_xor_si256(b, flip));
            }
            let low4 = _mm256_set1_epi8(0x0F);
            let n = _mm256_loadu_si256(at.add(32 * v) as *const __m256i);
            let mut lo = _mm256_and_si256(n, low4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(n), low4);
            if F == F_Q5_0 || F == F_Q5_1 {
                // Bit c of the high bytes is the fifth bit of chunk c; move bits v and v + 4 to bit 4.
                let h = _mm256_loadu_si256(rec.add(high_at(ty)) as *const __m256i);
                let bit4 = _mm256_set1_epi8(0x10);
                let lo_h = _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - v as i32));
                let hi_h = _mm256_srl_epi16(h, _mm_cvtsi32_si128(v as i32));
                lo = _mm256_or_si256(lo, _mm256_and_si256(lo_h, bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(hi_h, bit4));
            }
            (lo, hi)
        }
    }

    /// `acc` plus the exact 4-element dots of chunk `a` with broadcast activations `qa` and of `b` with `qb`, per
    /// 32-bit lane.
    #[inline(always)]
    unsafe fn dot2<const F: u8, const V: bool>(
        acc: __m256i,
        a: __m256i,
        qa: __m256i,
        b: __m256i,
        qb: __m256i,
    ) -> __m256i {
        // SAFETY: the callers enable the target features (VNNI only with `V`).
        unsafe {
            if V {
                return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, a, qa), b, qb);
            }
            let ones = _mm256_set1_epi16(1);
            if F == F_Q8_0 {
                // Signed codes: |w| times q with w's sign; each pair sum stays within ±2 · 128 · 127 < 2^15.
                let pa = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(qa, a));
                let pb = _mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(qb, b));
                return _mm256_add_epi32(
                    acc,
                    _mm256_add_epi32(_mm256_madd_epi16(pa, ones), _mm256_madd_epi16(pb, ones)),
                );
            }
            // Codes below 32: the four products of a 16-bit pair sum stay within ±4 · 31 · 127 < 2^15.
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(a, qa), _mm256_maddubs_epi16(b, qb));
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones))
        }
    }

    /// Activation rows `i0..i0 + R` against groups `g0..g0 + G` (weight rows `8 g0..8 (g0 + G)`, those past
    /// `w.rows` not written), each element by the contract.
    ///
    /// # Safety
    /// The features of `V` are enabled; the rows and groups exist; `out` is `x.n` by `w.rows` and this tile is
    /// the caller's to write.
    #[inline(always)]
    unsafe fn tile<const F: u8, const V: bool, const R: usize, const G: usize>(
        x: &QuantizedRows,
        w: &PackedMatrix,
        out: *mut f32,
        i0: usize,
        g0: usize,
    ) {
        let ty = ty_of(F);
        let min = F == F_Q4_1 || F == F_Q5_1;
        let off: i32 = match F {
            F_Q4_0 => 8,
            F_Q5_0 => 16,
            F_Q8_0 if V => 128,
            _ => 0,
        };
        let k = x.k;
        let nb = k / QK;
        let rb = GR * ty.block_bytes();
        let m = w.rows;
        debug_assert!(i0 + R <= x.n && (g0 + G) * rb * nb <= w.data.len());
        // SAFETY: record `(g0 + g) * nb + b` of `w` and block `b` of rows `i0..i0 + R` of `x` exist (the callers'
        // contract); the stores below stay inside rows `i0..i0 + R` and columns `8 g0..min(8 (g0 + G), m)`.
        unsafe {
            let wd = w.data.as_ptr();
            let qs = x.qs.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); G]; R];
            let mut summ = [[_mm256_setzero_ps(); G]; R];
            for b in 0..nb {
                let mut rec = [wd; G];
                for (g, r) in rec.iter_mut().enumerate() {
                    *r = wd.add(((g0 + g) * nb + b) * rb);
                }
                let mut idot = [[_mm256_setzero_si256(); G]; R];
                for v in 0..4 {
                    let mut codes = [(_mm256_setzero_si256(), _mm256_setzero_si256()); G];
                    for g in 0..G {
                        codes[g] = pair::<F, V>(rec[g], v);
                    }
                    for r in 0..R {
                        let q = qs.add((i0 + r) * k + b * QK + 4 * v);
                        let qa = _mm256_set1_epi32((q as *const i32).read_unaligned());
                        let qb = _mm256_set1_epi32((q.add(16) as *const i32).read_unaligned());
                        for g in 0..G {
                            idot[r][g] = dot2::<F, V>(idot[r][g], codes[g].0, qa, codes[g].1, qb);
                        }
                    }
                }
                for g in 0..G {
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec[g] as *const __m128i));
                    for r in 0..R {
                        let xb = (i0 + r) * nb + b;
                        let mut p = idot[r][g];
                        if off != 0 {
                            p = _mm256_sub_epi32(p, _mm256_set1_epi32(off * *x.qsum.get_unchecked(xb)));
                        }
                        // The same f32 product as the scalar `dw * dx`, lane by lane.
                        let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xb)));
                        acc[r][g] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[r][g]);
                    }
                }
            }
            // The minimums' chain is separate from `acc`, so a second pass over the blocks gives the same
            // values and leaves the registers of the first to the integer dots.
            if min {
                for b in 0..nb {
                    for g in 0..G {
                        let rec = wd.add(((g0 + g) * nb + b) * rb);
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(MIN_AT) as *const __m128i));
                        for r in 0..R {
                            let xs = _mm256_set1_ps(*x.s.get_unchecked((i0 + r) * nb + b));
                            summ[r][g] = _mm256_fmadd_ps(mw, xs, summ[r][g]);
                        }
                    }
                }
            }
            for r in 0..R {
                for g in 0..G {
                    let v = if min { _mm256_add_ps(acc[r][g], summ[r][g]) } else { acc[r][g] };
                    let j0 = (g0 + g) * GR;
                    let at = out.add((i0 + r) * m + j0);
                    if j0 + GR <= m {
                        _mm256_storeu_ps(at, v);
                    } else {
                        let mut t = [0.0f32; GR];
                        _mm256_storeu_ps(t.as_mut_ptr(), v);
                        std::ptr::copy_nonoverlapping(t.as_ptr(), at, m - j0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const TYPES: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Random but well-formed blocks: f16 scales drawn in a sane range, every other byte random.
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut StdRng) -> PackedMatrix {
        let bytes = ty.bytes_for(cols).unwrap() * rows;
        let mut data: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
        let bb = ty.block_bytes();
        for blk in data.chunks_exact_mut(bb) {
            let mut put = |at: usize, v: f32| blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            let a = rng.random_range(0.001f32..0.05);
            let m = rng.random_range(-0.5f32..0.5);
            match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put(0, a),
                GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    put(0, a);
                    put(2, m);
                }
                GgmlType::Q4K | GgmlType::Q5K => {
                    put(0, a / 16.0);
                    put(2, m.abs() / 16.0);
                }
                GgmlType::Q6K => put(208, a / 16.0),
                _ => unreachable!(),
            }
        }
        PackedMatrix::new(ty, rows, cols, data).unwrap()
    }

    fn random_acts(n: usize, k: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n * k)
            .map(|i| {
                let v: f32 = rng.random_range(-1.0..1.0);
                // A few large outliers, as real activations have, and some exact zeros.
                if i % 97 == 5 {
                    v * 40.0
                } else if i % 61 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Every kernel this CPU can run, the scalar contract first.
    fn kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use adaquant_kernels::simd::{detected, SimdLevel};
            if detected() >= SimdLevel::Avx2 {
                v.push(Kernel::Avx2);
            }
            if detected() >= SimdLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
                v.push(Kernel::Vnni);
            }
        }
        v
    }

    /// Each kernel level (AVX2, AVX-512 VNNI where the CPU has them, and whatever `qmatmul_t` picks) against the
    /// scalar contract, on sizes that leave partial groups of eight weight rows, partial tiles of activation rows
    /// and partial parallel tasks.
    #[test]
    fn fast_path_equals_the_scalar_contract_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        let sizes = [(1, 1, 1), (3, 37, 3), (17, 5, 2), (1, 70, 6), (33, 29, 1), (9, 131, 2), (38, 67, 3), (5, 16, 4)];
        for ty in TYPES {
            let be = ty.block_elems();
            for (n, m, blocks) in sizes {
                let k = blocks * be;
                let w = random_matrix(ty, m, k, &mut rng);
                let x = random_acts(n, k, &mut rng);
                let q = QuantizedRows::new(&x, n, k, &w).unwrap();
                let mut slow = vec![0.0; n * m];
                qmatmul_t_ref(&q, &w, &mut slow).unwrap();
                let mut fast = vec![0.0; n * m];
                qmatmul_t(&q, &w, &mut fast).unwrap();
                for (a, b) in fast.iter().zip(&slow) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} n={n} m={m} k={k}: {a} vs {b}");
                }
                for kernel in kernels() {
                    let mut fast = vec![f32::NAN; n * m];
                    run(&q, &w, &mut fast, kernel).unwrap();
                    for (e, (a, b)) in fast.iter().zip(&slow).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{kernel:?} {ty:?} n={n} m={m} k={k} [{e}]: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The interleaved layout gives back every row's GGUF bytes, padding rows and all.
    #[test]
    fn interleaving_keeps_every_row() {
        let mut rng = StdRng::seed_from_u64(15);
        for ty in TYPES {
            for (m, blocks) in [(1, 1), (8, 2), (13, 3), (17, 1)] {
                let k = blocks * ty.block_elems();
                let bytes = ty.bytes_for(k).unwrap();
                let data: Vec<u8> = (0..bytes * m).map(|_| rng.random()).collect();
                let w = PackedMatrix::new(ty, m, k, data.clone()).unwrap();
                for r in 0..m {
                    assert_eq!(w.row_bytes(r), &data[r * bytes..(r + 1) * bytes], "{ty:?} m={m} row {r}");
                }
                let mut flat = vec![0.0; m * k];
                dequantize(ty, &data, &mut flat);
                let same = w.dequantize().iter().zip(&flat).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} m={m}");
            }
        }
    }

    /// Against an f64 product of the dequantized weights with the dequantized activations: the integer path
    /// must give the same number up to f32 rounding of its float steps.
    #[test]
    fn product_equals_the_f64_product_of_what_the_codes_stand_for() {
        let mut rng = StdRng::seed_from_u64(12);
        for ty in TYPES {
            let k = 3 * ty.block_elems();
            let (n, m) = (4, 23);
            let w = random_matrix(ty, m, k, &mut rng);
            let x = random_acts(n, k, &mut rng);
            let q = QuantizedRows::new(&x, n, k, &w).unwrap();
            let mut out = vec![0.0; n * m];
            qmatmul_t(&q, &w, &mut out).unwrap();
            for i in 0..n {
                let xq = q.dequantize_row(i);
                for j in 0..m {
                    let wr = w.dequantize_row(j);
                    let exact: f64 = xq.iter().zip(&wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = xq.iter().zip(&wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let got = out[i * m + j] as f64;
                    // The f32 steps (scale products, per-block fused adds, the dequantized weights' own rounding)
                    // each lose at most a few ulps of the running magnitude.
                    let tol = 1e-5 * mag + 1e-6;
                    assert!((got - exact).abs() <= tol, "{ty:?} ({i},{j}): {got} vs {exact} (tol {tol})");
                }
            }
        }
    }

    /// The activation rounding error is what the integer path adds over an f32 product: at most half a step of
    /// each activation block against every weight.
    #[test]
    fn activation_quantization_error_is_bounded_by_half_a_step() {
        let mut rng = StdRng::seed_from_u64(13);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q6K] {
            let k = 2 * ty.block_elems();
            let w = random_matrix(ty, 9, k, &mut rng);
            let x = random_acts(3, k, &mut rng);
            let q = QuantizedRows::new(&x, 3, k, &w).unwrap();
            for i in 0..3 {
                let xq = q.dequantize_row(i);
                let bl = ty.block_elems().max(QK);
                for (b, (xs, ys)) in x[i * k..(i + 1) * k].chunks(bl).zip(xq.chunks(bl)).enumerate() {
                    let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let half_step = amax / 127.0 / 2.0;
                    for (a, b2) in xs.iter().zip(ys) {
                        assert!((a - b2).abs() <= half_step * (1.0 + 1e-5), "{ty:?} block {b}: {a} vs {b2}");
                    }
                }
            }
            let mut out = vec![0.0; 3 * 9];
            qmatmul_t(&q, &w, &mut out).unwrap();
            let wf = w.dequantize();
            for i in 0..3 {
                for j in 0..9 {
                    let wr = &wf[j * k..(j + 1) * k];
                    let xr = &x[i * k..(i + 1) * k];
                    let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let bound: f64 = xr
                        .chunks(ty.block_elems())
                        .zip(wr.chunks(ty.block_elems()))
                        .map(|(xs, ws)| {
                            let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                            ws.iter().map(|&v| v.abs() as f64).sum::<f64>() * amax / 254.0
                        })
                        .sum::<f64>()
                        * 1.001
                        + 1e-4;
                    let got = out[i * 9 + j] as f64;
                    assert!((got - exact).abs() <= bound, "{ty:?} ({i},{j}): {got} vs {exact}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn every_row_is_the_same_alone_and_in_a_batch() {
        let mut rng = StdRng::seed_from_u64(14);
        // The second size is quantized by several parallel tasks.
        for (ty, blocks, n) in
            TYPES.iter().map(|&t| (t, 2, 40)).chain([(GgmlType::Q4_1, 8, 130), (GgmlType::Q6K, 2, 70)])
        {
            let k = blocks * ty.block_elems();
            let m = 67;
            let w = random_matrix(ty, m, k, &mut rng);
            let x = random_acts(n, k, &mut rng);
            let mut all = vec![0.0; n * m];
            linear(&x, n, &w, &mut all).unwrap();
            for i in [0, 13, 39, n - 1] {
                let mut one = vec![0.0; m];
                linear(&x[i * k..(i + 1) * k], 1, &w, &mut one).unwrap();
                for j in 0..m {
                    assert_eq!(one[j].to_bits(), all[i * m + j].to_bits(), "{ty:?} row {i} col {j}");
                }
            }
        }
    }

    /// The AVX2 activation quantization gives the scalar codes, scales and sums, odd values included.
    #[test]
    fn activation_quantization_is_the_same_on_every_path() {
        let mut rng = StdRng::seed_from_u64(16);
        for bl in [QK, QK_K] {
            let mut x = random_acts(40, bl, &mut rng);
            x[3 * bl..4 * bl].fill(0.0);
            x[5 * bl..6 * bl].iter_mut().for_each(|v| *v *= 1e-38);
            x[7 * bl + 3] = f32::NAN;
            x[8 * bl + 1] = f32::INFINITY;
            x[9 * bl..10 * bl].iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 16.0) * 0.5);
            for (b, xs) in x.chunks_exact(bl).enumerate() {
                let (mut a, mut v) = (vec![0i8; bl], vec![0i8; bl]);
                let ra = quantize_block(xs, &mut a, false);
                let rv = quantize_block(xs, &mut v, quant_simd());
                assert_eq!((ra.0.to_bits(), ra.1), (rv.0.to_bits(), rv.1), "block {b} of {bl}");
                assert_eq!(a, v, "block {b} of {bl}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(PackedMatrix::new(GgmlType::Q4_1, 2, 33, vec![0; 40]).is_err());
        assert!(PackedMatrix::new(GgmlType::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(PackedMatrix::new(GgmlType::F32, 2, 32, vec![0; 256]).is_err());
        let w = PackedMatrix::new(GgmlType::Q4_1, 2, 32, vec![0; 40]).unwrap();
        assert!(QuantizedRows::new(&[0.0; 31], 1, 31, &w).is_err());
        let q = QuantizedRows::new(&[0.5; 32], 1, 32, &w).unwrap();
        assert!(qmatmul_t(&q, &w, &mut [0.0; 3]).is_err());
    }
}
