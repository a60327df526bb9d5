//! AVX2/FMA fused attention kernels.
//!
//! Codes go from packed bytes to eight f32 lanes in registers ([`load8`]): the `B` bytes of one packing unit are
//! read as one word, broadcast, shifted per lane and masked. The kernels are monomorphized over the width `B` and the
//! number `R` (1 to 4) of query heads handled together, so the accumulators of a batch stay in registers and each
//! unit of codes is loaded once per batch. Widths without whole-byte units of eight codes (1.58) and group sizes
//! that are not multiples of 8 are unpacked block by block into a byte buffer first and read with `B = 8`.

use std::arch::x86_64::*;

use half::f16;

use super::{center, fit, generic, resize, scale_queries, write_stats, Scratch};
use crate::attn::HeadKv;
use crate::format::{Bits, GroupAxis};
use crate::pack;
use crate::quant::{MetaView, PackedView};

pub(super) mod avx512;

/// Eight codes starting at code index `i` (a multiple of 8 for `B < 8`) of a stream of `B`-bit codes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8<const B: usize>(p: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller's guarantee, passed on.
    _mm256_cvtepi32_ps(unsafe { load8i::<B>(p, i) })
}

/// [`load8`] as eight 32-bit integers (for table lookups).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn load8i<const B: usize>(p: *const u8, i: usize) -> __m256i {
    // SAFETY (for the whole function): callers guarantee that the unit of codes `i .. i + 8` lies inside the stream.
    unsafe {
        if B == 8 {
            return _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(i) as *const __m128i));
        }
        let off = i / 8 * B;
        let q = p.add(off);
        let b = B as i32;
        let mask = _mm256_set1_epi32((1i32 << B) - 1);
        if B <= 4 {
            // The unit fits one 32-bit word: read exactly its B bytes, broadcast, shift lane k by k * B.
            let w: u32 = match B {
                1 => *q as u32,
                2 => u16::from_le(std::ptr::read_unaligned(q as *const u16)) as u32,
                3 => u16::from_le(std::ptr::read_unaligned(q as *const u16)) as u32 | (*q.add(2) as u32) << 16,
                _ => u32::from_le(std::ptr::read_unaligned(q as *const u32)),
            };
            let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
            return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts), mask);
        }
        // Five or six bytes: lanes 0..4 from the low word, lanes 4..8 from the bits after the fourth code.
        let lo32 = u32::from_le(std::ptr::read_unaligned(q as *const u32)) as u64;
        let w = match B {
            5 => lo32 | (*q.add(4) as u64) << 32,
            _ => lo32 | (u16::from_le(std::ptr::read_unaligned(q.add(4) as *const u16)) as u64) << 32,
        };
        let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b);
        let lo = _mm_set1_epi32(w as u32 as i32);
        let hi = _mm_set1_epi32((w >> (4 * B)) as u32 as i32);
        let words = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
        _mm256_and_si256(_mm256_srlv_epi32(words, shifts), mask)
    }
}

/// Horizontal sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `e^x` for `x <= 0` on eight lanes (Cephes `expf` polynomial, relative error about 2e-7; flushes below -87 to
/// about 1e-38).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// Scalar twin of [`exp8`] for the lanes left over.
#[inline]
fn exp1(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Converts metadata entries `start .. start + out.len()` to f32 (eight at a time for f16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn meta_into(m: &MetaView<'_>, start: usize, out: &mut [f32]) {
    match m {
        MetaView::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
        MetaView::F16(v) => {
            let src = &v[start..start + out.len()];
            let mut i = 0;
            while i + 8 <= out.len() {
                // SAFETY: `i + 8 <= len` for both slices.
                unsafe {
                    let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            for k in i..out.len() {
                out[k] = src[k].to_f32();
            }
        }
    }
}

/// Calls `$f::<B, R>($args)` with `B` and `R` chosen at run time.
macro_rules! dispatch {
    ($f:ident, $bits:expr, $r:expr, ($($arg:expr),*)) => {
        match ($bits, $r) {
            (1, 1) => $f::<1, 1>($($arg),*), (1, 2) => $f::<1, 2>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*), (1, _) => $f::<1, 4>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*), (2, _) => $f::<2, 4>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*), (3, 2) => $f::<3, 2>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*), (3, _) => $f::<3, 4>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*), (4, _) => $f::<4, 4>($($arg),*),
            (5, 1) => $f::<5, 1>($($arg),*), (5, 2) => $f::<5, 2>($($arg),*),
            (5, 3) => $f::<5, 3>($($arg),*), (5, _) => $f::<5, 4>($($arg),*),
            (6, 1) => $f::<6, 1>($($arg),*), (6, 2) => $f::<6, 2>($($arg),*),
            (6, 3) => $f::<6, 3>($($arg),*), (6, _) => $f::<6, 4>($($arg),*),
            (_, 1) => $f::<8, 1>($($arg),*), (_, 2) => $f::<8, 2>($($arg),*),
            (_, 3) => $f::<8, 3>($($arg),*), (_, _) => $f::<8, 4>($($arg),*),
        }
    };
}

