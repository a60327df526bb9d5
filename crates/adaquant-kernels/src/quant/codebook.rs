//! Lloyd-Max codebooks: the reconstruction levels that minimise the mean squared error of a unit Gaussian.
//!
//! A group stores one scale `s` (its RMS, rounded to the metadata type) and codes; element `x` gets the code of the
//! level nearest to `x / s`, and reconstructs as `s * L[code]`. The levels `L` are the fixed point of the Lloyd
//! iteration for N(0, 1) (Max 1960; Lloyd 1982): each threshold is the midpoint of its two neighbouring levels, each
//! level is the mean of the Gaussian over its cell. [`lloyd_max_gaussian`] runs that iteration; the stored tables
//! ([`levels`]) are its output rounded to f32, and a test checks both that they are its fixed point and that they
//! match Max's published values to 1e-4.
//!
//! Widths 1 (2 levels), 1.58 (3), 2 (4), 3 (8) and 4 (16). The levels are symmetric around 0, so a constant-zero
//! group reconstructs exactly and value sums need no centring.

use crate::error::Result;
use crate::format::{Bits, GroupAxis, QuantSpec};
use crate::pack::code_at;
use crate::quant::{round_meta, PackedView};

/// Lloyd-Max levels of N(0, 1), two levels (1 bit): `+-sqrt(2 / pi)`.
pub const LLOYD_MAX_1: [f32; 2] = [-0.797_884_6, 0.797_884_6];
/// Three levels (1.58 bits).
pub const LLOYD_MAX_1_58: [f32; 3] = [-1.224_006_4, 0.0, 1.224_006_4];
/// Four levels (2 bits).
pub const LLOYD_MAX_2: [f32; 4] = [-1.510_417_6, -0.452_780_03, 0.452_780_03, 1.510_417_6];
/// Eight levels (3 bits).
pub const LLOYD_MAX_3: [f32; 8] =
    [-2.151_945_7, -1.343_909_3, -0.756_005_3, -0.245_094_18, 0.245_094_18, 0.756_005_3, 1.343_909_3, 2.151_945_7];
/// Sixteen levels (4 bits).
pub const LLOYD_MAX_4: [f32; 16] = [
    -2.732_589_6,
    -2.069_017_2,
    -1.618_046_4,
    -1.256_231_2,
    -0.942_340_46,
    -0.656_759_1,
    -0.388_048_3,
    -0.128_395_03,
    0.128_395_03,
    0.388_048_3,
    0.656_759_1,
    0.942_340_46,
    1.256_231_2,
    1.618_046_4,
    2.069_017_2,
    2.732_589_6,
];

/// The stored Lloyd-Max levels of a width, ascending (`None` for widths without a codebook: 5, 6 and 8).
pub fn levels(bits: Bits) -> Option<&'static [f32]> {
    Some(match bits {
        Bits::B1 => &LLOYD_MAX_1,
        Bits::B1_58 => &LLOYD_MAX_1_58,
        Bits::B2 => &LLOYD_MAX_2,
        Bits::B3 => &LLOYD_MAX_3,
        Bits::B4 => &LLOYD_MAX_4,
        _ => return None,
    })
}

/// The levels of a spec that passed [`QuantSpec::validate`].
pub(crate) fn table(spec: &QuantSpec) -> &'static [f32] {
    levels(spec.bits).expect("validated Lloyd-Max specs have a codebook")
}

