//! Integer-dot scores for packed per-token min-max keys, and integer value sums for per-token values
//! ([`value_tile`], documented there).
//!
//! The scaled query is quantized once per call per key group, round half to even, and each token's key codes are
//! multiplied with it in integer arithmetic: `vpdpbusd` (unsigned codes times signed 8-bit query digits, four
//! products per 32-bit lane) on AVX-512 VNNI. Two precisions:
//! - one digit: `qi = round(q / dq)`, `dq = max|q| / 127`, as llama.cpp quantizes the query for its 8-bit K cache;
//! - two digits (the default): `qi = round(q / dq)`, `dq = max|q| / 16256`, split as `qi = 128 hi + lo` with
//!   `lo` in `-64..64` and `hi` in `-127..=127`; two `vpdpbusd` per code register, and `I = 128 I_hi + I_lo`.
//!   On SmolLM2 the one-digit query moved the next-token distributions of a K4V2 cache by a mean KL of 8e-4
//!   against the exact kernel; the two-digit one by less than what reordering f32 sums does.
//!
//! With `I = sum_c qi_c code_c`, `S = sum_c qi_c` and `C = max_code` (so `C / 2` is the middle code), a token's
//! score is, per group `g` and in this order of f32 operations,
//!
//! ```text
//! x   = (2 I - C S) as f32 * (dq / 2)              // q . (code - C/2), query rounded
//! acc = fma(scale_tg, x, acc)
//! acc = fma(fma(C/2, scale_tg, min_tg), sum_c q_c, acc)
//! ```
//!
//! The integer sums are exact, so the scalar twin ([`keys_pt_ref`]) and the vector kernel give the same bits.
//! Centring the codes puts the query's rounding error only on `code - C/2`, and the exact `sum_c q_c` carries the
//! rest; the error against the exact kernel is at most `scale_tg * dq / 2 * sum_c |code_c - C/2|` per group.
//!
//! The vector kernel handles widths 1, 2, 4 and 8 whose groups fill whole 16-byte chunks (`group * bits` a
//! multiple of 128); the attention uses it for 4 and 8 bits ([`takes_spec`] says why). It takes sixteen tokens
//! at a time as four steps of four: step `s` puts the chunk of tokens `s, s + 4, s + 8, s + 12` in the four
//! 128-bit lanes of one register, so after `vpdpbusd` each lane holds four
//! partial sums of one token and a three-level transpose-and-add leaves the sixteen tokens' sums in natural
//! order. Codes of a byte are split by shift and mask into `8 / B` registers (code `k` of each byte); the query
//! codes are laid out to match once per call, each 16-byte chunk repeated in the four lanes.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::format::{Bits, GroupAxis};
use crate::pack;
use crate::quant::{MetaView, PackedView};

/// The query of one call quantized per key group, for `n_rep` query heads.
#[derive(Default)]
pub(super) struct IntQuery {
    /// 1 or 2 (see the module documentation).
    digits: usize,
    /// `[r][c]` query codes in channel order.
    qi: Vec<i16>,
    /// `dq / 2` per `[r][group]`.
    half_dq: Vec<f32>,
    /// `sum_c q_c` (the scaled f32 query) per `[r][group]`.
    qsum: Vec<f32>,
    /// `max_code * sum_c qi_c` per `[r][group]`.
    off: Vec<i32>,
    /// Query digits in the vector kernel's order: per `[r][group][chunk][k][digit]` 64 bytes (16 bytes, four
    /// times); the high digit first.
    vecs: Vec<u8>,
    /// Metadata of sixteen tokens, `[token][group]`: scales and minimums.
    sc: Vec<f32>,
    mp: Vec<f32>,
    /// One token's codes unpacked (scalar twin).
    codes: Vec<u8>,
}

/// Whether the integer-dot kernel can score keys of this spec and head size: per-token min-max (or HQQ) groups
/// whose codes are 1, 2, 4 or 8 bits and fill whole 16-byte chunks.
pub(super) fn handles(s: &crate::format::QuantSpec, head_dim: usize) -> bool {
    let b = match s.bits {
        Bits::B1 => 1,
        Bits::B2 => 2,
        Bits::B4 => 4,
        Bits::B8 => 8,
        _ => return false,
    };
    s.axis == GroupAxis::PerToken
        && !s.is_codebook()
        && s.group > 0
        && head_dim.is_multiple_of(s.group)
        && (s.group * b).is_multiple_of(128)
}

/// Whether the integer-dot kernel scores keys of this spec and head size when asked to: [`handles`] and at least
/// 4 bits. With 1- and 2-bit keys the model is about ten times as sensitive to any change of the scores (on
/// SmolLM2, K2V4 moves by a mean KL of 8e-5 when only the order of the exact kernel's f32 sums changes, K4V2 by
/// 9e-6), and the two-digit query's error, harmless at 4 bits (1.7e-5), cost 2e-3 there; such keys keep the exact
/// kernel.
pub(super) fn takes_spec(s: &crate::format::QuantSpec, head_dim: usize) -> bool {
    handles(s, head_dim) && s.bits.nominal() >= 4.0
}