/// How a kernel reads the codes of a view: straight from the packed bytes with width `B`, or from a byte buffer
/// that each block or token is unpacked into (width 8).
pub(super) fn code_width(view: &PackedView<'_>) -> (usize, bool) {
    let g = view.spec.group;
    let aligned = g.is_multiple_of(8) && (view.spec.axis == GroupAxis::PerChannel || view.head_dim.is_multiple_of(8));
    match view.spec.bits {
        Bits::B1_58 => (8, false),
        _ if !aligned => (8, false),
        b => (b.nominal() as usize, true),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn attend_head(
    q: &[f32],
    head: &HeadKv<'_>,
    d: usize,
    scale: f32,
    out: &mut [f32],
    s: &mut Scratch,
    stats: Option<&mut [f32]>,
) {
    let n_rep = q.len() / d;
    let t_all = head.tokens(d);
    scale_queries(q, scale, &mut s.qq);
    fit(&mut s.scores, n_rep * t_all);
    let mut pos = 0;
    pos += exact_scores::<false>(
        &s.qq,
        head.sink_k.as_ptr() as *const u8,
        head.sink_k.len() / d,
        d,
        &mut s.scores,
        t_all,
        pos,
    );
    if let Some(k) = &head.k {
        let digits = super::int_keys(&k.spec, d);
        if digits > 0 {
            super::intdot::prepare(&s.qq, d, k, digits, &mut s.iq);
            // SAFETY: `int_keys` checked AVX-512 VNNI, and the view was checked by the caller.
            unsafe { super::intdot::keys_pt(&mut s.iq, k, n_rep, &mut s.scores, t_all, pos) };
        } else if k.spec.is_codebook() {
            super::codebook::avx2::packed_scores(&s.qq, k, &mut s.scores, t_all, pos, &mut s.codes, &mut s.tmp);
        } else if k.spec.group.is_multiple_of(8) {
            packed_scores(&s.qq, k, &mut s.scores, t_all, pos, &mut s.codes, &mut s.tmp);
        } else {
            generic::packed_scores(&s.qq, k, &mut s.scores, t_all, pos, &mut s.codes, &mut s.tmp);
        }
        pos += k.tokens;
    }
    exact_scores::<false>(
        &s.qq,
        head.tail_k.as_ptr() as *const u8,
        head.tail_k.len() / d,
        d,
        &mut s.scores,
        t_all,
        pos,
    );
    let sums = softmax(&mut s.scores, n_rep, t_all, &mut s.maxes);
    resize(&mut s.acc, n_rep * d);
    let mut pos = 0;
    pos += exact_values::<false>(
        &s.scores,
        t_all,
        head.sink_v.as_ptr() as *const u8,
        head.sink_v.len() / d,
        d,
        &mut s.acc,
        pos,
    );
    if let Some(v) = &head.v {
        if v.spec.is_codebook() {
            super::codebook::avx2::packed_values(&s.scores, t_all, v, &mut s.acc, pos, &mut s.codes, &mut s.tmp);
        } else if v.spec.group.is_multiple_of(8) {
            packed_values(&s.scores, t_all, v, &mut s.acc, pos, &mut s.codes, &mut s.tmp);
        } else {
            generic::packed_values(&s.scores, t_all, v, &mut s.acc, pos, &mut s.codes, &mut s.tmp);
        }
        pos += v.tokens;
    }
    exact_values::<false>(
        &s.scores,
        t_all,
        head.tail_v.as_ptr() as *const u8,
        head.tail_v.len() / d,
        d,
        &mut s.acc,
        pos,
    );
    write_stats(stats, &s.maxes, &sums);
    finish(&s.acc, &sums, d, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn attend_f16(q: &[f32], k: &[f16], v: &[f16], d: usize, scale: f32, out: &mut [f32], s: &mut Scratch) {
    let n_rep = q.len() / d;
    let t_all = k.len() / d;
    scale_queries(q, scale, &mut s.qq);
    fit(&mut s.scores, n_rep * t_all);
    exact_scores::<true>(&s.qq, k.as_ptr() as *const u8, t_all, d, &mut s.scores, t_all, 0);
    let sums = softmax(&mut s.scores, n_rep, t_all, &mut s.maxes);
    resize(&mut s.acc, n_rep * d);
    exact_values::<true>(&s.scores, t_all, v.as_ptr() as *const u8, t_all, d, &mut s.acc, 0);
    finish(&s.acc, &sums, d, out);
}

fn finish(acc: &[f32], sums: &[f32], d: usize, out: &mut [f32]) {
    for (r, &sum) in sums.iter().enumerate() {
        let inv = 1.0 / sum;
        for (o, a) in out[r * d..(r + 1) * d].iter_mut().zip(&acc[r * d..(r + 1) * d]) {
            *o = a * inv;
        }
    }
}

/// Eight f32 elements of a row of f32 (`F16 = false`) or f16 (`F16 = true`) values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld8<const F16: bool>(p: *const u8, i: usize) -> __m256 {
    // SAFETY: callers pass element indices inside the row.
    unsafe {
        if F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i))
        } else {
            _mm256_loadu_ps((p as *const f32).add(i))
        }
    }
}