/// `erf(x)` in f64 from the everywhere-convergent series `2/sqrt(pi) e^(-x^2) sum_n 2^n x^(2n+1) / (2n+1)!!`
/// (positive terms, no cancellation; accurate to a few ulps for |x| < 10).
pub fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x > 6.0 {
        return 1.0;
    }
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * 1e-18 {
        term *= 2.0 * x * x / (2.0 * n + 3.0);
        sum += term;
        n += 1.0;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

/// Standard normal density.
pub fn normal_pdf(x: f64) -> f64 {
    if x.is_infinite() {
        return 0.0;
    }
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Standard normal distribution function.
pub fn normal_cdf(x: f64) -> f64 {
    if x == f64::INFINITY {
        return 1.0;
    }
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// One Lloyd step for N(0, 1): thresholds at the midpoints of `levels`, then each level at the mean of its cell.
pub fn lloyd_step(levels: &[f64]) -> Vec<f64> {
    let n = levels.len();
    let edge = |i: usize| -> f64 {
        // Edge i sits between level i - 1 and level i; edge 0 is -inf and edge n is +inf.
        if i == 0 {
            f64::NEG_INFINITY
        } else if i == n {
            f64::INFINITY
        } else {
            0.5 * (levels[i - 1] + levels[i])
        }
    };
    (0..n)
        .map(|i| {
            let (a, b) = (edge(i), edge(i + 1));
            (normal_pdf(a) - normal_pdf(b)) / (normal_cdf(b) - normal_cdf(a))
        })
        .collect()
}

/// The Lloyd-Max levels of N(0, 1) with `n` levels, by the Lloyd iteration from evenly spaced levels until no level
/// moves by more than 1e-13.
pub fn lloyd_max_gaussian(n: usize) -> Vec<f64> {
    assert!(n >= 2, "a codebook needs at least two levels");
    let mut l: Vec<f64> = (0..n).map(|i| (2.0 * i as f64 + 1.0 - n as f64) / n as f64 * 2.0).collect();
    for _ in 0..100_000 {
        let next = lloyd_step(&l);
        let moved = l.iter().zip(&next).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        l = next;
        if moved < 1e-13 {
            break;
        }
    }
    l
}

/// The code of `u = x / s`: the number of midpoints between neighbouring levels that `u` exceeds (compared in f64,
/// so it agrees with [`encode_ref`] except at exact midpoints, where both take the lower level).
#[inline(always)]
pub(crate) fn encode(mids: &[f64], u: f32) -> u8 {
    let u = u as f64;
    mids.iter().map(|&m| (u > m) as u8).sum()
}

/// Reference twin of [`encode`]: the index of the nearest level, the lower one on a tie.
pub(crate) fn encode_ref(levels: &[f32], u: f32) -> u8 {
    let mut best = 0;
    let mut dist = f64::INFINITY;
    for (i, &l) in levels.iter().enumerate() {
        let e = (u as f64 - l as f64).abs();
        if e < dist {
            dist = e;
            best = i;
        }
    }
    best as u8
}

/// Midpoints between neighbouring levels, in f64.
pub(crate) fn midpoints(levels: &[f32]) -> Vec<f64> {
    levels.windows(2).map(|w| 0.5 * (w[0] as f64 + w[1] as f64)).collect()
}

/// The stored scale of a group: its RMS (accumulated in f64), rounded to the metadata type.
fn group_scale(spec: &QuantSpec, group: &[f32]) -> Result<f32> {
    let ms = group.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / group.len() as f64;
    round_meta(spec.meta, "scale", ms.sqrt() as f32)
}

/// Quantizes `x` (`[t][d]`) into unpacked codes in stream order plus stored scales; `fast` picks the threshold
/// encoder, otherwise the nearest-level reference.
pub(crate) fn quantize_codes(
    spec: &QuantSpec,
    d: usize,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
    fast: bool,
) -> Result<()> {
    let t = x.len() / d;
    let g = spec.group;
    let lv = table(spec);
    let mids = midpoints(lv);
    let mut group = vec![0f32; g];
    let mut one = |group: &[f32], meta: usize, put: &mut dyn FnMut(usize, u8)| -> Result<()> {
        let s = group_scale(spec, group)?;
        scales[meta] = s;
        for (j, &v) in group.iter().enumerate() {
            let u = if s > 0.0 { v / s } else { 0.0 };
            put(j, if fast { encode(&mids, u) } else { encode_ref(lv, u) });
        }
        Ok(())
    };
    match spec.axis {
        GroupAxis::PerToken => {
            for (gi, xs) in x.chunks_exact(g).enumerate() {
                one(xs, gi, &mut |j, c| codes[gi * g + j] = c)?;
            }
        }
        GroupAxis::PerChannel => {
            for b in 0..t / g {
                for c in 0..d {
                    for j in 0..g {
                        group[j] = x[(b * g + j) * d + c];
                    }
                    let base = b * g * d + c * g;
                    one(&group, b * d + c, &mut |j, code| codes[base + j] = code)?;
                }
            }
        }
    }
    Ok(())
}

/// Dequantizes a checked codebook view element by element (reference).
pub(crate) fn dequantize_ref(view: &PackedView<'_>, out: &mut [f32]) {
    let d = view.head_dim;
    let lv = table(&view.spec);
    for t in 0..view.tokens {
        for c in 0..d {
            let (pos, meta) = crate::quant::reference::locate(&view.spec, d, t, c);
            let code = code_at(view.spec.bits, view.codes, pos) as usize;
            out[t * d + c] = view.scales.get(meta) * lv[code];
        }
    }
}

/// Dequantizes a checked codebook view block by block (fast twin, bit-identical to [`dequantize_ref`]).
pub(crate) fn dequantize(view: &PackedView<'_>, out: &mut [f32]) {
    let d = view.head_dim;
    let g = view.spec.group;
    let bits = view.spec.bits;
    let lv = table(&view.spec);
    match view.spec.axis {
        GroupAxis::PerToken => {
            let mut buf = vec![0u8; d];
            let ng = d / g;
            for (t, o) in out.chunks_exact_mut(d).enumerate() {
                crate::pack::unpack_range(bits, view.codes, t * d, &mut buf);
                for (gi, (og, cg)) in o.chunks_exact_mut(g).zip(buf.chunks_exact(g)).enumerate() {
                    let s = view.scales.get(t * ng + gi);
                    for (y, &c) in og.iter_mut().zip(cg) {
                        *y = s * lv[c as usize];
                    }
                }
            }
        }
        GroupAxis::PerChannel => {
            let mut buf = vec![0u8; g * d];
            let mut s = vec![0f32; d];
            for (b, ob) in out.chunks_exact_mut(g * d).enumerate() {
                crate::pack::unpack_range(bits, view.codes, b * g * d, &mut buf);
                view.scales.read_into(b * d, &mut s);
                for (j, row) in ob.chunks_exact_mut(d).enumerate() {
                    for c in 0..d {
                        row[c] = s[c] * lv[buf[c * g + j] as usize];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Max (1960), Table I: the Gaussian minimum-MSE levels (positive half), to four decimals. Where the table
    /// quotes fewer digits (16 levels: 1.256, 1.618, 2.069, 2.733) the entry is the four-decimal value that rounds
    /// to the table's digits.
    const PUBLISHED: [(Bits, &[f64]); 5] = [
        (Bits::B1, &[0.7979]),
        (Bits::B1_58, &[0.0, 1.2240]),
        (Bits::B2, &[0.4528, 1.5104]),
        (Bits::B3, &[0.2451, 0.7560, 1.3439, 2.1520]),
        (Bits::B4, &[0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326]),
    ];

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in
            [(0.5, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (2.0, 0.995_322_265_018_952_7)]
        {
            assert!((erf(x) - want).abs() < 1e-15, "erf({x}) = {}", erf(x));
        }
        assert!((erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-15);
        assert_eq!(erf(-1.0), -erf(1.0));
    }

    #[test]
    fn stored_levels_are_the_lloyd_fixed_point_and_match_published_values() {
        for (bits, published) in PUBLISHED {
            let stored = levels(bits).unwrap();
            assert_eq!(stored.len(), bits.levels() as usize);
            let computed = lloyd_max_gaussian(stored.len());
            for (s, c) in stored.iter().zip(&computed) {
                assert!((*s as f64 - c).abs() < 1e-6, "{bits}: stored {s} vs Lloyd {c}");
            }
            // One more Lloyd step from the stored levels moves none of them: they are its fixed point.
            let stored64: Vec<f64> = stored.iter().map(|&x| x as f64).collect();
            for (a, b) in stored64.iter().zip(lloyd_step(&stored64)) {
                assert!((a - b).abs() < 1e-6, "{bits}: {a} moves to {b}");
            }
            let positive: Vec<f64> = stored64.iter().copied().filter(|&x| x >= 0.0).collect();
            assert_eq!(positive.len(), published.len());
            for (s, p) in positive.iter().zip(published) {
                assert!((s - p).abs() <= 1e-4 + 1e-9, "{bits}: stored {s} vs published {p}");
            }
            for (a, b) in stored.iter().zip(stored.iter().rev()) {
                assert_eq!(*a, -*b, "{bits}: levels are symmetric");
            }
        }
        for b in [Bits::B5, Bits::B6, Bits::B8] {
            assert!(levels(b).is_none());
        }
    }

    #[test]
    fn levels_are_centroids_by_numerical_integration() {
        // An independent check of the fixed point that uses no erf: Simpson's rule on the density over each cell.
        let simpson = |f: &dyn Fn(f64) -> f64, a: f64, b: f64| {
            let n = 20_000;
            let h = (b - a) / n as f64;
            let mut s = f(a) + f(b);
            for i in 1..n {
                s += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            s * h / 3.0
        };
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for bits in [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4] {
            let l = levels(bits).unwrap();
            for i in 0..l.len() {
                let a = if i == 0 { -12.0 } else { 0.5 * (l[i - 1] + l[i]) as f64 };
                let b = if i + 1 == l.len() { 12.0 } else { 0.5 * (l[i] + l[i + 1]) as f64 };
                let mass = simpson(&pdf, a, b);
                let mean = simpson(&|x| x * pdf(x), a, b) / mass;
                assert!((mean - l[i] as f64).abs() < 1e-6, "{bits} level {i}: {} vs centroid {mean}", l[i]);
            }
        }
    }

    #[test]
    fn threshold_encoder_picks_the_nearest_level() {
        for bits in [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4] {
            let l = levels(bits).unwrap();
            let mids = midpoints(l);
            for i in 0..40_000 {
                let u = (i as f32 - 20_000.0) * 0.000_213_7;
                assert_eq!(encode(&mids, u), encode_ref(l, u), "{bits} u={u}");
            }
            for &m in &mids {
                assert_eq!(encode(&mids, m as f32), encode_ref(l, m as f32), "{bits} at midpoint {m}");
            }
        }
    }
}