/// Width in bits of a view that [`handles`] accepted.
fn width(view: &PackedView<'_>) -> usize {
    view.spec.bits.nominal() as usize
}

/// Quantizes the scaled queries `qq` (`n_rep` rows of `d`) per group of `g` channels, to `digits` (1 or 2) 8-bit
/// digits.
pub(super) fn prepare(qq: &[f32], d: usize, view: &PackedView<'_>, digits: usize, iq: &mut IntQuery) {
    debug_assert!(digits == 1 || digits == 2);
    let qmax = if digits == 1 { 127.0 } else { 16256.0 };
    iq.digits = digits;
    let g = view.spec.group;
    let ng = d / g;
    let n_rep = qq.len() / d;
    let cmax = view.spec.bits.max_code() as i32;
    iq.qi.clear();
    iq.qi.resize(n_rep * d, 0);
    iq.half_dq.clear();
    iq.qsum.clear();
    iq.off.clear();
    for r in 0..n_rep {
        for gi in 0..ng {
            let x = &qq[r * d + gi * g..r * d + (gi + 1) * g];
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dq = amax / qmax;
            let inv = if amax > 0.0 { qmax / amax } else { 0.0 };
            let out = &mut iq.qi[r * d + gi * g..r * d + (gi + 1) * g];
            let mut s = 0i32;
            for (o, &v) in out.iter_mut().zip(x) {
                let c = (v * inv).round_ties_even().clamp(-qmax, qmax) as i16;
                *o = c;
                s += c as i32;
            }
            iq.half_dq.push(dq * 0.5);
            iq.qsum.push(x.iter().sum());
            iq.off.push(cmax * s);
        }
    }
    // The vector layout: chunk `ch` of group `gi` covers codes `gi * g + ch * 128 / B ..`; byte `j` of the chunk
    // holds codes `base + (8 / B) j + k`, `k < 8 / B`, code `k` at bits `B k`.
    let b = width(view);
    let per = 8 / b;
    let nc = g * b / 128;
    iq.vecs.clear();
    iq.vecs.reserve(n_rep * ng * nc * per * digits * 64);
    for r in 0..n_rep {
        for gi in 0..ng {
            for ch in 0..nc {
                let base = r * d + gi * g + ch * 128 / b;
                for k in 0..per {
                    for digit in 0..digits {
                        let mut v = [0u8; 16];
                        for (j, e) in v.iter_mut().enumerate() {
                            let q = iq.qi[base + per * j + k] as i32;
                            let hi = (q + 64) >> 7;
                            *e = match (digits, digit) {
                                (1, _) => q as i8 as u8,
                                (_, 0) => hi as i8 as u8,
                                _ => (q - 128 * hi) as i8 as u8,
                            };
                        }
                        for _ in 0..4 {
                            iq.vecs.extend_from_slice(&v);
                        }
                    }
                }
            }
        }
    }
}

fn meta_at(m: &MetaView<'_>, i: usize) -> f32 {
    match m {
        MetaView::F32(v) => v[i],
        MetaView::F16(v) => v[i].to_f32(),
    }
}

/// Scalar twin: scores of tokens `t_from..view.tokens` for the query heads `r0..r0 + nr` of `iq`, written to
/// `scores[r * t_all + pos + t]`, by the order of operations of the module documentation.
#[allow(clippy::too_many_arguments)]
pub(super) fn keys_pt_ref(
    iq: &mut IntQuery,
    view: &PackedView<'_>,
    r0: usize,
    nr: usize,
    t_from: usize,
    scores: &mut [f32],
    t_all: usize,
    pos: usize,
) {
    let d = view.head_dim;
    let g = view.spec.group;
    let ng = d / g;
    let center = view.spec.bits.max_code() as f32 / 2.0;
    iq.codes.resize(d, 0);
    for t in t_from..view.tokens {
        pack::unpack_range(view.spec.bits, view.codes, t * d, &mut iq.codes);
        for r in r0..r0 + nr {
            let mut acc = 0f32;
            for gi in 0..ng {
                let q = &iq.qi[r * d + gi * g..r * d + (gi + 1) * g];
                let c = &iq.codes[gi * g..(gi + 1) * g];
                let dot: i32 = q.iter().zip(c).map(|(&a, &b)| a as i32 * b as i32).sum();
                let k = r * ng + gi;
                let x = (2 * dot - iq.off[k]) as f32 * iq.half_dq[k];
                let scale = meta_at(&view.scales, t * ng + gi);
                let min = meta_at(&view.mins, t * ng + gi);
                acc = scale.mul_add(x, acc);
                acc = center.mul_add(scale, min).mul_add(iq.qsum[k], acc);
            }
            scores[r * t_all + pos + t] = acc;
        }
    }
}

