//! AVX-512 inner loops of the two hottest packed kernels: per-channel keys and per-token values.
//!
//! They run inside the AVX2 kernels (which keep the metadata handling) when the CPU has AVX-512F, the width `B` is
//! 1, 2, 4 or 8 and the group size is a multiple of 16. Sixteen codes go to sixteen f32 lanes with one broadcast
//! load, one variable shift, one mask and one conversion: `code as f32` for uniform levels, or, with `L = true`,
//! one `vpermps` from a table of at most sixteen levels held in one register (Lloyd-Max codebooks), so the
//! codebook kernels cost what the min-max ones cost. For `B = 4` the sixteen codes are the 64-bit word of
//! the unit broadcast to every 64-bit lane, so the lanes hold the codes in the order `0, 8, 1, 9, ..`; the kernels
//! accumulate in that order and restore the natural order once, when they write results out.

// AVX-512 intrinsics and target features are stable since Rust 1.89, the workspace's minimum version.

use std::arch::x86_64::*;

/// Lane order of [`load16`] for `B = 4`: output element `j` is lane `UNPERM[j]`.
const UNPERM: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15];

/// Sixteen codes starting at code index `i` (a multiple of 16 for `B < 8`) of a stream of `B`-bit codes,
/// `B` in {1, 2, 4, 8}, as f32: the codes themselves, or with `L` the levels `lut[code]` (`B <= 4`); for `B = 4` in
/// the lane order described in the module documentation.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load16<const B: usize, const L: bool>(p: *const u8, i: usize, lut: __m512) -> __m512 {
    debug_assert!(B == 8 || i.is_multiple_of(16));
    debug_assert!(!L || B <= 4);
    // SAFETY (for the whole function): callers guarantee that the codes `i .. i + 16` lie inside the stream; each
    // arm reads exactly their `2 * B` bytes.
    let idx = unsafe {
        let q = p.add(i * B / 8);
        match B {
            8 => _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i)),
            4 => {
                let w = u64::from_le(std::ptr::read_unaligned(q as *const u64)) as i64;
                let sh = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
                let v = _mm512_srlv_epi32(_mm512_set1_epi64(w), sh);
                _mm512_and_si512(v, _mm512_set1_epi32(15))
            }
            2 => {
                let w = u32::from_le(std::ptr::read_unaligned(q as *const u32)) as i32;
                let sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let v = _mm512_srlv_epi32(_mm512_set1_epi32(w), sh);
                _mm512_and_si512(v, _mm512_set1_epi32(3))
            }
            _ => {
                let w = u16::from_le(std::ptr::read_unaligned(q as *const u16)) as i32;
                let sh = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let v = _mm512_srlv_epi32(_mm512_set1_epi32(w), sh);
                _mm512_and_si512(v, _mm512_set1_epi32(1))
            }
        }
    };
    if L {
        _mm512_permutexvar_ps(idx, lut)
    } else {
        _mm512_cvtepi32_ps(idx)
    }
}

/// A table of at most sixteen levels (unused entries zero), for the `L = true` loops; the loops hold it in one
/// register.
pub(in crate::attn::cpu) fn lut16(levels: &[f32]) -> [f32; 16] {
    let mut t = [0f32; 16];
    let n = levels.len().min(16);
    t[..n].copy_from_slice(&levels[..n]);
    t
}

/// Puts sixteen lanes produced from [`load16`] codes back into natural order.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn unperm<const B: usize>(v: __m512) -> __m512 {
    if B == 4 {
        // SAFETY: sixteen indices from a sixteen-element array.
        let idx = unsafe { _mm512_loadu_si512(UNPERM.as_ptr() as *const _) };
        _mm512_permutexvar_ps(idx, v)
    } else {
        v
    }
}

/// Whether the AVX-512 loops handle codes of width `B` with group size `g`.
pub(in crate::attn::cpu) fn supports(b: usize, g: usize) -> bool {
    matches!(b, 1 | 2 | 4 | 8) && g.is_multiple_of(16) && crate::simd::active() >= crate::simd::SimdLevel::Avx512
}

