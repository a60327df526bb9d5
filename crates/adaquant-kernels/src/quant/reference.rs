//! Scalar reference quantizer and dequantizer: one group and one element at a time, straight from the formulas.

use half::f16;

use crate::error::{Error, Result};
use crate::format::{GroupAxis, MetaDtype, QuantSpec, ZeroPoint};
use crate::pack::code_at;
use crate::quant::{hqq, quantize_value, round_meta, PackedView};

/// The stored scale and minimum of one group: min-max (optionally HQQ-refined), rounded so the pair covers the
/// group.
pub(crate) fn group_params(spec: &QuantSpec, group: &[f32]) -> Result<(f32, f32)> {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for &v in group {
        mn = mn.min(v);
        mx = mx.max(v);
    }
    let max_code = spec.bits.max_code() as f32;
    let (s, m) = covering_params_ref(spec.meta, max_code, mn, mx)?;
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

/// The f16 values in increasing order are indexed by `k` in `-0x7c00 ..= 0x7c00` (minus infinity to infinity,
/// both zeros at 0); this is the value of index `k`.
fn f16_at(k: i32) -> f64 {
    let bits = if k < 0 { 0x8000 | (-k) as u16 } else { k as u16 };
    f16::from_bits(bits).to_f64()
}

/// The smallest f16 index `k` in `lo ..= hi` for which `ok(f16_at(k))` holds, given that `ok` is monotone
/// (false, then true) and holds at `hi`.
fn first_f16(mut lo: i32, mut hi: i32, ok: impl Fn(f64) -> bool) -> i32 {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if ok(f16_at(mid)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

/// Reference twin of the fast path's covering pair, computed on its own: in f64, by binary search over the f16
/// values and by exact comparisons. With `L = max_code`:
/// - the minimum `m` is the largest metadata value `<= mn`;
/// - `r` is the smallest f32 `>= mx - m` (exact difference),
/// - `q` the smallest f32 with `q * L >= r` (the product of an f32 and an integer below 256 is exact in f64),
/// - the scale is the smallest metadata value `>= q`.
///
/// Values outside the metadata type's finite range are [`Error::MetaOverflow`].
pub(crate) fn covering_params_ref(meta: MetaDtype, max_code: f32, mn: f32, mx: f32) -> Result<(f32, f32)> {
    const TOP: i32 = 0x7c00;
    let overflow = |what: &'static str, value: f32| Error::MetaOverflow { what, value, dtype: meta };
    let m = match meta {
        MetaDtype::F32 => mn,
        MetaDtype::F16 => {
            if (mn as f64).abs() > f16::MAX.to_f64() {
                return Err(overflow("minimum", mn));
            }
            // Largest value <= mn: one below the first value > mn (a zero keeps the sign of mn, as f16 does).
            let m = f16_at(first_f16(-TOP, TOP, |v| v > mn as f64) - 1) as f32;
            if m == 0.0 && mn == 0.0 {
                mn
            } else {
                m
            }
        }
    };
    // The exact difference is hi + lo (Knuth's TwoSum in f64, whose operands are f32 values).
    let (a, b) = (mx as f64, -(m as f64));
    let hi = a + b;
    let bb = hi - a;
    let lo = (a - (hi - bb)) + (b - bb);
    let mut r = hi as f32;
    let above = |r: f32| (r as f64) > hi || ((r as f64) == hi && lo <= 0.0);
    if !above(r) {
        r = f32::from_bits(r.to_bits() + 1);
    }
    debug_assert!(above(r) && (r == 0.0 || !above(f32::from_bits(r.to_bits() - 1))));
    let l = max_code as f64;
    let mut q = (r as f64 / l) as f32;
    while (q as f64) * l < r as f64 {
        q = f32::from_bits(q.to_bits() + 1);
    }
    while q > 0.0 && (f32::from_bits(q.to_bits() - 1) as f64) * l >= r as f64 {
        q = f32::from_bits(q.to_bits() - 1);
    }
    let s = match meta {
        MetaDtype::F32 => q,
        MetaDtype::F16 => {
            if q as f64 > f16::MAX.to_f64() {
                return Err(overflow("scale", q));
            }
            f16_at(first_f16(0, TOP, |v| v >= q as f64)) as f32
        }
    };
    if !s.is_finite() {
        return Err(overflow("scale", q));
    }
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