/// Whether the vector kernel can run here (AVX-512 F/BW/VL with VNNI).
pub(super) fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Scores of all tokens of a view that [`takes_spec`] accepted, for every query head of `iq`: sixteen tokens at a time
/// on the vector kernel, the rest (fewer than sixteen) by the scalar twin. Same bits either way.
///
/// # Safety
///
/// [`vnni`] must be true.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn keys_pt(
    iq: &mut IntQuery,
    view: &PackedView<'_>,
    n_rep: usize,
    scores: &mut [f32],
    t_all: usize,
    pos: usize,
) {
    let whole = view.tokens / 16 * 16;
    let mut r0 = 0;
    while r0 < n_rep {
        let nr = (n_rep - r0).min(4);
        // SAFETY: the caller's guarantee; `takes` bounds the width and the group.
        unsafe {
            if iq.digits == 1 {
                dispatch::<1>(iq, view, nr, r0, whole, scores, t_all, pos);
            } else {
                dispatch::<2>(iq, view, nr, r0, whole, scores, t_all, pos);
            }
        }
        keys_pt_ref(iq, view, r0, nr, whole, scores, t_all, pos);
        r0 += nr;
    }
}

/// Calls the vector kernel for the width of `view`, `nr` query heads and `W` digits.
///
/// # Safety
///
/// [`vnni`] must be true.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dispatch<const W: usize>(
    iq: &mut IntQuery,
    view: &PackedView<'_>,
    nr: usize,
    r0: usize,
    whole: usize,
    scores: &mut [f32],
    t_all: usize,
    pos: usize,
) {
    // SAFETY: the caller's guarantee.
    unsafe {
        match (width(view), nr) {
            (1, 1) => vnni::keys::<1, 1, W>(iq, view, r0, whole, scores, t_all, pos),
            (1, 2) => vnni::keys::<1, 2, W>(iq, view, r0, whole, scores, t_all, pos),
            (1, 3) => vnni::keys::<1, 3, W>(iq, view, r0, whole, scores, t_all, pos),
            (1, _) => vnni::keys::<1, 4, W>(iq, view, r0, whole, scores, t_all, pos),
            (2, 1) => vnni::keys::<2, 1, W>(iq, view, r0, whole, scores, t_all, pos),
            (2, 2) => vnni::keys::<2, 2, W>(iq, view, r0, whole, scores, t_all, pos),
            (2, 3) => vnni::keys::<2, 3, W>(iq, view, r0, whole, scores, t_all, pos),
            (2, _) => vnni::keys::<2, 4, W>(iq, view, r0, whole, scores, t_all, pos),
            (4, 1) => vnni::keys::<4, 1, W>(iq, view, r0, whole, scores, t_all, pos),
            (4, 2) => vnni::keys::<4, 2, W>(iq, view, r0, whole, scores, t_all, pos),
            (4, 3) => vnni::keys::<4, 3, W>(iq, view, r0, whole, scores, t_all, pos),
            (4, _) => vnni::keys::<4, 4, W>(iq, view, r0, whole, scores, t_all, pos),
            (_, 1) => vnni::keys::<8, 1, W>(iq, view, r0, whole, scores, t_all, pos),
            (_, 2) => vnni::keys::<8, 2, W>(iq, view, r0, whole, scores, t_all, pos),
            (_, 3) => vnni::keys::<8, 3, W>(iq, view, r0, whole, scores, t_all, pos),
            (_, _) => vnni::keys::<8, 4, W>(iq, view, r0, whole, scores, t_all, pos),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;

    /// Sums of each 128-bit lane of `v[s]`, the sum of lane `l` of step `s` at element `4 l + s`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn lane_sums(v: [__m512i; 4]) -> __m512i {
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
        _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd))
    }

    /// Chunk `off` (16 bytes from byte `off` of a token) of tokens `t, t + 4, t + 8, t + 12`, one per 128-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn gather4(p: *const u8, t: usize, row: usize, off: usize) -> __m512i {
        // SAFETY: the caller guarantees the four chunks lie in the stream.
        unsafe {
            let ld = |tt: usize| _mm_loadu_si128(p.add(tt * row + off) as *const __m128i);
            let lo = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld(t)), ld(t + 4));
            let hi = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(ld(t + 8)), ld(t + 12));
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }

    /// `out.len()` metadata entries from `start`, as f32 (sixteen at a time for f16).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn meta16(m: &MetaView<'_>, start: usize, out: &mut [f32]) {
        match m {
            MetaView::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            MetaView::F16(v) => {
                let src = &v[start..start + out.len()];
                for (o, h) in out.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
                    // SAFETY: sixteen f16 in, sixteen f32 out.
                    unsafe {
                        let x = _mm256_loadu_si256(h.as_ptr() as *const __m256i);
                        _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(x));
                    }
                }
            }
        }
    }

    /// Scores of tokens `0..whole` (a multiple of 16) for query heads `r0..r0 + R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn keys<const B: usize, const R: usize, const W: usize>(
        iq: &mut IntQuery,
        view: &PackedView<'_>,
        r0: usize,
        whole: usize,
        scores: &mut [f32],
        t_all: usize,
        pos: usize,
    ) {
        let d = view.head_dim;
        let g = view.spec.group;
        let ng = d / g;
        let per = 8 / B;
        let nc = g * B / 128;
        let row = d * B / 8;
        let gb = g * B / 8;
        let center = view.spec.bits.max_code() as f32 / 2.0;
        let mask = _mm512_set1_epi8(((1u32 << B) - 1) as u8 as i8);
        let codes = view.codes.as_ptr();
        debug_assert!(whole * row <= view.codes.len());
        iq.sc.resize(16 * ng, 0.0);
        iq.mp.resize(16 * ng, 0.0);
        debug_assert!(view.scales.len() >= whole * ng && view.mins.len() >= whole * ng);
        let mut t0 = 0;
        while t0 < whole {
            // Metadata of the sixteen tokens, `[token][group]` as stored, converted to f32 in vector registers.
            meta16(&view.scales, t0 * ng, &mut iq.sc[..16 * ng]);
            meta16(&view.mins, t0 * ng, &mut iq.mp[..16 * ng]);
            let mut acc = [_mm512_setzero_ps(); R];
            for gi in 0..ng {
                // High (or only) digit, low digit.
                let mut ia = [[_mm512_setzero_si512(); 4]; R];
                let mut il = [[_mm512_setzero_si512(); 4]; R];
                for (s, _) in [(); 4].iter().enumerate() {
                    for ch in 0..nc {
                        // SAFETY: tokens `t0 .. t0 + 16` lie in the view (`t0 + 16 <= whole <= tokens`), and the
                        // chunk ends inside the group.
                        let x = unsafe { gather4(codes, t0 + s, row, gi * gb + ch * 16) };
                        for k in 0..per {
                            let u = if B == 8 {
                                x
                            } else {
                                let sh = _mm512_srl_epi16(x, _mm_cvtsi32_si128((B * k) as i32));
                                _mm512_and_si512(sh, mask)
                            };
                            for r in 0..R {
                                let at = ((((r0 + r) * ng + gi) * nc + ch) * per + k) * W * 64;
                                // SAFETY: `prepare` wrote `W` times 64 bytes per (query, group, chunk, k).
                                unsafe {
                                    let qv = _mm512_loadu_si512(iq.vecs.as_ptr().add(at) as *const _);
                                    ia[r][s] = _mm512_dpbusd_epi32(ia[r][s], u, qv);
                                    if W == 2 {
                                        let lv = _mm512_loadu_si512(iq.vecs.as_ptr().add(at + 64) as *const _);
                                        il[r][s] = _mm512_dpbusd_epi32(il[r][s], u, lv);
                                    }
                                }
                            }
                        }
                    }
                }
                // SAFETY: `16 * ng` entries in both buffers; entry `tt * ng + gi` is token `tt`'s.
                let (sc, mp) = unsafe {
                    if ng == 1 {
                        (_mm512_loadu_ps(iq.sc.as_ptr()), _mm512_loadu_ps(iq.mp.as_ptr()))
                    } else {
                        let idx = _mm512_add_epi32(
                            _mm512_mullo_epi32(
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                _mm512_set1_epi32(ng as i32),
                            ),
                            _mm512_set1_epi32(gi as i32),
                        );
                        (_mm512_i32gather_ps::<4>(idx, iq.sc.as_ptr()), _mm512_i32gather_ps::<4>(idx, iq.mp.as_ptr()))
                    }
                };
                let mp = _mm512_fmadd_ps(_mm512_set1_ps(center), sc, mp);
                for r in 0..R {
                    let k = (r0 + r) * ng + gi;
                    let dot = if W == 2 {
                        lane_sums(std::array::from_fn(|s| _mm512_add_epi32(_mm512_slli_epi32::<7>(ia[r][s]), il[r][s])))
                    } else {
                        lane_sums(ia[r])
                    };
                    let ip = _mm512_sub_epi32(_mm512_add_epi32(dot, dot), _mm512_set1_epi32(iq.off[k]));
                    let x = _mm512_mul_ps(_mm512_cvtepi32_ps(ip), _mm512_set1_ps(iq.half_dq[k]));
                    acc[r] = _mm512_fmadd_ps(sc, x, acc[r]);
                    acc[r] = _mm512_fmadd_ps(mp, _mm512_set1_ps(iq.qsum[k]), acc[r]);
                }
            }
            for r in 0..R {
                let o = (r0 + r) * t_all + pos + t0;
                let out = &mut scores[o..o + 16];
                // SAFETY: sixteen scores.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc[r]) };
            }
            t0 += 16;
        }
    }
}