#[inline]
unsafe fn ld1<const F16: bool>(p: *const u8, i: usize) -> f32 {
    // SAFETY: callers pass element indices inside the row.
    unsafe {
        if F16 {
            (*(p as *const f16).add(i)).to_f32()
        } else {
            *(p as *const f32).add(i)
        }
    }
}

/// Scores of `n` full-precision tokens (f32 or f16 rows at `x`) at positions `pos..`; returns `n`.
#[target_feature(enable = "avx2,fma,f16c")]
fn exact_scores<const F16: bool>(
    qq: &[f32],
    x: *const u8,
    n: usize,
    d: usize,
    scores: &mut [f32],
    t_all: usize,
    pos: usize,
) -> usize {
    let n_rep = qq.len() / d;
    let d8 = d / 8 * 8;
    let esize = if F16 { 2 } else { 4 };
    for t in 0..n {
        // SAFETY: row `t` of `n` rows of `d` elements.
        let row = unsafe { x.add(t * d * esize) };
        let mut r0 = 0;
        while r0 < n_rep {
            let nr = (n_rep - r0).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < d8 {
                // SAFETY: `c + 8 <= d`.
                let k = unsafe { ld8::<F16>(row, c) };
                for r in 0..nr {
                    // SAFETY: query row `r0 + r` has `d` elements.
                    let qv = unsafe { _mm256_loadu_ps(qq.as_ptr().add((r0 + r) * d + c)) };
                    acc[r] = _mm256_fmadd_ps(qv, k, acc[r]);
                }
                c += 8;
            }
            for r in 0..nr {
                let mut s = hsum(acc[r]);
                for cc in d8..d {
                    // SAFETY: `cc < d`.
                    s += qq[(r0 + r) * d + cc] * unsafe { ld1::<F16>(row, cc) };
                }
                scores[(r0 + r) * t_all + pos + t] = s;
            }
            r0 += nr;
        }
    }
    n
}

