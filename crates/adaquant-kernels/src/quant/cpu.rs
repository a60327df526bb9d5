//! Fast quantizer and dequantizer: whole groups at a time in loops the compiler vectorizes, compiled once for the
//! portable target and once with AVX2 enabled (picked at run time). Results are bit-identical to the reference:
//! the same formulas, no fused multiply-adds, and min/max reductions that do not depend on order.

use crate::error::Result;
use crate::format::{GroupAxis, QuantSpec, ZeroPoint};
use crate::pack;
use crate::quant::{covering_params, hqq, quantize_value, round_meta, PackedView};
use crate::simd::{self, SimdLevel};

/// Minimum and maximum of `xs` with eight independent lanes.
#[inline(always)]
fn minmax(xs: &[f32]) -> (f32, f32) {
    let mut mn = [f32::INFINITY; 8];
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            mn[l] = if c[l] < mn[l] { c[l] } else { mn[l] };
            mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
        }
    }
    for &v in chunks.remainder() {
        mn[0] = mn[0].min(v);
        mx[0] = mx[0].max(v);
    }
    let mut a = mn[0];
    let mut b = mx[0];
    for l in 1..8 {
        a = a.min(mn[l]);
        b = b.max(mx[l]);
    }
    (a, b)
}

/// The stored scale and minimum of a group with extremes `mn`, `mx`: the covering min-max pair, then, for HQQ, the
/// refined minimum rounded to the metadata type if that lowers the group's mean absolute error.
#[inline(always)]
fn stored_params(spec: &QuantSpec, group: &[f32], mn: f32, mx: f32) -> Result<(f32, f32)> {
    let max_code = spec.bits.max_code() as f32;
    let (s, m) = covering_params(spec.meta, max_code, mn, mx)?;
    if let ZeroPoint::Hqq { iters, p, beta, kappa } = spec.zero {
        let refined = hqq::refine_min(group, s, m, max_code, iters, p, beta, kappa);
        if let Ok(r) = round_meta(spec.meta, "minimum", refined) {
            if hqq::mean_abs_error(group, s, r, max_code) < hqq::mean_abs_error(group, s, m, max_code) {
                return Ok((s, r));
            }
        }
    }
    Ok((s, m))
}

#[inline(always)]
fn quantize_generic(
    spec: &QuantSpec,
    d: usize,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) -> Result<()> {
    let g = spec.group;
    let max_code = spec.bits.max_code() as f32;
    match spec.axis {
        GroupAxis::PerToken => {
            for (((xs, cs), s_out), m_out) in
                x.chunks_exact(g).zip(codes.chunks_exact_mut(g)).zip(scales.iter_mut()).zip(mins.iter_mut())
            {
                let (mn, mx) = minmax(xs);
                let (s, m) = stored_params(spec, xs, mn, mx)?;
                *s_out = s;
                *m_out = m;
                for (c, &v) in cs.iter_mut().zip(xs) {
                    *c = quantize_value(v, s, m, max_code);
                }
            }
        }
        GroupAxis::PerChannel => {
            let mut mn = vec![0f32; d];
            let mut mx = vec![0f32; d];
            let mut row_codes = vec![0u8; g * d];
            let mut column = vec![0f32; if matches!(spec.zero, ZeroPoint::MinMax) { 0 } else { g }];
            for (b, xb) in x.chunks_exact(g * d).enumerate() {
                mn.copy_from_slice(&xb[..d]);
                mx.copy_from_slice(&xb[..d]);
                for row in xb.chunks_exact(d).skip(1) {
                    for c in 0..d {
                        mn[c] = if row[c] < mn[c] { row[c] } else { mn[c] };
                        mx[c] = if row[c] > mx[c] { row[c] } else { mx[c] };
                    }
                }
                let s_blk = &mut scales[b * d..(b + 1) * d];
                let m_blk = &mut mins[b * d..(b + 1) * d];
                for c in 0..d {
                    if !column.is_empty() {
                        for j in 0..g {
                            column[j] = xb[j * d + c];
                        }
                    }
                    let (s, m) = stored_params(spec, &column, mn[c], mx[c])?;
                    s_blk[c] = s;
                    m_blk[c] = m;
                }
                for (row, rc) in xb.chunks_exact(d).zip(row_codes.chunks_exact_mut(d)) {
                    for c in 0..d {
                        rc[c] = quantize_value(row[c], s_blk[c], m_blk[c], max_code);
                    }
                }
                // Transpose [g][d] row codes into the block's channel-major order.
                let cb = &mut codes[b * g * d..(b + 1) * g * d];
                for c in 0..d {
                    for j in 0..g {
                        cb[c * g + j] = row_codes[j * d + c];
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(
    spec: &QuantSpec,
    d: usize,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) -> Result<()> {
    quantize_generic(spec, d, x, codes, scales, mins)
}

/// Quantizes `x` (`[t][d]`) into unpacked codes in stream order plus stored scales and minimums.
pub(crate) fn quantize_codes(
    spec: &QuantSpec,
    d: usize,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if simd::active() >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { quantize_avx2(spec, d, x, codes, scales, mins) };
    }
    quantize_generic(spec, d, x, codes, scales, mins)
}

#[inline(always)]
fn dequantize_generic(view: &PackedView<'_>, out: &mut [f32]) {
    let d = view.head_dim;
    let g = view.spec.group;
    let bits = view.spec.bits;
    match view.spec.axis {
        GroupAxis::PerToken => {
            let mut buf = vec![0u8; d];
            let per_token = d / g;
            let mut s = vec![0f32; per_token];
            let mut m = vec![0f32; per_token];
            for (t, o) in out.chunks_exact_mut(d).enumerate() {
                pack::unpack_range(bits, view.codes, t * d, &mut buf);
                view.scales.read_into(t * per_token, &mut s);
                view.mins.read_into(t * per_token, &mut m);
                for (gi, (og, cg)) in o.chunks_exact_mut(g).zip(buf.chunks_exact(g)).enumerate() {
                    let (sg, mg) = (s[gi], m[gi]);
                    for (y, &c) in og.iter_mut().zip(cg) {
                        *y = mg + c as f32 * sg;
                    }
                }
            }
        }
        GroupAxis::PerChannel => {
            let mut buf = vec![0u8; g * d];
            let mut s = vec![0f32; d];
            let mut m = vec![0f32; d];
            for (b, ob) in out.chunks_exact_mut(g * d).enumerate() {
                pack::unpack_range(bits, view.codes, b * g * d, &mut buf);
                view.scales.read_into(b * d, &mut s);
                view.mins.read_into(b * d, &mut m);
                for (j, row) in ob.chunks_exact_mut(d).enumerate() {
                    for c in 0..d {
                        row[c] = m[c] + buf[c * g + j] as f32 * s[c];
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_avx2(view: &PackedView<'_>, out: &mut [f32]) {
    dequantize_generic(view, out)
}

/// Dequantizes a checked view.
pub(crate) fn dequantize(view: &PackedView<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::active() >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { dequantize_avx2(view, out) };
        return;
    }
    dequantize_generic(view, out)
}