/// Buffers of the integer value tile: per query the two digits of each weight of the tile (padded to a multiple of
/// four tokens), their sums and `dw / 2`.
#[derive(Default)]
pub(super) struct ValueDigits {
    hi: Vec<i8>,
    lo: Vec<i8>,
    sum: Vec<i32>,
    half_dw: Vec<f32>,
    quad: usize,
}

/// Whether the integer kernel sums values of this spec and head size (per-token min-max or HQQ groups of 2, 4 or
/// 8 bits that fill whole 16-byte chunks).
pub(super) fn takes_values(s: &crate::format::QuantSpec, head_dim: usize) -> bool {
    handles(s, head_dim) && s.bits != Bits::B1
}

/// Whether the integer value kernel can run here (AVX-512 VNNI and VBMI).
pub(super) fn vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| vnni() && is_x86_feature_detected!("avx512vbmi"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Two-digit weights of one group of a tile: `w = p_t * scale_tg` (non-negative) for `R` queries, rows of `wt`
/// (`[group][query][token]`, stride `ws`) from `(gi * R + r) * ws`, `tile` tokens. `wi = round(w / dw)`,
/// `dw = max w / 16256`, `wi = 128 hi + lo` with `lo` in `-64..64`.
#[cfg_attr(not(test), allow(dead_code))]
fn value_digits(wt: &[f32], ws: usize, gi: usize, r_count: usize, tile: usize, vd: &mut ValueDigits) {
    let quad = tile.div_ceil(4) * 4;
    vd.quad = quad;
    vd.hi.clear();
    vd.lo.clear();
    vd.hi.resize(r_count * quad, 0);
    vd.lo.resize(r_count * quad, 0);
    vd.sum.clear();
    vd.half_dw.clear();
    for r in 0..r_count {
        let w = &wt[(gi * r_count + r) * ws..(gi * r_count + r) * ws + tile];
        let wmax = w.iter().fold(0f32, |m, &x| m.max(x));
        let inv = if wmax > 0.0 { 16256.0 / wmax } else { 0.0 };
        let mut sum = 0i32;
        for (t, &x) in w.iter().enumerate() {
            let q = (x * inv).round_ties_even().clamp(0.0, 16256.0) as i32;
            let hi = (q + 64) >> 7;
            vd.hi[r * quad + t] = hi as i8;
            vd.lo[r * quad + t] = (q - 128 * hi) as i8;
            sum += q;
        }
        vd.sum.push(sum);
        vd.half_dw.push(wmax / 16256.0 * 0.5);
    }
}

thread_local! {
    static DIGITS: std::cell::RefCell<ValueDigits> = std::cell::RefCell::new(ValueDigits::default());
}

/// [`value_tile`] with this thread's digit buffers.
///
/// # Safety
///
/// As for [`value_tile`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_tile_here<const B: usize, const R: usize>(
    src: *const u8,
    base: usize,
    tile: usize,
    d: usize,
    g: usize,
    wt: &[f32],
    ws: usize,
    acc: *mut f32,
    cmax: i32,
) {
    DIGITS.with(|vd| {
        // SAFETY: the caller's contract.
        unsafe { value_tile::<B, R>(src, base, tile, d, g, wt, ws, acc, cmax, &mut vd.borrow_mut()) }
    })
}

