//! Linear layers whose weights stay in their GGUF block formats: `out = x · Wᵀ` with the activations `x`
//! quantized to 8 bits per block and integer dot products inside each block, as llama.cpp does
//! (ggml-cpu `quants.c`, `ggml_vec_dot_q4_1_q8_1` and friends, ggml commit d99724f2).
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
//! 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), for one output element:
//! 1. eight f32 lane accumulators and one f32 `summ` start at zero;
//! 2. for each block `b` in order, lane `l` takes the exact integer `p_l = Σ_{j=4l}^{4l+3} w_j · q_j` (weight codes
//!    with their offset removed: `c - 8` for Q4_0, `c - 16` for Q5_0, `c` for Q4_1, Q5_1 and Q8_0) and does
//!    `acc[l] = fma(dw_b · dx_b, p_l, acc[l])`; formats with a minimum also do `summ = fma(mw_b, s_b, summ)`;
//! 3. the result is `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)) + summ`.
//!
//! K-quants (Q4_K, Q5_K, Q6_K), for one output element: for each super-block in order, the exact integers
//! `I = Σ_sub scale_sub · Σ w·q` (and for Q4_K/Q5_K `M = Σ_sub min_sub · Σ q`) are formed, then
//! `acc = fma(dw · dx, I, acc)` and `acc = fma(-(dminw · dx), M, acc)`.
//!
//! [`qmatmul_t_ref`] spells the contract out in scalar code; the AVX2 kernels must equal it bit for bit, and the
//! tests check that on awkward sizes, and check both against an f64 product over the dequantized weights.

use crate::quant::{dequantize, GgmlType, QK_K};
use crate::{ModelError, Result};
use half::f16;
use rayon::prelude::*;

/// Elements of a 32-element block.
const QK: usize = 32;
/// Lanes of one f32 accumulator register.
const LANES: usize = 8;
/// Activation rows per parallel task.
const MC: usize = 16;
/// Weight rows per parallel task.
const NC: usize = 32;
/// Below this many multiply-adds one thread is faster than waking the pool.
const PAR_MIN_MACS: usize = 1 << 17;

/// A weight matrix `[rows][cols]` (output features by input features) held in one ggml block format.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Wraps `data`, `rows` rows of `cols` elements each in format `ty`.
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
        Ok(PackedMatrix { ty, rows, cols, row_bytes, data })
    }

    /// Whether `ty` has an integer-dot product here.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q5K
                | GgmlType::Q6K
        )
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

    /// Bytes the matrix holds.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` dequantized to f32.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.cols];
        dequantize(self.ty, self.row(r), &mut out);
        out
    }

    /// The whole matrix dequantized to f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        dequantize(self.ty, &self.data, &mut out);
        out
    }

    /// The activation format this weight format multiplies with.
    fn act_kind(&self) -> ActKind {
        match self.ty {
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => ActKind::Q8K,
            _ => ActKind::Q8Block,
        }
    }
}