/// Adds `sum_t p_t x_t` over `n` full-precision tokens at positions `pos..`; returns `n`.
#[target_feature(enable = "avx2,fma,f16c")]
fn exact_values<const F16: bool>(
    p: &[f32],
    t_all: usize,
    x: *const u8,
    n: usize,
    d: usize,
    acc: &mut [f32],
    pos: usize,
) -> usize {
    let n_rep = acc.len() / d;
    let d8 = d / 8 * 8;
    let esize = if F16 { 2 } else { 4 };
    let mut t = 0;
    // Two tokens per pass halve the loads and stores of the accumulators.
    while t < n {
        let two = t + 1 < n;
        // SAFETY: rows `t` and `t + 1` (when `two`) of `n` rows.
        let (row0, row1) = unsafe { (x.add(t * d * esize), x.add((t + two as usize) * d * esize)) };
        for r in 0..n_rep {
            let w0 = p[r * t_all + pos + t];
            let w1 = if two { p[r * t_all + pos + t + 1] } else { 0.0 };
            let (v0, v1) = (_mm256_set1_ps(w0), _mm256_set1_ps(w1));
            let a = &mut acc[r * d..(r + 1) * d];
            let mut c = 0;
            while c < d8 {
                // SAFETY: `c + 8 <= d` inside rows and the accumulator row.
                unsafe {
                    let ap = a.as_mut_ptr().add(c);
                    let mut y = _mm256_loadu_ps(ap);
                    y = _mm256_fmadd_ps(v0, ld8::<F16>(row0, c), y);
                    y = _mm256_fmadd_ps(v1, ld8::<F16>(row1, c), y);
                    _mm256_storeu_ps(ap, y);
                }
                c += 8;
            }
            for cc in d8..d {
                // SAFETY: `cc < d`.
                unsafe { a[cc] += w0 * ld1::<F16>(row0, cc) + w1 * ld1::<F16>(row1, cc) };
            }
        }
        t += 2;
    }
    n
}

/// Turns scores into unnormalised probabilities in place; returns each query's sum, or NaN for a query with a
/// non-finite score (as the portable twin does, so that the caller reports it: `max` and `exp8` below would
/// otherwise turn a NaN score into a tiny weight).
#[target_feature(enable = "avx2,fma")]
fn softmax(scores: &mut [f32], n_rep: usize, t_all: usize, maxes: &mut Vec<f32>) -> Vec<f32> {
    maxes.clear();
    let wide = crate::simd::active() >= crate::simd::SimdLevel::Avx512;
    (0..n_rep)
        .map(|r| {
            let s = &mut scores[r * t_all..(r + 1) * t_all];
            let n8 = s.len() / 8 * 8;
            let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
            // Sum of `x * 0`: NaN exactly when some score is NaN or infinite.
            let mut pv = _mm256_setzero_ps();
            let zero = _mm256_setzero_ps();
            let mut i = 0;
            while i < n8 {
                // SAFETY: `i + 8 <= len`.
                let x = unsafe { _mm256_loadu_ps(s.as_ptr().add(i)) };
                mv = _mm256_max_ps(mv, x);
                pv = _mm256_add_ps(pv, _mm256_mul_ps(x, zero));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            // SAFETY: eight lanes into an eight-element array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
            let mut max = lanes.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut probe = hsum(pv);
            for &x in &s[n8..] {
                max = max.max(x);
                probe += x * 0.0;
            }
            maxes.push(max);
            let m = _mm256_set1_ps(max);
            let mut sv = _mm256_setzero_ps();
            let mut i = 0;
            let mut wide_sum = 0f32;
            if wide {
                // SAFETY: AVX-512F is active (checked once per call).
                (wide_sum, i) = unsafe { avx512::exp_sum16(s, max) };
            }
            while i < n8 {
                // SAFETY: `i + 8 <= len`.
                unsafe {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(i)), m));
                    _mm256_storeu_ps(s.as_mut_ptr().add(i), e);
                    sv = _mm256_add_ps(sv, e);
                }
                i += 8;
            }
            let mut sum = wide_sum + hsum(sv);
            for x in &mut s[n8..] {
                *x = exp1(*x - max);
                sum += *x;
            }
            if probe.is_nan() {
                f32::NAN
            } else {
                sum
            }
        })
        .collect()
}

/// Scores of a packed key view (group size a multiple of 8).
#[target_feature(enable = "avx2,fma,f16c")]
fn packed_scores(
    qq: &[f32],
    view: &PackedView<'_>,
    scores: &mut [f32],
    t_all: usize,
    pos: usize,
    codes: &mut Vec<u8>,
    tmp: &mut Vec<f32>,
) {
    let n_rep = qq.len() / view.head_dim;
    let (b, direct) = code_width(view);
    let mut r0 = 0;
    while r0 < n_rep {
        let nr = (n_rep - r0).min(4);
        let args = (qq, r0, view, &mut *scores, t_all, pos, &mut *codes, &mut *tmp, direct);
        match view.spec.axis {
            GroupAxis::PerChannel => dispatch!(keys_pc, b, nr, (args)),
            GroupAxis::PerToken => dispatch!(keys_pt, b, nr, (args)),
        }
        r0 += nr;
    }
}

