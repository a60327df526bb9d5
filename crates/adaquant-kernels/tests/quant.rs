//! Quantization: error bounds, exact constant groups, RMSE per width, streaming, byte accounting, errors,
//! and the fast path against the reference at every SIMD level.

mod common;

use std::sync::Mutex;

use adaquant_kernels::quant::{dequantize, dequantize_ref, quantize, quantize_ref, PackedStream};
use adaquant_kernels::simd::{detected, set_simd_override, SimdLevel};
use adaquant_kernels::{Bits, Error, GroupAxis, MetaDtype, QuantSpec, ZeroPoint};

/// Tests that change the process-wide SIMD override hold this lock.
static SIMD: Mutex<()> = Mutex::new(());

fn spec(bits: Bits, group: usize, axis: GroupAxis, meta: MetaDtype) -> QuantSpec {
    QuantSpec { meta, ..QuantSpec::new(bits, group, axis) }
}

/// Every (axis, group, head_dim, tokens) combination the tests sweep; per-channel token counts are whole blocks.
fn shapes() -> Vec<(GroupAxis, usize, usize, usize)> {
    let mut v = Vec::new();
    for (group, d) in [(64, 64), (32, 128), (8, 24), (64, 128)] {
        for tokens in [1, 7, 54] {
            v.push((GroupAxis::PerToken, group, d, tokens));
        }
        for blocks in [1, 3] {
            v.push((GroupAxis::PerChannel, group, d, group * blocks));
        }
    }
    v
}

/// Scale and minimum of the group holding element (t, c).
fn group_of(view: &adaquant_kernels::PackedView<'_>, t: usize, c: usize) -> (f32, f32) {
    let (d, g) = (view.head_dim, view.spec.group);
    let i = match view.spec.axis {
        GroupAxis::PerToken => t * (d / g) + c / g,
        GroupAxis::PerChannel => (t / g) * d + c,
    };
    (view.scales.get(i), view.mins.get(i))
}

/// One unit in the last place of `|y|` in f32.
fn ulp(y: f32) -> f32 {
    let a = y.abs();
    f32::from_bits(a.to_bits() + 1) - a
}

/// Asserts `|x - x^| <= scale / 2` for every element, with the stored scale and minimum of its group.
///
/// The only slack is f32 rounding, which no metadata choice removes:
/// - the code is `round(fl(fl(x - m) / s))`, two roundings of relative 2^-24 each, so the quotient may sit
///   `|x - m| / s * 2^-23` away from the exact one and a tie may go the other way: `|x - m| * 2^-23` in value;
/// - `x^ = fl(m + fl(code * s))`: the product is exact with f16 metadata (8-bit code times 11-bit scale) and off by
///   at most `code * s * 2^-24 <= (|x - m| + s) * 2^-24` with f32 metadata; the sum is off by half an ulp of `x^`.
///
/// Together: `slack = (|x - m| + s) * 2^-22 + ulp(x^) / 2`, which for a group at 300 with range 1 is about 2e-5,
/// a hundred times below the half step of 8 bits (0.002).
fn assert_within_half_step(x: &[f32], view: &adaquant_kernels::PackedView<'_>, y: &[f32], what: &str) {
    let d = view.head_dim;
    for t in 0..view.tokens {
        for c in 0..d {
            let (sc, mn) = group_of(view, t, c);
            let (xi, yi) = (x[t * d + c], y[t * d + c]);
            let slack = ((xi - mn).abs() + sc) * 2f32.powi(-22) + ulp(yi) / 2.0;
            assert!(
                (xi - yi).abs() <= sc / 2.0 + slack,
                "{what} t={t} c={c}: x={xi} x^={yi} |x-x^|={} > scale/2={} (min {mn}, slack {slack})",
                (xi - yi).abs(),
                sc / 2.0
            );
        }
    }
}

#[test]
fn every_element_within_half_a_step() {
    let mut rng = common::rng(10);
    for bits in Bits::ALL {
        for meta in [MetaDtype::F32, MetaDtype::F16] {
            for (axis, group, d, tokens) in shapes() {
                let x = common::keys_with_outliers(&mut rng, tokens, d);
                let s = quantize(&spec(bits, group, axis, meta), d, &x).unwrap();
                let view = s.view();
                let mut y = vec![0f32; x.len()];
                dequantize(&view, &mut y).unwrap();
                assert_within_half_step(&x, &view, &y, &format!("{bits} {meta:?} {axis} g={group} d={d}"));
            }
        }
    }
}