/// Scores of all `g` tokens of one per-channel key block for `R` queries: `out[r * t_all + j] = bias[r] +
/// sum_c qs[r * d + c] * code[c * g + j]`, codes from `src` at code index `base`.
///
/// # Safety
/// The codes `base .. base + g * d` lie in the stream at `src`; `qs` has `R * d` entries; `out` points to query
/// `0`'s first score of the block and rows `r * t_all .. r * t_all + g` are writable for `r < R`; `g` is a multiple
/// of 16 and the CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(in crate::attn::cpu) unsafe fn key_block<const B: usize, const R: usize, const L: bool>(
    src: *const u8,
    base: usize,
    g: usize,
    d: usize,
    qs: &[f32],
    bias: &[f32; R],
    out: *mut f32,
    t_all: usize,
    lut: &[f32; 16],
) {
    debug_assert!(g.is_multiple_of(16) && qs.len() >= R * d);
    // SAFETY: sixteen floats.
    let lut = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
    let mut j = 0;
    // SAFETY: forwarded from the caller; `j + 16 * N <= g` in each call.
    unsafe {
        while j + 64 <= g {
            key_tile::<B, R, 4, L>(src, base + j, g, d, qs, bias, out.add(j), t_all, lut);
            j += 64;
        }
        while j < g {
            key_tile::<B, R, 1, L>(src, base + j, g, d, qs, bias, out.add(j), t_all, lut);
            j += 16;
        }
    }
}

/// `16 * N` tokens of [`key_block`], starting at code index `base` of channel 0.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_tile<const B: usize, const R: usize, const N: usize, const L: bool>(
    src: *const u8,
    base: usize,
    g: usize,
    d: usize,
    qs: &[f32],
    bias: &[f32; R],
    out: *mut f32,
    t_all: usize,
    lut: __m512,
) {
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for r in 0..R {
        acc[r] = [_mm512_set1_ps(bias[r]); N];
    }
    let qp = qs.as_ptr();
    for c in 0..d {
        let mut f = [_mm512_setzero_ps(); N];
        for (n, fv) in f.iter_mut().enumerate() {
            // SAFETY: codes `base + c * g + 16 n .. + 16` lie in the block (caller).
            *fv = unsafe { load16::<B, L>(src, base + c * g + 16 * n, lut) };
        }
        for r in 0..R {
            // SAFETY: `r * d + c < R * d <= qs.len()`.
            let w = _mm512_set1_ps(unsafe { *qp.add(r * d + c) });
            for n in 0..N {
                acc[r][n] = _mm512_fmadd_ps(w, f[n], acc[r][n]);
            }
        }
    }
    for r in 0..R {
        for n in 0..N {
            // SAFETY: sixteen scores of row `r` inside the block (caller).
            unsafe { _mm512_storeu_ps(out.add(r * t_all + 16 * n), unperm::<B>(acc[r][n])) };
        }
    }
}

/// Adds `sum_tt wt[(k / g * R + r) * ws + tt] * (code[tt * d + k] - c0)` over the `tile` tokens of a per-token
/// value tile to `acc[r * d + k]` for all channels `k` and `R` queries.
///
/// # Safety
/// The codes `base .. base + tile * d` lie in the stream at `src`; `wt` has `ng * R * ws` entries with
/// `ng = d / g` and `tile <= ws`; `acc` points to `R` rows of `d` writable accumulators; `g` is a multiple of 16, `d` a multiple of
/// `g`, and the CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(in crate::attn::cpu) unsafe fn value_tile<const B: usize, const R: usize, const L: bool>(
    src: *const u8,
    base: usize,
    tile: usize,
    d: usize,
    g: usize,
    wt: &[f32],
    ws: usize,
    acc: *mut f32,
    c0: f32,
    lut: &[f32; 16],
) {
    debug_assert!(g.is_multiple_of(16) && d.is_multiple_of(g) && tile <= ws && wt.len() >= (d / g) * R * ws);
    // SAFETY: sixteen floats.
    let lut = unsafe { _mm512_loadu_ps(lut.as_ptr()) };
    let mut k = 0;
    // SAFETY: forwarded from the caller; each call covers channels inside one group.
    unsafe {
        while k < d {
            if k % g + 64 <= g {
                value_channels::<B, R, 4, L>(src, base, tile, d, g, k, wt, ws, acc, c0, lut);
                k += 64;
            } else {
                value_channels::<B, R, 1, L>(src, base, tile, d, g, k, wt, ws, acc, c0, lut);
                k += 16;
            }
        }
    }
}