type KeyArgs<'a, 'b> =
    (&'a [f32], usize, &'a PackedView<'b>, &'a mut [f32], usize, usize, &'a mut Vec<u8>, &'a mut Vec<f32>, bool);

/// Per-channel keys: per block, `s_t = q . min + sum_c (q_c scale_c) code_ct` for `R` queries from `r0`.
#[target_feature(enable = "avx2,fma,f16c")]
fn keys_pc<const B: usize, const R: usize>(args: KeyArgs<'_, '_>) {
    let (qq, r0, view, scores, t_all, pos, codes, tmp, direct) = args;
    let d = view.head_dim;
    let g = view.spec.group;
    resize(tmp, 2 * d + R * d);
    let (sm, qs) = tmp.split_at_mut(2 * d);
    let (sc, mn) = sm.split_at_mut(d);
    if !direct {
        codes.resize(g * d, 0);
    }
    let wide = direct && avx512::supports(B, g);
    for blk in 0..view.tokens / g {
        meta_into(&view.scales, blk * d, sc);
        meta_into(&view.mins, blk * d, mn);
        let mut bias = [0f32; R];
        for r in 0..R {
            let qr = &qq[(r0 + r) * d..(r0 + r + 1) * d];
            let qsr = &mut qs[r * d..(r + 1) * d];
            let mut bv = _mm256_setzero_ps();
            let mut c = 0;
            while c + 8 <= d {
                // SAFETY: `c + 8 <= d` for all three rows.
                unsafe {
                    let qv = _mm256_loadu_ps(qr.as_ptr().add(c));
                    _mm256_storeu_ps(qsr.as_mut_ptr().add(c), _mm256_mul_ps(qv, _mm256_loadu_ps(sc.as_ptr().add(c))));
                    bv = _mm256_fmadd_ps(qv, _mm256_loadu_ps(mn.as_ptr().add(c)), bv);
                }
                c += 8;
            }
            bias[r] = hsum(bv);
            for cc in c..d {
                qsr[cc] = qr[cc] * sc[cc];
                bias[r] += qr[cc] * mn[cc];
            }
        }
        let (src, base) = if direct {
            (view.codes.as_ptr(), blk * g * d)
        } else {
            pack::unpack_range(view.spec.bits, view.codes, blk * g * d, codes);
            (codes.as_ptr(), 0)
        };
        if wide {
            // SAFETY: AVX-512F was detected (`supports`); the block's codes lie in the stream, `qs` has `R * d`
            // entries and the `g` scores of each query row `r0 + r` start at the pointer passed.
            unsafe {
                let out = scores.as_mut_ptr().add(r0 * t_all + pos + blk * g);
                avx512::key_block::<B, R, false>(src, base, g, d, qs, &bias, out, t_all, &[0.0; 16]);
            }
            continue;
        }
        let mut j = 0;
        // Sixteen tokens per pass give 2R independent accumulator chains, enough to hide the FMA latency.
        while j + 16 <= g {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for r in 0..R {
                acc[r] = [_mm256_set1_ps(bias[r]); 2];
            }
            for c in 0..d {
                // SAFETY: codes `base + c * g + j .. + 16` lie inside the block.
                let (f0, f1) = unsafe { (load8::<B>(src, base + c * g + j), load8::<B>(src, base + c * g + j + 8)) };
                for r in 0..R {
                    let w = _mm256_set1_ps(qs[r * d + c]);
                    acc[r][0] = _mm256_fmadd_ps(w, f0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w, f1, acc[r][1]);
                }
            }
            for r in 0..R {
                let o = (r0 + r) * t_all + pos + blk * g + j;
                let out = &mut scores[o..o + 16];
                // SAFETY: sixteen scores of query `r0 + r` inside this block.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), acc[r][0]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[r][1]);
                }
            }
            j += 16;
        }
        while j < g {
            let mut acc = [_mm256_setzero_ps(); R];
            for r in 0..R {
                acc[r] = _mm256_set1_ps(bias[r]);
            }
            for c in 0..d {
                // SAFETY: codes `base + c * g + j .. + 8` lie inside the block.
                let f = unsafe { load8::<B>(src, base + c * g + j) };
                for r in 0..R {
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(qs[r * d + c]), f, acc[r]);
                }
            }
            for r in 0..R {
                let o = (r0 + r) * t_all + pos + blk * g + j;
                // SAFETY: eight scores of query `r0 + r` inside this block.
                unsafe { _mm256_storeu_ps(scores[o..o + 8].as_mut_ptr(), acc[r]) };
            }
            j += 8;
        }
    }
}