/// [`value_digits`] sixteen weights at a time (the same digits: the same f32 products, rounded half to even by
/// the conversion).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn value_digits_avx512(wt: &[f32], ws: usize, gi: usize, r_count: usize, tile: usize, vd: &mut ValueDigits) {
    let quad = tile.div_ceil(4) * 4;
    vd.quad = quad;
    vd.hi.clear();
    vd.lo.clear();
    // Sixteen bytes of slack for the last store.
    vd.hi.resize(r_count * quad + 16, 0);
    vd.lo.resize(r_count * quad + 16, 0);
    vd.sum.clear();
    vd.half_dw.clear();
    for r in 0..r_count {
        let w = &wt[(gi * r_count + r) * ws..(gi * r_count + r) * ws + tile];
        let n16 = tile / 16 * 16;
        let mut mv = _mm512_setzero_ps();
        for c in w[..n16].chunks_exact(16) {
            // SAFETY: sixteen floats.
            mv = _mm512_max_ps(mv, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let wmax = w[n16..].iter().fold(_mm512_reduce_max_ps(mv).max(0.0), |m, &x| m.max(x));
        let inv = if wmax > 0.0 { 16256.0 / wmax } else { 0.0 };
        let iv = _mm512_set1_ps(inv);
        let mut sv = _mm512_setzero_si512();
        let mut t = 0;
        while t < tile {
            let n = (tile - t).min(16);
            let m: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // SAFETY: `n` lanes of `w` from `t`; the stores write sixteen bytes at `r * quad + t`, inside the
            // buffers with their slack; lanes past `n` are zero and land on padding or the next row's start, which
            // its own stores overwrite.
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, w.as_ptr().add(t));
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(x, iv));
                let hi = _mm512_srai_epi32::<7>(_mm512_add_epi32(q, _mm512_set1_epi32(64)));
                let lo = _mm512_sub_epi32(q, _mm512_slli_epi32::<7>(hi));
                sv = _mm512_add_epi32(sv, q);
                _mm_storeu_si128(vd.hi.as_mut_ptr().add(r * quad + t) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
                _mm_storeu_si128(vd.lo.as_mut_ptr().add(r * quad + t) as *mut __m128i, _mm512_cvtepi32_epi8(lo));
            }
            t += 16;
        }
        // Padding tokens of this row (up to `quad`) must be zero: rewrite them after the stores.
        for t in tile..quad {
            vd.hi[r * quad + t] = 0;
            vd.lo[r * quad + t] = 0;
        }
        vd.sum.push(_mm512_reduce_add_epi32(sv));
        vd.half_dw.push(wmax / 16256.0 * 0.5);
    }
}