#[test]
fn half_a_step_holds_for_large_offsets_and_tiny_ranges() {
    // Groups far from zero with ranges far below the f16 spacing at their offset (0.25 at 300, 0.5 at 1000,
    // 32 at 60000): rounding the minimum to nearest f16 on its own would miss by up to half that spacing.
    let _lock = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    let levels: Vec<SimdLevel> =
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= detected()).collect();
    let mut rng = common::rng(15);
    let cases = [(300.1f32, 1.0f32), (-1000.3, 0.01), (60_001.0, 3.0), (-65_000.0, 200.0), (0.0123, 1e-6), (7.1, 0.0)];
    for bits in Bits::ALL {
        for meta in [MetaDtype::F16, MetaDtype::F32] {
            for (axis, group, d, tokens) in [(GroupAxis::PerToken, 16, 48, 5), (GroupAxis::PerChannel, 8, 24, 16)] {
                for (offset, range) in cases {
                    // Each group gets its own offset near `offset`, and its extremes are hit exactly.
                    let x: Vec<f32> = (0..tokens * d)
                        .map(|i| {
                            let u: f32 = rand::Rng::random(&mut rng);
                            let u = if i % 7 == 0 {
                                0.0
                            } else if i % 11 == 0 {
                                1.0
                            } else {
                                u
                            };
                            offset * (1.0 + (i % 3) as f32 * 1e-4) + range * u
                        })
                        .collect();
                    let sp = spec(bits, group, axis, meta);
                    let what = format!("{bits} {meta:?} {axis} offset {offset} range {range}");
                    let r = quantize_ref(&sp, d, &x).unwrap();
                    let mut y = vec![0f32; x.len()];
                    dequantize_ref(&r.view(), &mut y).unwrap();
                    assert_within_half_step(&x, &r.view(), &y, &format!("reference {what}"));
                    for &level in &levels {
                        set_simd_override(Some(level));
                        let f = quantize(&sp, d, &x).unwrap();
                        assert_eq!(f, r, "fast against reference: {what} {level:?}");
                        dequantize(&f.view(), &mut y).unwrap();
                        assert_within_half_step(&x, &f.view(), &y, &format!("{what} {level:?}"));
                    }
                    set_simd_override(None);
                }
            }
        }
    }
}

#[test]
fn stored_pair_covers_the_group_at_the_edges_of_f16() {
    let tok = |bits| QuantSpec::new(bits, 4, GroupAxis::PerToken);
    for bits in Bits::ALL {
        // A minimum at the bottom of the f16 range is kept; one below it is a typed error, never infinity.
        let ok = [-65504.0f32, -65503.0, -65400.0, -65450.0];
        let s = quantize(&tok(bits), 4, &ok).unwrap();
        let mut y = [0f32; 4];
        dequantize(&s.view(), &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{bits}: {y:?}");
        assert_within_half_step(&ok, &s.view(), &y, &format!("{bits} at -65504"));
        for bad in [[-65504.5f32, 0.0, 0.0, 0.0], [70_000.0, 70_001.0, 70_000.5, 70_000.0]] {
            for q in [quantize(&tok(bits), 4, &bad), quantize_ref(&tok(bits), 4, &bad)] {
                assert!(matches!(q, Err(Error::MetaOverflow { what: "minimum", .. })), "{bits} {bad:?}: {q:?}");
            }
        }
        // A range whose scale needs more than 65504 per step.
        let wide = [-60_000.0f32, -60_000.0 + 66_000.0 * bits.max_code() as f32, 0.0, 0.0];
        for q in [quantize(&tok(bits), 4, &wide), quantize_ref(&tok(bits), 4, &wide)] {
            assert!(matches!(q, Err(Error::MetaOverflow { what: "scale", .. })), "{bits}: {q:?}");
        }
        // Tiny positive and negative groups round the minimum down to a subnormal or zero, never up.
        for tiny in [[1e-9f32, 2e-9, 3e-9, 1e-9], [-1e-9, -2e-9, -3e-9, -1e-9]] {
            let s = quantize(&tok(bits), 4, &tiny).unwrap();
            assert!(s.view().mins.get(0) <= tiny.iter().cloned().fold(f32::INFINITY, f32::min));
            dequantize(&s.view(), &mut y).unwrap();
            assert_within_half_step(&tiny, &s.view(), &y, &format!("{bits} tiny"));
        }
    }
}

#[test]
fn constant_groups_are_exact() {
    for bits in Bits::ALL {
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            // 0.375 and -2.5 are exact in f16 too; 0.1 only in f32 metadata.
            for (value, meta) in [(0.375f32, MetaDtype::F16), (-2.5, MetaDtype::F16), (0.1, MetaDtype::F32)] {
                let (d, tokens) = (64, 32);
                let x = vec![value; tokens * d];
                let s = quantize(&spec(bits, 32, axis, meta), d, &x).unwrap();
                let mut y = vec![0f32; x.len()];
                dequantize(&s.view(), &mut y).unwrap();
                assert!(y.iter().all(|&v| v == value), "{bits} {axis} {value}");
            }
        }
    }
}