/// How activations are quantized for a weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    /// 32-element blocks with f32 `d` and `s = d · Σq`.
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
        let mut q = QuantizedRows {
            kind,
            n,
            k,
            qs: vec![0; n * k],
            d: vec![0.0; blocks],
            s: vec![0.0; if kind == ActKind::Q8Block { blocks } else { 0 }],
            bsums: vec![0; if kind == ActKind::Q8K { n * k / 16 } else { 0 }],
        };
        for (b, (xs, qs)) in x.chunks_exact(bl).zip(q.qs.chunks_exact_mut(bl)).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (o, &v) in qs.iter_mut().zip(xs) {
                let c = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                *o = c;
                sum += c as i32;
            }
            q.d[b] = d;
            match kind {
                ActKind::Q8Block => q.s[b] = d * sum as f32,
                ActKind::Q8K => {
                    for (t, c) in qs.chunks_exact(16).enumerate() {
                        q.bsums[b * (QK_K / 16) + t] = c.iter().map(|&v| v as i32).sum();
                    }
                }
            }
        }
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
        for j in cb * NC..((cb + 1) * NC).min(m) {
            let mut i = rows.start;
            #[cfg(target_arch = "x86_64")]
            if kernel == Kernel::Avx2 && x.kind == ActKind::Q8Block {
                // Four activation rows share each unpacked weight block; every element keeps its own order.
                while i + 4 <= rows.end {
                    // SAFETY: AVX2 and FMA were detected; rows i..i + 4 exist and hold whole blocks.
                    let v = unsafe { avx2::rows::<4>(w.ty, w.row(j), x, i) };
                    for (r, v) in v.into_iter().enumerate() {
                        // SAFETY: tasks cover disjoint rectangles of `out`, whose length was checked above.
                        unsafe { dst.write((i + r) * m + j, v) };
                    }
                    i += 4;
                }
            }
            while i < rows.end {
                let v = kernel.dot(x, i, w, j);
                // SAFETY: as above.
                unsafe { dst.write(i * m + j, v) };
                i += 1;
            }
        }
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
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if adaquant_kernels::simd::active() >= adaquant_kernels::simd::SimdLevel::Avx2 {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// One output element: activation row `i` with weight row `j`.
    #[inline]
    fn dot(self, x: &QuantizedRows, i: usize, w: &PackedMatrix, j: usize) -> f32 {
        let k = x.k;
        let qs = &x.qs[i * k..(i + 1) * k];
        let wr = w.row(j);
        match w.ty {
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                let nb = k / QK_K;
                let d = &x.d[i * nb..(i + 1) * nb];
                let bs = &x.bsums[i * (k / 16)..(i + 1) * (k / 16)];
                dot_k(w.ty, wr, qs, d, bs)
            }
            _ => {
                let nb = k / QK;
                let d = &x.d[i * nb..(i + 1) * nb];
                let s = &x.s[i * nb..(i + 1) * nb];
                match self {
                    Kernel::Scalar => dot_32_ref(w.ty, wr, qs, d, s),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 and FMA were detected; the slices hold whole blocks of the same count.
                    Kernel::Avx2 => unsafe { avx2::rows::<1>(w.ty, wr, x, i)[0] },
                }
            }
        }
    }
}

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

fn reduce_lanes(a: &[f32; LANES]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let t = [s[0] + s[2], s[1] + s[3]];
    t[0] + t[1]
}