/// Scalar twin of [`value_tile`]: for every group, `acc[r][c] += ((2 I - C S) as f32) * (dw / 2)` with
/// `I = sum_t wi_t code_tc` and `S = sum_t wi_t`, codes of tokens `0..tile` from code index `base` of `codes`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(test), allow(dead_code))]
pub(super) fn value_tile_ref(
    bits: Bits,
    codes: &[u8],
    base: usize,
    tile: usize,
    d: usize,
    g: usize,
    r_count: usize,
    wt: &[f32],
    ws: usize,
    acc: &mut [f32],
    vd: &mut ValueDigits,
) {
    let cmax = bits.max_code() as i32;
    let mut row = vec![0u8; tile * d];
    pack::unpack_range(bits, codes, base, &mut row);
    for gi in 0..d / g {
        value_digits(wt, ws, gi, r_count, tile, vd);
        for r in 0..r_count {
            for c in gi * g..(gi + 1) * g {
                let dot: i32 = (0..tile)
                    .map(|t| {
                        (128 * vd.hi[r * vd.quad + t] as i32 + vd.lo[r * vd.quad + t] as i32) * row[t * d + c] as i32
                    })
                    .sum();
                let x = (2 * dot - cmax * vd.sum[r]) as f32 * vd.half_dw[r];
                acc[r * d + c] += x;
            }
        }
    }
}