#[test]
fn rmse_within_per_width_limits() {
    // Uniform rounding error of a step s has RMS s / sqrt(12); a group of 64 N(0, 1) samples spans about 5, so the
    // expected RMSE is about 1.44 / (levels - 1). The limits sit about 10% above that. One bit is the exception:
    // min-max puts its two levels at the extremes, so most samples land far from both (measured about 1.66).
    let limits = [
        (Bits::B1, 1.8),
        (Bits::B1_58, 0.75),
        (Bits::B2, 0.5),
        (Bits::B3, 0.22),
        (Bits::B4, 0.105),
        (Bits::B5, 0.052),
        (Bits::B6, 0.026),
        (Bits::B8, 0.0065),
    ];
    let mut rng = common::rng(11);
    let (d, tokens) = (128, 256);
    let x = common::gaussian(&mut rng, tokens * d, 1.0);
    for (bits, limit) in limits {
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            let s = quantize(&QuantSpec::new(bits, 64, axis), d, &x).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize(&s.view(), &mut y).unwrap();
            let rmse = (x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
            assert!(rmse < limit, "{bits} {axis}: rmse {rmse} >= {limit}");
            assert!(rmse > limit / 3.0, "{bits} {axis}: rmse {rmse} suspiciously small");
        }
    }
}

#[test]
fn fast_equals_reference_at_every_simd_level() {
    let _lock = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::rng(12);
    let levels: Vec<SimdLevel> =
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= detected()).collect();
    for bits in Bits::ALL {
        for meta in [MetaDtype::F16, MetaDtype::F32] {
            for (axis, group, d, tokens) in shapes() {
                let x = common::keys_with_outliers(&mut rng, tokens, d);
                let sp = spec(bits, group, axis, meta);
                let r = quantize_ref(&sp, d, &x).unwrap();
                let mut yr = vec![0f32; x.len()];
                dequantize_ref(&r.view(), &mut yr).unwrap();
                for &level in &levels {
                    set_simd_override(Some(level));
                    let f = quantize(&sp, d, &x).unwrap();
                    assert_eq!(f, r, "{bits} {meta:?} {axis} g={group} d={d} t={tokens} {level:?}");
                    let mut yf = vec![0f32; x.len()];
                    dequantize(&r.view(), &mut yf).unwrap();
                    assert_eq!(yf, yr, "dequantize {bits} {axis} {level:?}");
                }
                set_simd_override(None);
            }
        }
    }
}

