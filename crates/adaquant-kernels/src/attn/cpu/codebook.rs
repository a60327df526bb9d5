//! Fused attention over Lloyd-Max views: codes index a table of at most 16 levels, each group has one scale and no
//! minimum, so
//! - per-channel keys: `s_t = sum_c (q_c * scale_bc) L[code_ct]`;
//! - per-token keys: `s_t = sum_g scale_tg (q_g . L[code_tg])`;
//! - per-token values: `o += sum_t (p_t scale_tg) L[code_tg]`;
//! - per-channel values: `o_c += scale_bc (p_b . L[code_bc])`.
//!
//! The levels are symmetric around zero, so value sums need no centring. The portable path (`generic`) looks levels
//! up one code at a time from codes unpacked into a byte buffer; the AVX2 path (`avx2`) keeps the table in two
//! registers and turns eight codes into eight levels with two permutes and a blend (one permute for 8 levels or
//! fewer). On AVX-512 CPUs, per-channel keys and per-token values of 1, 2 and 4 bits with groups of a multiple of 16
//! run the min-max kernels' AVX-512 loops with the conversion `code as f32` replaced by one `vpermps` from the
//! table in one register (`avx512::key_block` and `value_tile` with `L = true`). None materializes dequantized
//! history.

use super::resize;
use crate::format::GroupAxis;
use crate::pack;
use crate::quant::codebook::levels;
use crate::quant::PackedView;

