//! Batch-invariant `out = x · Wᵀ`: every output element is computed by the same sequence of f32 operations
//! whatever the number of rows in the call, its position in the batch, or the thread that computes it.
//!
//! That is what makes one forward over a window equal to decoding it token by token, bit for bit: a token's keys
//! and values come out identical in a 512-token prefill and in a single-token step, so a quantized cache stores
//! the same codes either way. A general GEMM (faer, BLAS) picks different kernels and reduction splits for a
//! single row and for a panel of rows, which moves results by about one ulp, enough to flip a code sitting on a
//! rounding boundary.
//!
//! The order for one element `out[i][j] = dot(x[i], w[j])`, the contract every path keeps:
//! 1. eight f32 lane accumulators start at zero;
//! 2. for each chunk of eight along `k` (the last one padded with zeros), lane `l` does
//!    `acc[l] = fma(x[c + l], w[c + l], acc[l])`, a fused multiply-add rounded once;
//! 3. the lanes are summed as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`.
//!
//! [`matmul_t_lanes_ref`] is that contract written out in scalar code (`f32::mul_add` is the same correctly
//! rounded fused operation); the AVX2+FMA tiles of [`matmul_t`] must match it bit for bit, and the tests check it.
//! Machines without AVX2+FMA run the scalar contract itself.

use rayon::prelude::*;

/// Lanes of one accumulator (one 256-bit register of f32).
const LANES: usize = 8;
/// Rows of `x` per register tile.
const MR: usize = 4;
/// Rows of `w` per register tile: 4 x 3 accumulators + 3 weight vectors + 1 input vector = 16 registers.
const NR: usize = 3;
/// Rows of `x` per parallel task.
const MC: usize = 64;
/// Rows of `w` per parallel task (a multiple of `NR`); 48 rows of a 1536-wide matrix stay in L2.
const NC: usize = 48;
/// Below this many multiply-adds one thread is faster than waking the pool.
const PAR_MIN_FMAS: usize = 1 << 18;

/// `out[n][m] = x[n][k] · w[m][k]ᵀ` (a linear layer with `[out][in]` row-major weights), batch-invariant: row `i`
/// of `out` depends only on row `i` of `x`, bit for bit (see the module documentation for the exact order).
pub fn matmul_t(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n * k, "x is not {n} x {k}");
    assert_eq!(w.len(), m * k, "w is not {m} x {k}");
    assert_eq!(out.len(), n * m, "out is not {n} x {m}");
    if n == 0 || m == 0 {
        return;
    }
    let kernel = Kernel::detect();
    let row_blocks = n.div_ceil(MC);
    let col_blocks = m.div_ceil(NC);
    let dst = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * MC..((rb + 1) * MC).min(n);
        let cols = cb * NC..((cb + 1) * NC).min(m);
        // SAFETY: tasks cover disjoint rectangles of `out`, whose bounds were checked above.
        unsafe { kernel.block(x, k, w, dst, m, rows, cols) };
    };
    if n * m * k < PAR_MIN_FMAS {
        (0..row_blocks * col_blocks).for_each(task);
    } else {
        (0..row_blocks * col_blocks).into_par_iter().for_each(task);
    }
}

/// The element-order contract of [`matmul_t`] in plain scalar code: its bit-exact twin.
pub fn matmul_t_lanes_ref(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!((x.len(), w.len(), out.len()), (n * k, m * k, n * m));
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = dot_lanes(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}

/// One element by the contract: eight fused lanes along `k`, zero padding, fixed pairwise lane sum.
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks(LANES).zip(b.chunks(LANES)) {
        for l in 0..LANES {
            let (u, v) = (ca.get(l).copied().unwrap_or(0.0), cb.get(l).copied().unwrap_or(0.0));
            acc[l] = u.mul_add(v, acc[l]);
        }
    }
    reduce_lanes(&acc)
}

