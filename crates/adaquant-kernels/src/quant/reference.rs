//! Scalar reference quantizer and dequantizer: one group and one element at a time, straight from the formulas.

use crate::error::Result;
use crate::format::{GroupAxis, QuantSpec, ZeroPoint};
use crate::pack::code_at;
use crate::quant::{hqq, quantize_value, round_meta, PackedView};

/// The stored scale and minimum of one group: min-max (optionally HQQ-refined), rounded to the metadata type.
pub(crate) fn group_params(spec: &QuantSpec, group: &[f32]) -> Result<(f32, f32)> {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for &v in group {
        mn = mn.min(v);
        mx = mx.max(v);
    }
    stored_params(spec, group, mn, mx)
}

/// Rounds the min-max parameters of a group with extremes `mn`, `mx` to the metadata type (after the optional HQQ
/// refinement of the minimum, which needs the group's values).
#[inline]
pub(crate) fn stored_params(spec: &QuantSpec, group: &[f32], mn: f32, mx: f32) -> Result<(f32, f32)> {
    let max_code = spec.bits.max_code() as f32;
    let s = round_meta(spec.meta, "scale", (mx - mn) / max_code)?;
    let mut m = mn;
    if let ZeroPoint::Hqq { iters, p, beta, kappa } = spec.zero {
        m = hqq::refine_min(group, s, mn, max_code, iters, p, beta, kappa);
    }
    let m = round_meta(spec.meta, "minimum", m)?;
    Ok((s, m))
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
    let t = x.len() / d;
    let g = spec.group;
    let max_code = spec.bits.max_code() as f32;
    let mut group = vec![0f32; g];
    match spec.axis {
        GroupAxis::PerToken => {
            let per_token = d / g;
            for tok in 0..t {
                for gi in 0..per_token {
                    for j in 0..g {
                        group[j] = x[tok * d + gi * g + j];
                    }
                    let (s, m) = group_params(spec, &group)?;
                    let meta = tok * per_token + gi;
                    scales[meta] = s;
                    mins[meta] = m;
                    for j in 0..g {
                        codes[tok * d + gi * g + j] = quantize_value(group[j], s, m, max_code);
                    }
                }
            }
        }
        GroupAxis::PerChannel => {
            for b in 0..t / g {
                for c in 0..d {
                    for j in 0..g {
                        group[j] = x[(b * g + j) * d + c];
                    }
                    let (s, m) = group_params(spec, &group)?;
                    scales[b * d + c] = s;
                    mins[b * d + c] = m;
                    for j in 0..g {
                        codes[b * g * d + c * g + j] = quantize_value(group[j], s, m, max_code);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Stream position and metadata index of element (`t`, `c`).
#[inline]
pub(crate) fn locate(spec: &QuantSpec, d: usize, t: usize, c: usize) -> (usize, usize) {
    let g = spec.group;
    match spec.axis {
        GroupAxis::PerToken => (t * d + c, t * (d / g) + c / g),
        GroupAxis::PerChannel => ((t / g) * g * d + c * g + t % g, (t / g) * d + c),
    }
}

/// Dequantizes a checked view element by element.
pub(crate) fn dequantize(view: &PackedView<'_>, out: &mut [f32]) {
    let d = view.head_dim;
    for t in 0..view.tokens {
        for c in 0..d {
            let (pos, meta) = locate(&view.spec, d, t, c);
            let code = code_at(view.spec.bits, view.codes, pos) as f32;
            out[t * d + c] = view.mins.get(meta) + code * view.scales.get(meta);
        }
    }
}