#[test]
fn streaming_pushes_equal_one_push_and_bytes_match() {
    let mut rng = common::rng(13);
    for bits in Bits::ALL {
        for (axis, group, d) in [(GroupAxis::PerToken, 32, 96), (GroupAxis::PerChannel, 16, 64)] {
            let sp = QuantSpec::new(bits, group, axis);
            let tokens = 5 * group;
            let x = common::gaussian(&mut rng, tokens * d, 1.5);
            let whole = quantize(&sp, d, &x).unwrap();
            let mut streamed = PackedStream::new(sp, d).unwrap();
            let step = if axis == GroupAxis::PerToken { 1 } else { group };
            for (i, chunk) in x.chunks(step * d).enumerate() {
                if i % 2 == 0 {
                    streamed.push(chunk).unwrap();
                } else {
                    streamed.push_ref(chunk).unwrap();
                }
                let t = streamed.tokens();
                assert_eq!(streamed.bytes(), sp.bytes(t, 1, d), "{bits} {axis} t={t}");
                assert_eq!(streamed.bytes(), streamed.view().bytes());
                assert_eq!(
                    streamed.code_bytes() + streamed.meta_bytes(),
                    bits.packed_bytes(t * d) + 2 * sp.meta.bytes() * sp.n_groups(t, d)
                );
            }
            assert_eq!(streamed, whole, "{bits} {axis}");
            // A prefix view dequantizes to the prefix of the whole.
            let mut all = vec![0f32; x.len()];
            dequantize(&whole.view(), &mut all).unwrap();
            let pre = whole.view().prefix(2 * group);
            let mut part = vec![0f32; 2 * group * d];
            dequantize(&pre, &mut part).unwrap();
            assert_eq!(part, &all[..part.len()]);
        }
    }
}

#[test]
fn non_finite_input_is_an_error_and_leaves_the_stream_unchanged() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
            let sp = QuantSpec::new(Bits::B4, 8, axis);
            let mut s = quantize(&sp, 16, &vec![0.5; 8 * 16]).unwrap();
            let before = s.clone();
            let mut x = vec![1.0f32; 8 * 16];
            x[37] = bad;
            match s.push(&x) {
                Err(Error::NonFinite { index: 37, .. }) => {}
                other => panic!("expected NonFinite at 37, got {other:?}"),
            }
            assert!(matches!(s.push_ref(&x), Err(Error::NonFinite { index: 37, .. })));
            assert_eq!(s, before);
        }
    }
}

#[test]
fn bad_shapes_and_ranges_are_typed_errors() {
    let pc = QuantSpec::new(Bits::B2, 32, GroupAxis::PerChannel);
    let mut s = PackedStream::new(pc, 64).unwrap();
    assert!(matches!(s.push(&vec![0.0; 31 * 64]), Err(Error::GroupDoesNotDivide { .. })));
    assert!(matches!(s.push(&[0.0; 65]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        PackedStream::new(QuantSpec::new(Bits::B2, 48, GroupAxis::PerToken), 64),
        Err(Error::GroupDoesNotDivide { .. })
    ));
    assert!(matches!(PackedStream::new(QuantSpec::new(Bits::B2, 0, GroupAxis::PerToken), 64), Err(Error::ZeroGroup)));
    // A range beyond f16 is refused with f16 metadata and accepted with f32 metadata.
    let big: Vec<f32> = (0..64).map(|i| if i == 0 { -1e5 } else { 1e5 }).collect();
    let tok = QuantSpec::new(Bits::B1, 64, GroupAxis::PerToken);
    assert!(matches!(quantize(&tok, 64, &big), Err(Error::MetaOverflow { .. })));
    assert!(quantize(&QuantSpec { meta: MetaDtype::F32, ..tok }, 64, &big).is_ok());
    // A view whose metadata is short is refused.
    let ok = quantize(&QuantSpec::new(Bits::B4, 32, GroupAxis::PerToken), 64, &[0.25; 128]).unwrap();
    let mut view = ok.view();
    view.scales = view.scales.slice(0, 1);
    let mut y = vec![0f32; 128];
    assert!(matches!(dequantize(&view, &mut y), Err(Error::BadView { .. })));
    assert!(matches!(dequantize(&ok.view(), &mut y[..5]), Err(Error::ShapeMismatch { .. })));
    assert!(ok.view().try_prefix(3).is_err());
}

#[test]
fn hqq_zero_point_does_not_worsen_mean_abs_error() {
    let mut rng = common::rng(14);
    let d = 64;
    let x = common::keys_with_outliers(&mut rng, 64, d);
    for bits in [Bits::B2, Bits::B3, Bits::B4] {
        let base = QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(bits, 64, GroupAxis::PerToken) };
        let hqq = QuantSpec { zero: ZeroPoint::Hqq { iters: 20, p: 0.7, beta: 10.0, kappa: 1.01 }, ..base };
        let mae = |sp: &QuantSpec| {
            let s = quantize(sp, d, &x).unwrap();
            let r = quantize_ref(sp, d, &x).unwrap();
            assert_eq!(s, r);
            let mut y = vec![0f32; x.len()];
            dequantize(&s.view(), &mut y).unwrap();
            x.iter().zip(&y).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / x.len() as f64
        };
        let (a, b) = (mae(&base), mae(&hqq));
        assert!(b <= a * (1.0 + 1e-6), "{bits}: hqq {b} > min-max {a}");
    }
}