/// Channels `k .. k + 16 * N` (inside one group) of [`value_tile`].
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_channels<const B: usize, const R: usize, const N: usize, const L: bool>(
    src: *const u8,
    base: usize,
    tile: usize,
    d: usize,
    g: usize,
    k: usize,
    wt: &[f32],
    ws: usize,
    acc: *mut f32,
    c0: f32,
    lut: __m512,
) {
    let gi = k / g;
    let c0v = _mm512_set1_ps(c0);
    let mut a = [[_mm512_setzero_ps(); N]; R];
    let wp = wt.as_ptr();
    for tt in 0..tile {
        let mut f = [_mm512_setzero_ps(); N];
        for (n, fv) in f.iter_mut().enumerate() {
            // SAFETY: codes of token `tt`, channels `k + 16 n .. + 16`, lie in the tile (caller).
            *fv = _mm512_sub_ps(unsafe { load16::<B, L>(src, base + tt * d + k + 16 * n, lut) }, c0v);
        }
        for r in 0..R {
            // SAFETY: `(gi * R + r) * ws + tt < ng * R * ws <= wt.len()`.
            let w = _mm512_set1_ps(unsafe { *wp.add((gi * R + r) * ws + tt) });
            for n in 0..N {
                a[r][n] = _mm512_fmadd_ps(w, f[n], a[r][n]);
            }
        }
    }
    for r in 0..R {
        for n in 0..N {
            // SAFETY: accumulator row `r` has `d` entries and `k + 16 (n + 1) <= d`.
            unsafe {
                let ap = acc.add(r * d + k + 16 * n);
                _mm512_storeu_ps(ap, _mm512_add_ps(_mm512_loadu_ps(ap), unperm::<B>(a[r][n])));
            }
        }
    }
}