/// Per-token keys: `s_t = sum_g scale_tg (q_g . code_tg) + min_tg sum(q_g)` for `R` queries from `r0`.
#[target_feature(enable = "avx2,fma,f16c")]
fn keys_pt<const B: usize, const R: usize>(args: KeyArgs<'_, '_>) {
    let (qq, r0, view, scores, t_all, pos, codes, tmp, direct) = args;
    let d = view.head_dim;
    let g = view.spec.group;
    let ng = d / g;
    const TILE: usize = 64;
    // tmp: per-group query sums, then a tile of scales and minimums.
    resize(tmp, R * ng + 2 * TILE * ng);
    let (qsum, meta) = tmp.split_at_mut(R * ng);
    let (sc, mn) = meta.split_at_mut(TILE * ng);
    for r in 0..R {
        for gi in 0..ng {
            qsum[r * ng + gi] = qq[(r0 + r) * d + gi * g..(r0 + r) * d + (gi + 1) * g].iter().sum();
        }
    }
    if !direct {
        codes.resize(d, 0);
    }
    let mut t0 = 0;
    while t0 < view.tokens {
        let tile = (view.tokens - t0).min(TILE);
        meta_into(&view.scales, t0 * ng, &mut sc[..tile * ng]);
        meta_into(&view.mins, t0 * ng, &mut mn[..tile * ng]);
        for tt in 0..tile {
            let t = t0 + tt;
            let (src, base) = if direct {
                (view.codes.as_ptr(), t * d)
            } else {
                pack::unpack_range(view.spec.bits, view.codes, t * d, codes);
                (codes.as_ptr(), 0)
            };
            let mut acc = [_mm256_setzero_ps(); R];
            let mut bias = [0f32; R];
            for gi in 0..ng {
                let mut part = [_mm256_setzero_ps(); R];
                let mut k = gi * g;
                while k < (gi + 1) * g {
                    // SAFETY: codes `base + k .. + 8` belong to token `t`; query rows have `d` elements.
                    unsafe {
                        let f = load8::<B>(src, base + k);
                        for r in 0..R {
                            let qv = _mm256_loadu_ps(qq.as_ptr().add((r0 + r) * d + k));
                            part[r] = _mm256_fmadd_ps(qv, f, part[r]);
                        }
                    }
                    k += 8;
                }
                let s = _mm256_set1_ps(sc[tt * ng + gi]);
                let m = mn[tt * ng + gi];
                for r in 0..R {
                    acc[r] = _mm256_fmadd_ps(s, part[r], acc[r]);
                    bias[r] += m * qsum[r * ng + gi];
                }
            }
            for r in 0..R {
                scores[(r0 + r) * t_all + pos + t] = hsum(acc[r]) + bias[r];
            }
        }
        t0 += tile;
    }
}

/// Adds the value sum of a packed value view (group size a multiple of 8).
#[target_feature(enable = "avx2,fma,f16c")]
fn packed_values(
    p: &[f32],
    t_all: usize,
    view: &PackedView<'_>,
    acc: &mut [f32],
    pos: usize,
    codes: &mut Vec<u8>,
    tmp: &mut Vec<f32>,
) {
    let n_rep = acc.len() / view.head_dim;
    let (b, direct) = code_width(view);
    let mut r0 = 0;
    while r0 < n_rep {
        let nr = (n_rep - r0).min(4);
        let args = (p, t_all, r0, view, &mut *acc, pos, &mut *codes, &mut *tmp, direct);
        match view.spec.axis {
            GroupAxis::PerToken => dispatch!(values_pt, b, nr, (args)),
            GroupAxis::PerChannel => dispatch!(values_pc, b, nr, (args)),
        }
        r0 += nr;
    }
}

type ValueArgs<'a, 'b> =
    (&'a [f32], usize, usize, &'a PackedView<'b>, &'a mut [f32], usize, &'a mut Vec<u8>, &'a mut Vec<f32>, bool);