#[test]
fn truncate_undoes_pushes_byte_for_byte() {
    let mut rng = common::rng(16);
    for bits in Bits::ALL {
        for (axis, group, d) in [(GroupAxis::PerToken, 8, 24), (GroupAxis::PerChannel, 4, 24)] {
            let sp = QuantSpec::new(bits, group, axis);
            let step = if axis == GroupAxis::PerToken { 3 } else { group };
            // Token counts whose codes end inside a byte (3, 5 and 6 bits; ternary digits) as well as on a boundary.
            let x = common::gaussian(&mut rng, 5 * step * d, 2.0);
            let mut s = PackedStream::new(sp, d).unwrap();
            let mut states = vec![s.clone()];
            for chunk in x.chunks(step * d) {
                s.push(chunk).unwrap();
                states.push(s.clone());
            }
            for (i, state) in states.iter().enumerate().rev() {
                let mut t = s.clone();
                t.truncate(i * step).unwrap();
                assert_eq!(&t, state, "{bits} {axis}: truncate to {} tokens", i * step);
                assert_eq!(t.bytes(), sp.bytes(i * step, 1, d));
                // Pushing again after a truncate gives what pushing once gave.
                t.push(&x[i * step * d..]).unwrap();
                assert_eq!(t, s, "{bits} {axis}: push after truncate to {}", i * step);
            }
            if axis == GroupAxis::PerChannel {
                let before = s.clone();
                assert!(matches!(s.truncate(group + 1), Err(Error::GroupDoesNotDivide { .. })));
                assert_eq!(s, before);
            }
        }
    }
}

fn lloyd(bits: Bits, group: usize, axis: GroupAxis, meta: MetaDtype) -> QuantSpec {
    QuantSpec { levels: adaquant_kernels::Levels::LloydMax, ..spec(bits, group, axis, meta) }
}

const CODEBOOK_WIDTHS: [Bits; 5] = [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4];

#[test]
fn lloyd_max_fast_path_matches_reference_and_bytes_match_the_formula() {
    let _lock = SIMD.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::rng(60);
    for level in [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= detected()) {
        set_simd_override(Some(level));
        for bits in CODEBOOK_WIDTHS {
            for meta in [MetaDtype::F16, MetaDtype::F32] {
                for (axis, group, d, tokens) in shapes() {
                    let sp = lloyd(bits, group, axis, meta);
                    let x = common::keys_with_outliers(&mut rng, tokens, d);
                    let fast = quantize(&sp, d, &x).unwrap();
                    let reference = quantize_ref(&sp, d, &x).unwrap();
                    assert_eq!(fast, reference, "{bits} {meta:?} {axis} g={group} d={d} t={tokens} {level:?}");
                    assert_eq!(fast.bytes(), sp.bytes(tokens, 1, d));
                    assert_eq!(fast.meta_bytes(), meta.bytes() * tokens * d / group, "one scale per group, no minimum");
                    assert!(fast.view().mins.is_empty());
                    let mut a = vec![0f32; x.len()];
                    let mut b = vec![0f32; x.len()];
                    dequantize(&fast.view(), &mut a).unwrap();
                    dequantize_ref(&fast.view(), &mut b).unwrap();
                    assert_eq!(a, b);
                    // A prefix of a per-token stream keeps its scales and codes.
                    if axis == GroupAxis::PerToken && tokens > 1 {
                        fast.view().prefix(1).check().unwrap();
                    }
                }
            }
        }
    }
    set_simd_override(None);
}