/// One element of a 32-element format by the contract, in scalar code.
fn dot_32_ref(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = [0.0f32; LANES];
    let mut summ = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (c, dw, mw) = block_codes_32(ty, blk);
        let q = &qs[b * QK..(b + 1) * QK];
        let dd = dw * d[b];
        for l in 0..LANES {
            let p: i32 = (4 * l..4 * l + 4).map(|j| c[j] * q[j] as i32).sum();
            acc[l] = dd.mul_add(p as f32, acc[l]);
        }
        if has_min(ty) {
            summ = mw.mul_add(s[b], summ);
        }
    }
    reduce_lanes(&acc) + summ
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, QK};
    use crate::quant::GgmlType;
    use std::arch::x86_64::*;

    /// The 32 weight codes of one block as bytes in element order (unsigned, offset not removed) and the offset.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn codes(ty: GgmlType, b: *const u8) -> (__m256i, i8) {
        // SAFETY: `b` points at one whole block of `ty` (the caller iterates whole blocks).
        unsafe {
            let low4 = _mm256_set1_epi8(0x0F);
            let nibbles = |p: *const u8| {
                let v = _mm_loadu_si128(p as *const __m128i);
                let hi = _mm_srli_epi16(v, 4);
                _mm256_and_si256(_mm256_set_m128i(hi, v), low4)
            };
            // Bit j of `qh` becomes 16 in byte j.
            let fifth = |qh: u32| {
                let v = _mm256_set1_epi32(qh as i32);
                let idx = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
                let bytes = _mm256_shuffle_epi8(v, idx);
                let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(16))
            };
            let qh_at = |p: *const u8| u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
            match ty {
                GgmlType::Q4_0 => (nibbles(b.add(2)), 8),
                GgmlType::Q4_1 => (nibbles(b.add(4)), 0),
                GgmlType::Q5_0 => (_mm256_or_si256(nibbles(b.add(6)), fifth(qh_at(b.add(2)))), 16),
                GgmlType::Q5_1 => (_mm256_or_si256(nibbles(b.add(8)), fifth(qh_at(b.add(4)))), 0),
                _ => (_mm256_loadu_si256(b.add(2) as *const __m256i), 0),
            }
        }
    }

    /// Format ids of [`dot_32_rows`]' const parameter.
    pub(super) const F_Q4_0: u8 = 0;
    pub(super) const F_Q4_1: u8 = 1;
    pub(super) const F_Q5_0: u8 = 2;
    pub(super) const F_Q5_1: u8 = 3;
    pub(super) const F_Q8_0: u8 = 4;

    /// The const format id of a 32-element format.
    pub(super) fn fmt_id(ty: GgmlType) -> u8 {
        match ty {
            GgmlType::Q4_0 => F_Q4_0,
            GgmlType::Q4_1 => F_Q4_1,
            GgmlType::Q5_0 => F_Q5_0,
            GgmlType::Q5_1 => F_Q5_1,
            _ => F_Q8_0,
        }
    }

    /// [`dot_32_rows`] for the format `ty`, chosen at run time.
    ///
    /// # Safety
    /// As [`dot_32_rows`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows<const R: usize>(ty: GgmlType, w: &[u8], x: &super::QuantizedRows, i0: usize) -> [f32; R] {
        // SAFETY: as documented.
        unsafe {
            match fmt_id(ty) {
                F_Q4_0 => dot_32_rows::<F_Q4_0, R>(w, x, i0),
                F_Q4_1 => dot_32_rows::<F_Q4_1, R>(w, x, i0),
                F_Q5_0 => dot_32_rows::<F_Q5_0, R>(w, x, i0),
                F_Q5_1 => dot_32_rows::<F_Q5_1, R>(w, x, i0),
                _ => dot_32_rows::<F_Q8_0, R>(w, x, i0),
            }
        }
    }

    /// `R` elements of one weight row against activation rows `i0..i0 + R`, each by the contract: the weight
    /// block is unpacked once for all `R` rows. `F` is the format id ([`fmt_id`]), so every branch on the format
    /// is resolved at compile time.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; rows `i0..i0 + R` of `x` exist and `w` is one row of format `F` with `x.k`
    /// elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_32_rows<const F: u8, const R: usize>(
        w: &[u8],
        x: &super::QuantizedRows,
        i0: usize,
    ) -> [f32; R] {
        // SAFETY: as documented.
        unsafe { rows_body::<F, R>(w, x, i0) }
    }

    /// The body of [`dot_32_rows`].
    #[inline(always)]
    unsafe fn rows_body<const F: u8, const R: usize>(w: &[u8], x: &super::QuantizedRows, i0: usize) -> [f32; R] {
        // SAFETY: the callers enable the target features the intrinsics need and uphold their documented bounds.
        #[allow(unused_unsafe)]
        unsafe {
            let ty = match F {
                F_Q4_0 => GgmlType::Q4_0,
                F_Q4_1 => GgmlType::Q4_1,
                F_Q5_0 => GgmlType::Q5_0,
                F_Q5_1 => GgmlType::Q5_1,
                _ => GgmlType::Q8_0,
            };
            let bb = ty.block_bytes();
            let nb = w.len() / bb;
            let k = x.k;
            debug_assert!(x.n >= i0 + R && nb * QK == k && x.d.len() >= (i0 + R) * nb);
            let min = F == F_Q4_1 || F == F_Q5_1;
            let off: i8 = match F {
                F_Q4_0 => 8,
                F_Q5_0 => 16,
                _ => 0,
            };
            let ones = _mm256_set1_epi16(1);
            let offv = _mm256_set1_epi8(off);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut summ = [0.0f32; R];
            let qs = x.qs.as_ptr();
            let xd = x.d.as_ptr();
            let xs = x.s.as_ptr();
            for b in 0..nb {
                // SAFETY: block `b` of `w`, and block `b` of rows `i0..i0 + R` of `x`, exist (checked by the caller).
                unsafe {
                    let blk = w.as_ptr().add(b * bb);
                    let dwv = _mm256_set1_ps(f16_at(w, b * bb));
                    let mw = if min { f16_at(w, b * bb + 2) } else { 0.0 };
                    let raw =
                        if F == F_Q8_0 { _mm256_loadu_si256(blk.add(2) as *const __m256i) } else { codes(ty, blk).0 };
                    let c = if F == F_Q8_0 { _mm256_sign_epi8(raw, raw) } else { raw };
                    for r in 0..R {
                        let row = i0 + r;
                        let q = _mm256_loadu_si256(qs.add(row * k + b * QK) as *const __m256i);
                        let p32 = {
                            let p16 = if F == F_Q8_0 {
                                _mm256_maddubs_epi16(c, _mm256_sign_epi8(q, raw))
                            } else if off != 0 {
                                _mm256_sub_epi16(_mm256_maddubs_epi16(c, q), _mm256_maddubs_epi16(offv, q))
                            } else {
                                _mm256_maddubs_epi16(c, q)
                            };
                            _mm256_madd_epi16(p16, ones)
                        };
                        let xb = row * nb + b;
                        // The same f32 product as the scalar `dw * dx`, formed in a vector register.
                        let dd = _mm256_mul_ps(dwv, _mm256_broadcast_ss(&*xd.add(xb)));
                        acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p32), acc[r]);
                        if min {
                            summ[r] = mw.mul_add(*xs.add(xb), summ[r]);
                        }
                    }
                }
            }
            let mut out = [0.0f32; R];
            for r in 0..R {
                out[r] = reduce(acc[r]) + summ[r];
            }
            out
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce(acc: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(lo, hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
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

    #[test]
    fn fast_path_equals_the_scalar_contract_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        for ty in TYPES {
            let be = ty.block_elems();
            for (n, m, blocks) in [(1, 1, 1), (3, 37, 3), (17, 5, 2), (1, 70, 6), (33, 29, 1)] {
                let k = blocks * be;
                let w = random_matrix(ty, m, k, &mut rng);
                let x = random_acts(n, k, &mut rng);
                let q = QuantizedRows::new(&x, n, k, &w).unwrap();
                let mut fast = vec![0.0; n * m];
                let mut slow = vec![0.0; n * m];
                qmatmul_t(&q, &w, &mut fast).unwrap();
                qmatmul_t_ref(&q, &w, &mut slow).unwrap();
                for (a, b) in fast.iter().zip(&slow) {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} n={n} m={m} k={k}: {a} vs {b}");
                }
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
        for ty in TYPES {
            let k = 2 * ty.block_elems();
            let (n, m) = (40, 67);
            let w = random_matrix(ty, m, k, &mut rng);
            let x = random_acts(n, k, &mut rng);
            let mut all = vec![0.0; n * m];
            linear(&x, n, &w, &mut all).unwrap();
            for i in [0, 13, 39] {
                let mut one = vec![0.0; m];
                linear(&x[i * k..(i + 1) * k], 1, &w, &mut one).unwrap();
                for j in 0..m {
                    assert_eq!(one[j].to_bits(), all[i * m + j].to_bits(), "{ty:?} row {i} col {j}");
                }
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