/// Per-token values: `o += (p_t scale_tg) (code_tg - center)`, with `p_t (min_tg + center scale_tg)` summed per
/// group and added at the end. Tokens go in tiles; inside a tile, sixteen channels at a time keep their `2R`
/// accumulators in registers across all tokens of the tile.
#[target_feature(enable = "avx2,fma,f16c")]
fn values_pt<const B: usize, const R: usize>(args: ValueArgs<'_, '_>) {
    let (p, t_all, r0, view, acc, pos, codes, tmp, direct) = args;
    let d = view.head_dim;
    let g = view.spec.group;
    let c0 = center(view.spec.bits);
    let c0v = _mm256_set1_ps(c0);
    let ng = d / g;
    const TILE: usize = 64;
    // tmp: per-(query, group) sums of p * (min + center * scale), a tile of scales and minimums, and the tile's
    // weights p * scale laid out [group][query][token].
    resize(tmp, R * ng + 2 * TILE * ng + TILE * ng * R);
    let (msum, rest) = tmp.split_at_mut(R * ng);
    let (sc, rest) = rest.split_at_mut(TILE * ng);
    let (mn, wt) = rest.split_at_mut(TILE * ng);
    if !direct {
        codes.resize(TILE * d, 0);
    }
    let wide = direct && avx512::supports(B, g);
    let int = direct && matches!(B, 2 | 4 | 8) && super::int_values(&view.spec, d);
    let cmax = view.spec.bits.max_code() as i32;
    let mut t0 = 0;
    while t0 < view.tokens {
        let tile = (view.tokens - t0).min(TILE);
        meta_into(&view.scales, t0 * ng, &mut sc[..tile * ng]);
        meta_into(&view.mins, t0 * ng, &mut mn[..tile * ng]);
        for r in 0..R {
            let prow = &p[(r0 + r) * t_all + pos + t0..(r0 + r) * t_all + pos + t0 + tile];
            for gi in 0..ng {
                let wrow = &mut wt[(gi * R + r) * TILE..(gi * R + r) * TILE + tile];
                // Eight lanes of partial sums keep the additions off one dependency chain.
                let mut lanes = _mm256_setzero_ps();
                let mut tt = 0;
                if ng == 1 {
                    while tt + 8 <= tile {
                        // SAFETY: `tt + 8 <= tile`, the length of `prow`, `wrow`, and of `sc` and `mn` (one group).
                        unsafe {
                            let pv = _mm256_loadu_ps(prow.as_ptr().add(tt));
                            let sv = _mm256_loadu_ps(sc.as_ptr().add(tt));
                            let mv = _mm256_loadu_ps(mn.as_ptr().add(tt));
                            _mm256_storeu_ps(wrow.as_mut_ptr().add(tt), _mm256_mul_ps(pv, sv));
                            lanes = _mm256_fmadd_ps(pv, _mm256_fmadd_ps(c0v, sv, mv), lanes);
                        }
                        tt += 8;
                    }
                }
                let mut rest = 0f32;
                for tt in tt..tile {
                    let (pt, s, m) = (prow[tt], sc[tt * ng + gi], mn[tt * ng + gi]);
                    wrow[tt] = pt * s;
                    rest += pt * (m + c0 * s);
                }
                msum[r * ng + gi] += hsum(lanes) + rest;
            }
        }
        let (src, base) = if direct {
            (view.codes.as_ptr(), t0 * d)
        } else {
            pack::unpack_range(view.spec.bits, view.codes, t0 * d, &mut codes[..tile * d]);
            (codes.as_ptr(), 0)
        };
        if int {
            // SAFETY: `int_values` checked VNNI, VBMI and the spec (B is 2, 4 or 8, groups fill 16-byte chunks); the
            // tile's codes lie in the stream, `wt` holds the tile's weights and accumulator rows `r0 .. r0 + R` have
            // `d` entries each.
            unsafe {
                let a = acc.as_mut_ptr().add(r0 * d);
                super::intdot::value_tile_here::<B, R>(src, base, tile, d, g, wt, TILE, a, cmax);
            }
            t0 += tile;
            continue;
        }
        if wide {
            // SAFETY: AVX-512F was detected (`supports`); the tile's codes lie in the stream, `wt` holds the tile's
            // weights and accumulator rows `r0 .. r0 + R` have `d` entries each.
            unsafe {
                let a = acc.as_mut_ptr().add(r0 * d);
                avx512::value_tile::<B, R, false>(src, base, tile, d, g, wt, TILE, a, c0, &[0.0; 16]);
            }
            t0 += tile;
            continue;
        }
        let mut k = 0;
        while k < d {
            let two = k + 16 <= d && (k % g) + 16 <= g;
            let gi = k / g;
            let mut a = [[_mm256_setzero_ps(); 2]; R];
            for tt in 0..tile {
                // SAFETY: codes `base + tt * d + k .. + 8 (or 16)` belong to token `t0 + tt`; the weight of query
                // `r < R` is at `(gi * R + r) * TILE + tt < ng * R * TILE`, the length of `wt`.
                unsafe {
                    let w = wt.as_ptr().add(gi * R * TILE + tt);
                    let f0 = _mm256_sub_ps(load8::<B>(src, base + tt * d + k), c0v);
                    if two {
                        let f1 = _mm256_sub_ps(load8::<B>(src, base + tt * d + k + 8), c0v);
                        for r in 0..R {
                            let wv = _mm256_set1_ps(*w.add(r * TILE));
                            a[r][0] = _mm256_fmadd_ps(wv, f0, a[r][0]);
                            a[r][1] = _mm256_fmadd_ps(wv, f1, a[r][1]);
                        }
                    } else {
                        for r in 0..R {
                            a[r][0] = _mm256_fmadd_ps(_mm256_set1_ps(*w.add(r * TILE)), f0, a[r][0]);
                        }
                    }
                }
            }
            for r in 0..R {
                // SAFETY: accumulator row `r0 + r` has `d` elements and `k + 8 (or 16) <= d`.
                unsafe {
                    let ap = acc.as_mut_ptr().add((r0 + r) * d + k);
                    _mm256_storeu_ps(ap, _mm256_add_ps(_mm256_loadu_ps(ap), a[r][0]));
                    if two {
                        _mm256_storeu_ps(ap.add(8), _mm256_add_ps(_mm256_loadu_ps(ap.add(8)), a[r][1]));
                    }
                }
            }
            k += if two { 16 } else { 8 };
        }
        t0 += tile;
    }
    for r in 0..R {
        for gi in 0..ng {
            let m = msum[r * ng + gi];
            for a in &mut acc[(r0 + r) * d + gi * g..(r0 + r) * d + (gi + 1) * g] {
                *a += m;
            }
        }
    }
}