#[test]
fn lloyd_max_error_on_gaussian_data_is_the_textbook_value() {
    // Max (1960): mean squared error of the optimal quantizer of N(0, 1) with 2, 3, 4, 8 and 16 levels. With the
    // scale estimated per group of 128 the error is a little higher; it must also beat min-max at the same width.
    let mut rng = common::rng(61);
    let (d, tokens) = (128, 256);
    let x = common::gaussian(&mut rng, tokens * d, 1.0);
    let mse = |sp: &QuantSpec| {
        let s = quantize(sp, d, &x).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize(&s.view(), &mut y).unwrap();
        x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / x.len() as f64
    };
    for (bits, textbook) in
        [(Bits::B1, 0.3634), (Bits::B1_58, 0.1902), (Bits::B2, 0.1175), (Bits::B3, 0.03454), (Bits::B4, 0.009497)]
    {
        let got = mse(&lloyd(bits, 128, GroupAxis::PerToken, MetaDtype::F32));
        assert!(got > textbook * 0.97 && got < textbook * 1.08, "{bits}: mse {got} vs textbook {textbook}");
        let uniform = mse(&spec(bits, 128, GroupAxis::PerToken, MetaDtype::F32));
        assert!(got < uniform, "{bits}: Lloyd-Max {got} vs min-max {uniform}");
    }
}

#[test]
fn lloyd_max_specs_are_checked() {
    let zeros = vec![0f32; 64 * 4];
    let s = quantize(&lloyd(Bits::B2, 64, GroupAxis::PerToken, MetaDtype::F16), 64, &zeros).unwrap();
    let mut y = vec![1f32; zeros.len()];
    dequantize(&s.view(), &mut y).unwrap();
    assert_eq!(y, zeros, "an all-zero group reconstructs exactly");
    for bits in [Bits::B5, Bits::B6, Bits::B8] {
        let err = lloyd(bits, 64, GroupAxis::PerToken, MetaDtype::F16).validate(64).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(PackedStream::new(lloyd(bits, 64, GroupAxis::PerToken, MetaDtype::F16), 64).is_err());
    }
    let hqq = QuantSpec { zero: ZeroPoint::HQQ, ..lloyd(Bits::B2, 64, GroupAxis::PerToken, MetaDtype::F16) };
    assert!(matches!(hqq.validate(64), Err(Error::Unsupported { .. })));
    let big = vec![1e6f32; 64];
    let err = quantize(&lloyd(Bits::B2, 64, GroupAxis::PerToken, MetaDtype::F16), 64, &big).unwrap_err();
    assert!(matches!(err, Error::MetaOverflow { .. }), "{err}");
}

#[test]
fn lloyd_max_and_rotation_round_trip_through_json() {
    let sp = QuantSpec {
        rotation: Some(adaquant_kernels::Rotation { seed: 3 }),
        ..lloyd(Bits::B3, 32, GroupAxis::PerChannel, MetaDtype::F16)
    };
    let json = serde_json_text(&sp);
    assert!(json.contains("\"levels\":\"lloyd_max\"") && json.contains("\"rotation\":{\"seed\":3}"), "{json}");
    // Uniform, unrotated specs keep their old JSON.
    let plain = serde_json_text(&QuantSpec::new(Bits::B4, 64, GroupAxis::PerToken));
    assert!(!plain.contains("levels") && !plain.contains("rotation"), "{plain}");
    // HQQ parameters left out take the authors' defaults.
    let hqq: ZeroPoint = serde_json::from_str(r#"{"kind": "hqq"}"#).unwrap();
    assert_eq!(hqq, ZeroPoint::HQQ);
    let hqq: ZeroPoint = serde_json::from_str(r#"{"kind": "hqq", "iters": 5}"#).unwrap();
    assert_eq!(hqq, ZeroPoint::Hqq { iters: 5, p: 0.7, beta: 10.0, kappa: 1.01 });
}

fn serde_json_text(s: &QuantSpec) -> String {
    serde_json::to_string(s).unwrap()
}