/// [`value_tile_ref`] on AVX-512 VNNI and VBMI: per 16-byte chunk of each row, the chunks of four tokens go in one
/// register and `vpermb` turns it so that each 32-bit lane holds one byte position of the four tokens; shift and
/// mask give code `k` of each byte, and `vpdpbusd` with the four tokens' weight digits (broadcast) sums over
/// the tokens. Accumulators are per chunk and `k`, so channel `per * j + k` of the chunk sits in lane `j` of
/// register `k`; each goes to its channel once per tile.
///
/// # Safety
///
/// [`vbmi`] is true; `B` is 2, 4 or 8; codes of tokens `0..tile` from code index `base` lie in the stream at `src`;
/// `wt` holds `d / g` groups of `R` rows of `ws >= tile` weights; `acc` points to `R` rows of `d` accumulators;
/// `g * B` is a multiple of 128 and `d` of `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_tile<const B: usize, const R: usize>(
    src: *const u8,
    base: usize,
    tile: usize,
    d: usize,
    g: usize,
    wt: &[f32],
    ws: usize,
    acc: *mut f32,
    cmax: i32,
    vd: &mut ValueDigits,
) {
    static ZERO: [u8; 16] = [0; 16];
    debug_assert!(matches!(B, 2 | 4 | 8) && (g * B).is_multiple_of(128) && d.is_multiple_of(g) && tile <= ws);
    let per = 8 / B;
    let nc = g * B / 128;
    let rb = d * B / 8;
    let mask = _mm512_set1_epi8(((1u32 << B) - 1) as u8 as i8);
    // Output byte `4 j + s` is input byte `16 s + j`.
    let idx = _mm512_set_epi8(
        63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12, 59, 43, 27, 11, 58, 42, 26, 10, 57, 41, 25, 9,
        56, 40, 24, 8, 55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20, 4, 51, 35, 19, 3, 50, 34, 18, 2, 49,
        33, 17, 1, 48, 32, 16, 0,
    );
    // SAFETY (for the whole body): the caller's contract; rows past `tile` read the zero chunk instead.
    unsafe {
        let first = src.add(base * B / 8);
        for gi in 0..d / g {
            value_digits_avx512(wt, ws, gi, R, tile, vd);
            for cl in 0..nc {
                let ch = gi * nc + cl;
                let mut ia = [[_mm512_setzero_si512(); 8]; R];
                let mut il = [[_mm512_setzero_si512(); 8]; R];
                for q in (0..tile).step_by(4) {
                    let row = |s: usize| -> *const __m128i {
                        if q + s < tile {
                            first.add((q + s) * rb + ch * 16) as *const __m128i
                        } else {
                            ZERO.as_ptr() as *const __m128i
                        }
                    };
                    let lo = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(row(0))),
                        _mm_loadu_si128(row(1)),
                    );
                    let hi = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(row(2))),
                        _mm_loadu_si128(row(3)),
                    );
                    let x = _mm512_permutexvar_epi8(idx, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi));
                    let mut wh = [_mm512_setzero_si512(); R];
                    let mut wl = [_mm512_setzero_si512(); R];
                    for r in 0..R {
                        let at = r * vd.quad + q;
                        wh[r] = _mm512_set1_epi32((vd.hi.as_ptr().add(at) as *const i32).read_unaligned());
                        wl[r] = _mm512_set1_epi32((vd.lo.as_ptr().add(at) as *const i32).read_unaligned());
                    }
                    for k in 0..per {
                        let u = if B == 8 {
                            x
                        } else {
                            _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128((B * k) as i32)), mask)
                        };
                        for r in 0..R {
                            ia[r][k] = _mm512_dpbusd_epi32(ia[r][k], u, wh[r]);
                            il[r][k] = _mm512_dpbusd_epi32(il[r][k], u, wl[r]);
                        }
                    }
                }
                for r in 0..R {
                    let off = _mm512_set1_epi32(cmax * vd.sum[r]);
                    let hd = _mm512_set1_ps(vd.half_dw[r]);
                    for k in 0..per {
                        let i = _mm512_add_epi32(_mm512_slli_epi32::<7>(ia[r][k]), il[r][k]);
                        let ip = _mm512_sub_epi32(_mm512_add_epi32(i, i), off);
                        let mut x = [0f32; 16];
                        _mm512_storeu_ps(x.as_mut_ptr(), _mm512_mul_ps(_mm512_cvtepi32_ps(ip), hd));
                        let a = acc.add(r * d + ch * 16 * per + k);
                        for (j, v) in x.iter().enumerate() {
                            *a.add(per * j) += v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{MetaDtype, QuantSpec};
    use crate::quant::PackedStream;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The vector kernel equals the scalar twin bit for bit, and both stay within the documented bound of the
    /// exact scores, for every width, group and query batch it takes, with token counts around its blocks of 16.
    #[test]
    fn vector_kernel_equals_scalar_twin_and_stays_within_the_bound() {
        let mut rng = Lcg(7);
        for (bits, b) in [(Bits::B1, 1usize), (Bits::B2, 2), (Bits::B4, 4), (Bits::B8, 8)] {
            for d in [64usize, 128] {
                for g in [16usize, 32, 64, 128] {
                    if g > d || g * b % 128 != 0 {
                        continue;
                    }
                    for meta in [MetaDtype::F16, MetaDtype::F32] {
                        for (n_rep, digits) in [(1usize, 1usize), (3, 2), (4, 1), (5, 2), (3, 1), (4, 2)] {
                            let tokens = [1usize, 15, 16, 17, 49][(d + g + n_rep) % 5] + 16 * (b % 3);
                            let spec = QuantSpec { meta, ..QuantSpec::new(bits, g, GroupAxis::PerToken) };
                            let keys: Vec<f32> =
                                (0..tokens * d).map(|i| rng.next() * 3.0 + (i % 7) as f32 * 0.1).collect();
                            let mut stream = PackedStream::new(spec, d).unwrap();
                            stream.push(&keys).unwrap();
                            let view = stream.view();
                            assert!(handles(&view.spec, d));
                            assert_eq!(takes_spec(&view.spec, d), b >= 4);
                            let qq: Vec<f32> = (0..n_rep * d).map(|_| rng.next() * 0.5).collect();
                            let mut iq = IntQuery::default();
                            prepare(&qq, d, &view, digits, &mut iq);
                            let (t_all, pos) = (tokens + 3, 2);
                            let mut want = vec![0f32; n_rep * t_all];
                            keys_pt_ref(&mut iq, &view, 0, n_rep, 0, &mut want, t_all, pos);
                            if vnni() {
                                let mut got = vec![0f32; n_rep * t_all];
                                // SAFETY: VNNI detected.
                                unsafe { keys_pt(&mut iq, &view, n_rep, &mut got, t_all, pos) };
                                for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                                    assert_eq!(
                                        a.to_bits(),
                                        w.to_bits(),
                                        "{bits:?} d {d} g {g} R {n_rep} W {digits} at {i}"
                                    );
                                }
                            }
                            // Against exact scores over the dequantized keys.
                            let mut deq = vec![0f32; tokens * d];
                            crate::quant::dequantize_ref(&view, &mut deq).unwrap();
                            let mut codes = vec![0u8; d];
                            let ng = d / g;
                            let center = bits.max_code() as f64 / 2.0;
                            for r in 0..n_rep {
                                for t in 0..tokens {
                                    let q = &qq[r * d..(r + 1) * d];
                                    let k = &deq[t * d..(t + 1) * d];
                                    pack::unpack_range(bits, view.codes, t * d, &mut codes);
                                    let exact: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                                    let mut bound = 0f64;
                                    for gi in 0..ng {
                                        let sc = meta_at(&view.scales, t * ng + gi) as f64;
                                        let dev: f64 = codes[gi * g..(gi + 1) * g]
                                            .iter()
                                            .map(|&c| (c as f64 - center).abs())
                                            .sum();
                                        bound += sc * iq.half_dq[r * ng + gi] as f64 * dev;
                                    }
                                    let got = want[r * t_all + pos + t] as f64;
                                    let slack = 1e-5 * (1.0 + exact.abs() + bound);
                                    assert!(
                                        (got - exact).abs() <= bound + slack,
                                        "{bits:?} d {d} g {g} r {r} t {t}: {got} vs {exact}, bound {bound}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The integer value tile equals its scalar twin bit for bit, and stays within `dw / 2 * sum |code - C/2|`
    /// of the f64 sum `sum_t w_t (code_tc - C/2)`, for every width, group, query batch and tile length it takes.
    #[test]
    fn value_tile_equals_scalar_twin_and_stays_within_the_bound() {
        let mut rng = Lcg(11);
        for (bits, b) in [(Bits::B2, 2usize), (Bits::B4, 4), (Bits::B8, 8)] {
            for d in [64usize, 128] {
                for g in [16usize, 32, 64, 128] {
                    if g > d || g * b % 128 != 0 {
                        continue;
                    }
                    for (r_count, tile) in [(1usize, 64usize), (3, 61), (4, 1), (2, 6), (3, 64)] {
                        let spec = QuantSpec::new(bits, g, GroupAxis::PerToken);
                        let tokens = tile + 5;
                        let vals: Vec<f32> = (0..tokens * d).map(|_| rng.next() * 2.0).collect();
                        let mut stream = PackedStream::new(spec, d).unwrap();
                        stream.push(&vals).unwrap();
                        let view = stream.view();
                        assert!(takes_values(&view.spec, d));
                        let ng = d / g;
                        let ws = 64;
                        // Softmax-like weights: non-negative, one of them the largest by far.
                        let wt: Vec<f32> =
                            (0..ng * r_count * ws).map(|i| (rng.next() * 4.0).exp() * (i % 5) as f32).collect();
                        let base = 3 * d;
                        let mut vd = ValueDigits::default();
                        let mut want = vec![0.5f32; r_count * d];
                        value_tile_ref(bits, view.codes, base, tile, d, g, r_count, &wt, ws, &mut want, &mut vd);
                        if vbmi() {
                            let mut got = vec![0.5f32; r_count * d];
                            let cmax = bits.max_code() as i32;
                            // SAFETY: VNNI and VBMI detected; the tile lies in the stream.
                            unsafe {
                                let p = got.as_mut_ptr();
                                let c = view.codes.as_ptr();
                                match (b, r_count) {
                                    (2, 1) => value_tile::<2, 1>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (2, 2) => value_tile::<2, 2>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (2, 3) => value_tile::<2, 3>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (2, _) => value_tile::<2, 4>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (4, 1) => value_tile::<4, 1>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (4, 2) => value_tile::<4, 2>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (4, 3) => value_tile::<4, 3>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (4, _) => value_tile::<4, 4>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (_, 1) => value_tile::<8, 1>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (_, 2) => value_tile::<8, 2>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (_, 3) => value_tile::<8, 3>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                    (_, _) => value_tile::<8, 4>(c, base, tile, d, g, &wt, ws, p, cmax, &mut vd),
                                }
                            }
                            for (i, (a, w)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    a.to_bits(),
                                    w.to_bits(),
                                    "{bits:?} d {d} g {g} R {r_count} tile {tile} at {i}"
                                );
                            }
                        }
                        let mut codes = vec![0u8; tile * d];
                        pack::unpack_range(bits, view.codes, base, &mut codes);
                        let center = bits.max_code() as f64 / 2.0;
                        for r in 0..r_count {
                            for c in 0..d {
                                let gi = c / g;
                                let w = &wt[(gi * r_count + r) * ws..(gi * r_count + r) * ws + tile];
                                let wmax = w.iter().fold(0f32, |m, &x| m.max(x)) as f64;
                                let exact: f64 =
                                    (0..tile).map(|t| w[t] as f64 * (codes[t * d + c] as f64 - center)).sum();
                                let dev: f64 = (0..tile).map(|t| (codes[t * d + c] as f64 - center).abs()).sum();
                                let bound = wmax / 16256.0 / 2.0 * dev + 1e-5 * (exact.abs() + wmax * dev);
                                let got = want[r * d + c] as f64 - 0.5;
                                assert!(
                                    (got - exact).abs() <= bound,
                                    "{bits:?} d {d} g {g} r {r} c {c}: {got} vs {exact}, bound {bound}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