/// Per-channel values: `o_c += scale_bc (p_b . code_bc) + min_bc sum(p_b)` per block `b`.
#[target_feature(enable = "avx2,fma,f16c")]
fn values_pc<const B: usize, const R: usize>(args: ValueArgs<'_, '_>) {
    let (p, t_all, r0, view, acc, pos, codes, tmp, direct) = args;
    let d = view.head_dim;
    let g = view.spec.group;
    let c0 = center(view.spec.bits);
    let c0v = _mm256_set1_ps(c0);
    resize(tmp, 2 * d);
    let (sc, mn) = tmp.split_at_mut(d);
    if !direct {
        codes.resize(g * d, 0);
    }
    for blk in 0..view.tokens / g {
        meta_into(&view.scales, blk * d, sc);
        meta_into(&view.mins, blk * d, mn);
        let mut psum = [0f32; R];
        let mut prow = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            let o = (r0 + r) * t_all + pos + blk * g;
            psum[r] = p[o..o + g].iter().sum();
            prow[r] = p[o..o + g].as_ptr();
        }
        let (src, base) = if direct {
            (view.codes.as_ptr(), blk * g * d)
        } else {
            pack::unpack_range(view.spec.bits, view.codes, blk * g * d, codes);
            (codes.as_ptr(), 0)
        };
        for c in 0..d {
            let mut dot = [_mm256_setzero_ps(); R];
            let mut j = 0;
            while j < g {
                // SAFETY: codes `base + c * g + j .. + 8` lie in the block; `prow[r]` has `g` probabilities.
                unsafe {
                    let f = _mm256_sub_ps(load8::<B>(src, base + c * g + j), c0v);
                    for r in 0..R {
                        dot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(prow[r].add(j)), f, dot[r]);
                    }
                }
                j += 8;
            }
            for r in 0..R {
                acc[(r0 + r) * d + c] += sc[c] * hsum(dot[r]) + (mn[c] + c0 * sc[c]) * psum[r];
            }
        }
    }
}
