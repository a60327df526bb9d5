//! HQQ-style refinement of a group's zero point (here: its minimum) by half-quadratic splitting.
//!
//! Half-Quadratic Quantization (Badri and Shaji, 2023; `mobiusml/hqq`, `hqq/core/optimize.py`) keeps the scale and
//! minimizes an lp error (p < 1) of the reconstruction over the zero point. It alternates: quantize with the current
//! zero point, split the residual into a sparse outlier part with a generalized soft threshold, and set the zero point
//! to the mean that best explains the remaining part. In adaquant's convention `x^ = min + code * scale`, the zero
//! point is the minimum `m`, so the update is `m = mean(x - e - code * scale)`.
//! The best minimum seen (by mean absolute error) is kept, so refinement never makes that error worse than min-max.

use crate::quant::quantize_value;

/// The generalized soft threshold of HQQ: `sign(x) * max(|x| - |x|^(p - 1) / beta, 0)`.
#[inline]
fn shrink_lp(x: f32, beta: f32, p: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return 0.0;
    }
    x.signum() * (a - a.powf(p - 1.0) / beta).max(0.0)
}

pub(crate) fn mean_abs_error(x: &[f32], s: f32, m: f32, max_code: f32) -> f64 {
    x.iter().map(|&v| (v - (m + quantize_value(v, s, m, max_code) as f32 * s)).abs() as f64).sum::<f64>()
        / x.len() as f64
}

/// Returns the refined minimum of group `x` for the fixed scale `s`, starting from the min-max minimum `m0`.
pub(crate) fn refine_min(x: &[f32], s: f32, m0: f32, max_code: f32, iters: u32, p: f32, beta: f32, kappa: f32) -> f32 {
    if s <= 0.0 || x.is_empty() {
        return m0;
    }
    let mut m = m0;
    let mut beta = beta;
    let mut best = (mean_abs_error(x, s, m0, max_code), m0);
    for _ in 0..iters {
        let mut acc = 0f64;
        for &v in x {
            let code = quantize_value(v, s, m, max_code) as f32;
            let e = shrink_lp(v - (m + code * s), beta, p);
            acc += (v - e - code * s) as f64;
        }
        m = (acc / x.len() as f64) as f32;
        beta *= kappa;
        if !m.is_finite() {
            break;
        }
        let err = mean_abs_error(x, s, m, max_code);
        if err < best.0 {
            best = (err, m);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refinement_never_worsens_mean_abs_error() {
        // A skewed group with one outlier: min-max wastes levels on the outlier.
        let x: Vec<f32> =
            (0..64).map(|i| ((i * 37 % 64) as f32 / 64.0).powi(3) + if i == 5 { 4.0 } else { 0.0 }).collect();
        let (mn, mx) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let max_code = 3.0;
        let s = (mx - mn) / max_code;
        let m = refine_min(&x, s, mn, max_code, 20, 0.7, 10.0, 1.01);
        assert!(mean_abs_error(&x, s, m, max_code) <= mean_abs_error(&x, s, mn, max_code));
        assert!(m.is_finite());
    }
}