fn reduce_lanes(a: &[f32; LANES]) -> f32 {
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let t = [s[0] + s[2], s[1] + s[3]];
    t[0] + t[1]
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only to write disjoint rectangles from different tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Scalar
    }

    /// Computes `out[rows][cols]`.
    ///
    /// # Safety
    /// `dst` points at an `n x ldo` buffer that holds `rows x cols`, `x` has `rows.end * k` elements, `w` has
    /// `cols.end * k`, and no other thread writes this rectangle.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        self,
        x: &[f32],
        k: usize,
        w: &[f32],
        dst: OutPtr,
        ldo: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        match self {
            Kernel::Scalar => {
                for i in rows {
                    for j in cols.clone() {
                        let v = dot_lanes(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                        // SAFETY: (i, j) lies in this task's rectangle of `out`.
                        unsafe { *dst.0.add(i * ldo + j) = v };
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => {
                // SAFETY: the features were detected; bounds as documented.
                unsafe { avx2::block(x, k, w, dst.0, ldo, rows, cols) }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LANES, MR, NR};
    use std::arch::x86_64::*;

    /// Tiles `rows x cols` into `MR x NR` register tiles, smaller ones at the edges.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: &[f32],
        k: usize,
        w: &[f32],
        out: *mut f32,
        ldo: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        debug_assert!(x.len() >= rows.end * k && w.len() >= cols.end * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut i = rows.start;
        while i < rows.end {
            let r = (rows.end - i).min(MR);
            let mut j = cols.start;
            while j < cols.end {
                let c = (cols.end - j).min(NR);
                // SAFETY: rows i..i + r of x and j..j + c of w exist, the out elements are in this rectangle.
                unsafe {
                    let (xs, ws, o) = (xp.add(i * k), wp.add(j * k), out.add(i * ldo + j));
                    match (r, c) {
                        (4, 3) => tile::<4, 3>(xs, ws, k, o, ldo),
                        (4, 2) => tile::<4, 2>(xs, ws, k, o, ldo),
                        (4, 1) => tile::<4, 1>(xs, ws, k, o, ldo),
                        (3, 3) => tile::<3, 3>(xs, ws, k, o, ldo),
                        (3, 2) => tile::<3, 2>(xs, ws, k, o, ldo),
                        (3, 1) => tile::<3, 1>(xs, ws, k, o, ldo),
                        (2, 3) => tile::<2, 3>(xs, ws, k, o, ldo),
                        (2, 2) => tile::<2, 2>(xs, ws, k, o, ldo),
                        (2, 1) => tile::<2, 1>(xs, ws, k, o, ldo),
                        (1, 3) => tile::<1, 3>(xs, ws, k, o, ldo),
                        (1, 2) => tile::<1, 2>(xs, ws, k, o, ldo),
                        _ => tile::<1, 1>(xs, ws, k, o, ldo),
                    }
                }
                j += c;
            }
            i += r;
        }
    }

    /// `R x C` dot products of rows of `x` (stride `k`) with rows of `w` (stride `k`), each in the contract's order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize>(x: *const f32, w: *const f32, k: usize, out: *mut f32, ldo: usize) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / LANES * LANES;
        let mut c0 = 0;
        while c0 < full {
            // SAFETY: c0 + 8 <= k within each row.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); C];
                for (jj, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(jj * k + c0));
                }
                for (ii, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(ii * k + c0));
                    for (a, &wv) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wv, *a);
                    }
                }
            }
            c0 += LANES;
        }
        if full < k {
            let rem = (k - full) as i32;
            let mask = _mm256_setr_epi32(
                -((rem > 0) as i32),
                -((rem > 1) as i32),
                -((rem > 2) as i32),
                -((rem > 3) as i32),
                -((rem > 4) as i32),
                -((rem > 5) as i32),
                -((rem > 6) as i32),
                0,
            );
            // SAFETY: masked loads touch only the k - full elements left in each row.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); C];
                for (jj, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_maskload_ps(w.add(jj * k + full), mask);
                }
                for (ii, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_maskload_ps(x.add(ii * k + full), mask);
                    for (a, &wv) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wv, *a);
                    }
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &a) in row.iter().enumerate() {
                // SAFETY: (ii, jj) is inside the tile.
                unsafe { *out.add(ii * ldo + jj) = reduce(a) };
            }
        }
    }

    /// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, the contract's lane sum.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn fast_path_equals_the_scalar_contract_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let sizes = [(1, 1, 1), (1, 7, 5), (2, 9, 2), (5, 576, 7), (7, 13, 50), (67, 129, 97), (130, 96, 100)];
        for &(n, k, m) in &sizes {
            let (x, w) = (random(&mut rng, n * k), random(&mut rng, m * k));
            let mut fast = vec![f32::NAN; n * m];
            let mut twin = vec![f32::NAN; n * m];
            matmul_t(&x, n, k, &w, m, &mut fast);
            matmul_t_lanes_ref(&x, n, k, &w, m, &mut twin);
            let first = fast.iter().zip(&twin).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(first.is_none(), "{n}x{k}x{m}: first difference at {first:?} ({:?})", Kernel::detect());
        }
    }

    #[test]
    fn every_row_is_the_same_alone_and_in_any_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (n, k, m) = (150, 577, 131);
        let (x, w) = (random(&mut rng, n * k), random(&mut rng, m * k));
        let mut all = vec![0.0; n * m];
        matmul_t(&x, n, k, &w, m, &mut all);
        for (start, len) in [(0, 1), (3, 1), (149, 1), (5, 2), (10, 7), (64, 65), (1, 149)] {
            let mut part = vec![0.0; len * m];
            matmul_t(&x[start * k..(start + len) * k], len, k, &w, m, &mut part);
            assert_eq!(part, all[start * m..(start + len) * m], "rows {start}..{}", start + len);
        }
    }

    #[test]
    fn padding_with_zeros_and_signs_of_zero() {
        // k = 3: the padded lanes add fma(0, 0, acc); a zero row gives +0.
        let x = [1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0];
        let w = [4.0f32, 1.0, 2.0];
        let mut out = [f32::NAN; 2];
        matmul_t(&x, 2, 3, &w, 1, &mut out);
        assert_eq!(out, [3.0, 0.0]);
    }
}