/// `exp(s[i] - max)` in place for the first `s.len() / 16 * 16` scores, by the polynomial of the AVX2 `exp8` on
/// sixteen lanes; returns their sum (sixteen lane sums, then the lanes added) and how many scores it took.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(in crate::attn::cpu) unsafe fn exp_sum16(s: &mut [f32], max: f32) -> (f32, usize) {
    let n16 = s.len() / 16 * 16;
    let m = _mm512_set1_ps(max);
    let mut sv = _mm512_setzero_ps();
    for c in s[..n16].chunks_exact_mut(16) {
        // SAFETY: sixteen floats in and out.
        unsafe {
            let x = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), m), _mm512_set1_ps(-87.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
            ));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
            let y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
            let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
            let v = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
            _mm512_storeu_ps(c.as_mut_ptr(), v);
            sv = _mm512_add_ps(sv, v);
        }
    }
    (_mm512_reduce_add_ps(sv), n16)
}

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    use crate::attn::{decode_attention_ref, decode_attention_serial, HeadKv};
    use crate::format::{Bits, GroupAxis, QuantSpec};
    use crate::quant::quantize;

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// The fused kernel at the default level (which takes these loops on CPUs with AVX-512F) against the reference,
    /// for every width the loops handle, key blocks of 16, 48 and 128 tokens (16-token tiles) and 64 tokens (64-token
    /// tiles), value groups taking the 16- and 64-channel steps, 1, 3 and 4 query heads per KV head, and a last value
    /// tile that is not full.
    /// The same with Lloyd-Max codebooks (the `L = true` loops: levels from one register), widths 1, 2 and 4.
    /// The sixteen-lane `exp` gives the bits of the eight-lane one lane by lane (the same steps), on lengths around
    /// the multiples of 16, scores down to the clamp at -87 and up to the maximum; the sum within f32 rounding.
    #[test]
    fn exp_sum16_equals_exp8_lane_by_lane() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = StdRng::seed_from_u64(32);
        for len in [0usize, 1, 15, 16, 17, 33, 64, 1000] {
            let x: Vec<f32> =
                (0..len).map(|i| if i % 7 == 3 { -200.0 } else { rng.random::<f32>() * 40.0 - 30.0 }).collect();
            let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut got = x.clone();
            // SAFETY: AVX-512F detected above.
            let (sum, n) = unsafe { super::exp_sum16(&mut got, max) };
            assert_eq!(n, len / 16 * 16);
            let mut want = 0f64;
            for i in (0..n).step_by(8) {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2 and FMA come with AVX-512F; eight floats in and out.
                unsafe {
                    let e = super::super::exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_set1_ps(max)));
                    _mm256_storeu_ps(lanes.as_mut_ptr(), e);
                }
                for (j, l) in lanes.iter().enumerate() {
                    assert_eq!(got[i + j].to_bits(), l.to_bits(), "len {len} at {}", i + j);
                    want += *l as f64;
                }
            }
            assert!((sum as f64 - want).abs() <= 1e-6 * want.max(1e-30), "len {len}: {sum} vs {want}");
            assert_eq!(&got[n..], &x[n..], "scores past the sixteen-lane part are left alone");
        }
    }

    #[test]
    fn wide_loops_match_reference() {
        // These are the f32 loops: per-token layouts would otherwise take the integer kernels. No other unit test
        // depends on the process-wide choice (`intdot`'s tests call their kernels directly).
        crate::attn::set_attn_kernel(Some(crate::attn::AttnKernel::Exact));
        let mut rng = StdRng::seed_from_u64(31);
        let d = 128;
        let widths = [(Bits::B4, Bits::B2), (Bits::B1, Bits::B8), (Bits::B2, Bits::B4), (Bits::B8, Bits::B1)];
        let lloyd = [(Bits::B4, Bits::B2), (Bits::B1, Bits::B4), (Bits::B2, Bits::B1), (Bits::B4, Bits::B4)];
        let cases = widths.map(|w| (w, false)).into_iter().chain(lloyd.map(|w| (w, true)));
        for ((kb, vb), codebook) in cases {
            let spec = |b, g, axis| {
                let s = QuantSpec::new(b, g, axis);
                if codebook {
                    QuantSpec { levels: crate::format::Levels::LloydMax, ..s }
                } else {
                    s
                }
            };
            for (kg, vg) in [(64, 64), (16, 128), (48, 32), (128, 16)] {
                for gqa in [1, 3, 4] {
                    let ctx = 4 * kg;
                    let tail = 5;
                    let mut gauss = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.sample(StandardNormal)).collect() };
                    let (k, v, tail_k, q) = (gauss(ctx * d), gauss((ctx + tail) * d), gauss(tail * d), gauss(gqa * d));
                    let ks = quantize(&spec(kb, kg, GroupAxis::PerChannel), d, &k).unwrap();
                    let vs = quantize(&spec(vb, vg, GroupAxis::PerToken), d, &v).unwrap();
                    let head = HeadKv {
                        sink_k: &[],
                        sink_v: &[],
                        k: Some(ks.view()),
                        v: Some(vs.view()),
                        tail_k: &tail_k,
                        tail_v: &[],
                    };
                    let mut want = vec![0f32; gqa * d];
                    decode_attention_ref(&q, &[head], d, 0.1, &mut want).unwrap();
                    let mut got = vec![0f32; gqa * d];
                    decode_attention_serial(&q, &[head], d, 0.1, &mut got).unwrap();
                    for r in 0..gqa {
                        let e = rel_err(&got[r * d..(r + 1) * d], &want[r * d..(r + 1) * d]);
                        assert!(
                            e < 1e-5,
                            "K{kb}/{kg} V{vb}/{vg} codebook {codebook} gqa {gqa} head {r}: rel err {e:e}"
                        );
                    }
                }
            }
        }
    }
}