fn table(view: &PackedView<'_>) -> &'static [f32] {
    levels(view.spec.bits).expect("checked Lloyd-Max views have a codebook")
}

/// Portable kernels.
pub(super) mod generic {
    use super::*;

    pub(in crate::attn::cpu) fn packed_scores(
        qq: &[f32],
        view: &PackedView<'_>,
        scores: &mut [f32],
        t_all: usize,
        pos: usize,
        codes: &mut Vec<u8>,
    ) {
        let d = view.head_dim;
        let g = view.spec.group;
        let n_rep = qq.len() / d;
        let lv = table(view);
        match view.spec.axis {
            GroupAxis::PerChannel => {
                codes.resize(g * d, 0);
                let mut qs = vec![0f32; d];
                for b in 0..view.tokens / g {
                    pack::unpack_range(view.spec.bits, view.codes, b * g * d, codes);
                    for r in 0..n_rep {
                        for c in 0..d {
                            qs[c] = qq[r * d + c] * view.scales.get(b * d + c);
                        }
                        let out = &mut scores[r * t_all + pos + b * g..r * t_all + pos + (b + 1) * g];
                        out.fill(0.0);
                        for c in 0..d {
                            for (o, &code) in out.iter_mut().zip(&codes[c * g..(c + 1) * g]) {
                                *o += qs[c] * lv[code as usize];
                            }
                        }
                    }
                }
            }
            GroupAxis::PerToken => {
                codes.resize(d, 0);
                let ng = d / g;
                for t in 0..view.tokens {
                    pack::unpack_range(view.spec.bits, view.codes, t * d, codes);
                    for r in 0..n_rep {
                        let qr = &qq[r * d..(r + 1) * d];
                        let mut s = 0f32;
                        for gi in 0..ng {
                            let mut dq = 0f32;
                            for k in gi * g..(gi + 1) * g {
                                dq += qr[k] * lv[codes[k] as usize];
                            }
                            s += view.scales.get(t * ng + gi) * dq;
                        }
                        scores[r * t_all + pos + t] = s;
                    }
                }
            }
        }
    }

    pub(in crate::attn::cpu) fn packed_values(
        p: &[f32],
        t_all: usize,
        view: &PackedView<'_>,
        acc: &mut [f32],
        pos: usize,
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let d = view.head_dim;
        let g = view.spec.group;
        let n_rep = acc.len() / d;
        let lv = table(view);
        match view.spec.axis {
            GroupAxis::PerToken => {
                codes.resize(d, 0);
                let ng = d / g;
                for t in 0..view.tokens {
                    pack::unpack_range(view.spec.bits, view.codes, t * d, codes);
                    for r in 0..n_rep {
                        let pt = p[r * t_all + pos + t];
                        let ar = &mut acc[r * d..(r + 1) * d];
                        for gi in 0..ng {
                            let w = pt * view.scales.get(t * ng + gi);
                            for k in gi * g..(gi + 1) * g {
                                ar[k] += w * lv[codes[k] as usize];
                            }
                        }
                    }
                }
            }
            GroupAxis::PerChannel => {
                codes.resize(g * d, 0);
                resize(tmp, d);
                for b in 0..view.tokens / g {
                    pack::unpack_range(view.spec.bits, view.codes, b * g * d, codes);
                    view.scales.read_into(b * d, tmp);
                    for r in 0..n_rep {
                        let pb = &p[r * t_all + pos + b * g..r * t_all + pos + (b + 1) * g];
                        for c in 0..d {
                            let mut dot = 0f32;
                            for (&pj, &code) in pb.iter().zip(&codes[c * g..(c + 1) * g]) {
                                dot += pj * lv[code as usize];
                            }
                            acc[r * d + c] += tmp[c] * dot;
                        }
                    }
                }
            }
        }
    }
}

/// AVX2/FMA kernels, monomorphized over the code width `B` (1, 2, 3, 4, or 8 for codes unpacked into bytes) and
/// the number `R` (1 to 4) of query heads that share each load of codes.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::avx512;
    use super::super::avx2::{code_width, hsum, load8i, meta_into};
    use super::*;

    /// The levels of a codebook in two registers (lanes 0..8 and 8..16, zero-padded).
    #[derive(Clone, Copy)]
    struct Lut {
        lo: __m256,
        hi: __m256,
        wide: bool,
    }

    #[target_feature(enable = "avx2,fma")]
    fn lut_of(lv: &[f32]) -> Lut {
        let mut t = [0f32; 16];
        t[..lv.len()].copy_from_slice(lv);
        // SAFETY: two loads of eight lanes from a sixteen-element array.
        unsafe { Lut { lo: _mm256_loadu_ps(t.as_ptr()), hi: _mm256_loadu_ps(t.as_ptr().add(8)), wide: lv.len() > 8 } }
    }

    /// The levels of eight codes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn look(l: Lut, idx: __m256i) -> __m256 {
        let lo = _mm256_permutevar8x32_ps(l.lo, idx);
        if !l.wide {
            return lo;
        }
        let hi = _mm256_permutevar8x32_ps(l.hi, idx);
        _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))))
    }

    /// Calls `$f::<B, R>($args)` with `B` in {1, 2, 3, 4, 8} and `R` in 1..=4 chosen at run time.
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
                (_, 1) => $f::<8, 1>($($arg),*), (_, 2) => $f::<8, 2>($($arg),*),
                (_, 3) => $f::<8, 3>($($arg),*), (_, _) => $f::<8, 4>($($arg),*),
            }
        };
    }

    /// What one batch of `R` query rows needs.
    struct Batch<'a, 'b> {
        view: &'a PackedView<'b>,
        r0: usize,
        t_all: usize,
        pos: usize,
        direct: bool,
        lut: Lut,
        /// The table for the AVX-512 loops.
        lut16: [f32; 16],
    }

    /// Scores of a Lloyd-Max key view; group sizes that are not multiples of 8 go to the portable kernel.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::attn::cpu) fn packed_scores(
        qq: &[f32],
        view: &PackedView<'_>,
        scores: &mut [f32],
        t_all: usize,
        pos: usize,
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        if !view.spec.group.is_multiple_of(8) {
            generic::packed_scores(qq, view, scores, t_all, pos, codes);
            return;
        }
        let n_rep = qq.len() / view.head_dim;
        let (b, direct) = code_width(view);
        let lut = lut_of(table(view));
        let lut16 = avx512::lut16(table(view));
        let mut r0 = 0;
        while r0 < n_rep {
            let nr = (n_rep - r0).min(4);
            let batch = Batch { view, r0, t_all, pos, direct, lut, lut16 };
            match view.spec.axis {
                GroupAxis::PerChannel => dispatch!(keys_pc, b, nr, (&batch, qq, &mut *scores, &mut *codes, &mut *tmp)),
                GroupAxis::PerToken => dispatch!(keys_pt, b, nr, (&batch, qq, &mut *scores, &mut *codes, &mut *tmp)),
            }
            r0 += nr;
        }
    }

    /// Adds the value sum of a Lloyd-Max value view; group sizes that are not multiples of 8 go to the portable
    /// kernel.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::attn::cpu) fn packed_values(
        p: &[f32],
        t_all: usize,
        view: &PackedView<'_>,
        acc: &mut [f32],
        pos: usize,
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        if !view.spec.group.is_multiple_of(8) {
            generic::packed_values(p, t_all, view, acc, pos, codes, tmp);
            return;
        }
        let n_rep = acc.len() / view.head_dim;
        let (b, direct) = code_width(view);
        let lut = lut_of(table(view));
        let lut16 = avx512::lut16(table(view));
        let mut r0 = 0;
        while r0 < n_rep {
            let nr = (n_rep - r0).min(4);
            let batch = Batch { view, r0, t_all, pos, direct, lut, lut16 };
            match view.spec.axis {
                GroupAxis::PerToken => dispatch!(values_pt, b, nr, (&batch, p, &mut *acc, &mut *codes, &mut *tmp)),
                GroupAxis::PerChannel => dispatch!(values_pc, b, nr, (&batch, p, &mut *acc, &mut *codes, &mut *tmp)),
            }
            r0 += nr;
        }
    }

    /// The codes of one block or token: straight from the stream, or unpacked into `codes` (then read as bytes).
    fn source(batch: &Batch<'_, '_>, start: usize, n: usize, codes: &mut Vec<u8>) -> (*const u8, usize) {
        if batch.direct {
            (batch.view.codes.as_ptr(), start)
        } else {
            codes.resize(n, 0);
            pack::unpack_range(batch.view.spec.bits, batch.view.codes, start, codes);
            (codes.as_ptr(), 0)
        }
    }

    /// Per-channel keys: per block, `s_t = sum_c (q_c scale_c) L[code_ct]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn keys_pc<const B: usize, const R: usize>(
        batch: &Batch<'_, '_>,
        qq: &[f32],
        scores: &mut [f32],
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let view = batch.view;
        let (d, g, r0) = (view.head_dim, view.spec.group, batch.r0);
        resize(tmp, d + R * d);
        let (sc, qs) = tmp.split_at_mut(d);
        let wide = batch.direct && avx512::supports(B, g);
        for blk in 0..view.tokens / g {
            meta_into(&view.scales, blk * d, sc);
            for r in 0..R {
                for c in 0..d {
                    qs[r * d + c] = qq[(r0 + r) * d + c] * sc[c];
                }
            }
            let (src, base) = source(batch, blk * g * d, g * d, codes);
            if wide {
                // SAFETY: AVX-512F was detected (`supports`); the block's codes lie in the stream, `qs` has `R * d`
                // entries and the `g` scores of each query row `r0 + r` start at the pointer passed.
                unsafe {
                    let out = scores.as_mut_ptr().add(r0 * batch.t_all + batch.pos + blk * g);
                    avx512::key_block::<B, R, true>(src, base, g, d, qs, &[0.0; R], out, batch.t_all, &batch.lut16);
                }
                continue;
            }
            let mut j = 0;
            while j < g {
                let mut acc = [_mm256_setzero_ps(); R];
                for c in 0..d {
                    // SAFETY: codes `base + c * g + j .. + 8` lie inside the block (g is a multiple of 8).
                    let f = look(batch.lut, unsafe { load8i::<B>(src, base + c * g + j) });
                    for r in 0..R {
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(qs[r * d + c]), f, acc[r]);
                    }
                }
                for r in 0..R {
                    let o = (r0 + r) * batch.t_all + batch.pos + blk * g + j;
                    // SAFETY: eight scores of query `r0 + r` inside this block.
                    unsafe { _mm256_storeu_ps(scores[o..o + 8].as_mut_ptr(), acc[r]) };
                }
                j += 8;
            }
        }
    }

    /// Per-token keys: `s_t = sum_g scale_tg (q_g . L[code_tg])`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn keys_pt<const B: usize, const R: usize>(
        batch: &Batch<'_, '_>,
        qq: &[f32],
        scores: &mut [f32],
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let view = batch.view;
        let (d, g, r0) = (view.head_dim, view.spec.group, batch.r0);
        let ng = d / g;
        resize(tmp, ng);
        for t in 0..view.tokens {
            meta_into(&view.scales, t * ng, tmp);
            let (src, base) = source(batch, t * d, d, codes);
            let mut acc = [_mm256_setzero_ps(); R];
            for gi in 0..ng {
                let mut part = [_mm256_setzero_ps(); R];
                let mut k = gi * g;
                while k < (gi + 1) * g {
                    // SAFETY: codes `base + k .. + 8` belong to token `t`; query rows have `d` elements.
                    unsafe {
                        let f = look(batch.lut, load8i::<B>(src, base + k));
                        for r in 0..R {
                            let qv = _mm256_loadu_ps(qq.as_ptr().add((r0 + r) * d + k));
                            part[r] = _mm256_fmadd_ps(qv, f, part[r]);
                        }
                    }
                    k += 8;
                }
                let s = _mm256_set1_ps(tmp[gi]);
                for r in 0..R {
                    acc[r] = _mm256_fmadd_ps(s, part[r], acc[r]);
                }
            }
            for r in 0..R {
                scores[(r0 + r) * batch.t_all + batch.pos + t] = hsum(acc[r]);
            }
        }
    }

    /// Per-token values: `o += (p_t scale_tg) L[code_tg]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values_pt<const B: usize, const R: usize>(
        batch: &Batch<'_, '_>,
        p: &[f32],
        acc: &mut [f32],
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let view = batch.view;
        let (d, g, r0) = (view.head_dim, view.spec.group, batch.r0);
        let ng = d / g;
        if batch.direct && avx512::supports(B, g) {
            // Tiles of tokens with their weights `p_t scale_tg` laid out [group][query][token], as the AVX-512
            // loop of the min-max kernel takes them (levels are symmetric, so no centre is subtracted).
            const TILE: usize = 64;
            resize(tmp, TILE * ng + TILE * ng * R);
            let (sc, wt) = tmp.split_at_mut(TILE * ng);
            let mut t0 = 0;
            while t0 < view.tokens {
                let tile = (view.tokens - t0).min(TILE);
                meta_into(&view.scales, t0 * ng, &mut sc[..tile * ng]);
                for r in 0..R {
                    let prow = &p[(r0 + r) * batch.t_all + batch.pos + t0..][..tile];
                    for gi in 0..ng {
                        let wrow = &mut wt[(gi * R + r) * TILE..][..tile];
                        for (tt, w) in wrow.iter_mut().enumerate() {
                            *w = prow[tt] * sc[tt * ng + gi];
                        }
                    }
                }
                // SAFETY: AVX-512F was detected (`supports`); the tile's codes lie in the stream, `wt` holds the
                // tile's weights and accumulator rows `r0 .. r0 + R` have `d` entries each.
                unsafe {
                    let a = acc.as_mut_ptr().add(r0 * d);
                    avx512::value_tile::<B, R, true>(
                        view.codes.as_ptr(),
                        t0 * d,
                        tile,
                        d,
                        g,
                        wt,
                        TILE,
                        a,
                        0.0,
                        &batch.lut16,
                    );
                }
                t0 += tile;
            }
            return;
        }
        resize(tmp, ng);
        for t in 0..view.tokens {
            meta_into(&view.scales, t * ng, tmp);
            let (src, base) = source(batch, t * d, d, codes);
            let mut pt = [0f32; R];
            for r in 0..R {
                pt[r] = p[(r0 + r) * batch.t_all + batch.pos + t];
            }
            for gi in 0..ng {
                let mut w = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    w[r] = _mm256_set1_ps(pt[r] * tmp[gi]);
                }
                let mut k = gi * g;
                while k < (gi + 1) * g {
                    // SAFETY: codes `base + k .. + 8` belong to token `t`; accumulator rows have `d` elements.
                    unsafe {
                        let f = look(batch.lut, load8i::<B>(src, base + k));
                        for r in 0..R {
                            let ap = acc.as_mut_ptr().add((r0 + r) * d + k);
                            _mm256_storeu_ps(ap, _mm256_fmadd_ps(w[r], f, _mm256_loadu_ps(ap)));
                        }
                    }
                    k += 8;
                }
            }
        }
    }

    /// Per-channel values: `o_c += scale_bc (p_b . L[code_bc])` per block `b`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values_pc<const B: usize, const R: usize>(
        batch: &Batch<'_, '_>,
        p: &[f32],
        acc: &mut [f32],
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let view = batch.view;
        let (d, g, r0) = (view.head_dim, view.spec.group, batch.r0);
        resize(tmp, d);
        for blk in 0..view.tokens / g {
            meta_into(&view.scales, blk * d, tmp);
            let (src, base) = source(batch, blk * g * d, g * d, codes);
            for c in 0..d {
                let mut dot = [_mm256_setzero_ps(); R];
                let mut j = 0;
                while j < g {
                    // SAFETY: codes `base + c * g + j .. + 8` lie in the block; each probability row of the batch
                    // has `g` entries from `blk * g`.
                    unsafe {
                        let f = look(batch.lut, load8i::<B>(src, base + c * g + j));
                        for r in 0..R {
                            let o = (r0 + r) * batch.t_all + batch.pos + blk * g + j;
                            dot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.as_ptr().add(o)), f, dot[r]);
                        }
                    }
                    j += 8;
                }
                for r in 0..R {
                    acc[(r0 + r) * d + c] += tmp[c] * hsum(dot[r]);
                }
            }
        }
    }
}
