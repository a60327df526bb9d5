//! Hadamard rotations: orthogonal, the fast transform equals the dense reference, scores are preserved.

mod common;

use adaquant_kernels::rotate::{head_seed, HadamardRotation};
use adaquant_kernels::{Bits, Error, GroupAxis, QuantSpec, Rotation};

/// Head sizes: powers of two and sizes that take block-diagonal Hadamard blocks.
const SIZES: [usize; 7] = [2, 8, 64, 128, 96, 80, 6];

#[test]
fn every_rotation_is_orthogonal() {
    for d in SIZES {
        for seed in [0, 1, 12345] {
            let r = HadamardRotation::new(d, head_seed(seed, 3, 1, 2)).unwrap();
            // Columns of the fast transform: rotate each basis vector.
            let mut cols = vec![0f32; d * d];
            for j in 0..d {
                cols[j * d + j] = 1.0;
            }
            r.rotate(&mut cols);
            for i in 0..d {
                for j in 0..d {
                    let dot: f64 = (0..d).map(|k| cols[i * d + k] as f64 * cols[j * d + k] as f64).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-6, "d={d} seed={seed}: R R^T [{i}][{j}] = {dot}");
                }
            }
            // The dense matrix is orthogonal too, and its columns are what the fast transform produced.
            let m = r.matrix();
            for i in 0..d {
                for j in 0..d {
                    assert!((m[i * d + j] - cols[j * d + i] as f64).abs() < 1e-6, "d={d}: fast and dense differ");
                }
            }
        }
    }
}

#[test]
fn fast_transform_matches_reference_and_inverts() {
    let mut rng = common::rng(40);
    for d in SIZES {
        let r = HadamardRotation::new(d, 77).unwrap();
        let mut x = common::gaussian(&mut rng, 13 * d, 1.0);
        x[d / 2] *= 20.0;
        let mut y = x.clone();
        r.rotate(&mut y);
        assert!(common::rel_err(&y, &r.rotate_ref(&x)) < 1e-6, "d={d}: rotate vs reference");
        let mut z = y.clone();
        r.unrotate(&mut z);
        assert!(common::rel_err(&z, &x) < 1e-6, "d={d}: unrotate(rotate(x)) != x");
        assert!(common::rel_err(&r.unrotate_ref(&y), &x) < 1e-6, "d={d}: reference inverse");
        // Scores are unchanged: (R q) . (R k) = q . k.
        let q = common::gaussian(&mut rng, d, 1.0);
        let mut rq = q.clone();
        r.rotate(&mut rq);
        for (k, rk) in x.chunks(d).zip(y.chunks(d)) {
            let a: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
            let b: f64 = rq.iter().zip(rk).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "d={d}: {a} vs {b}");
        }
    }
}

#[test]
fn rotation_spreads_an_outlier_channel() {
    // One channel 50x larger than the rest: after rotation no coordinate holds more than a few percent of the norm.
    let d = 128;
    let mut x = vec![0.01f32; d];
    x[5] = 50.0;
    let r = HadamardRotation::new(d, 9).unwrap();
    r.rotate(&mut x);
    let norm2: f32 = x.iter().map(|v| v * v).sum();
    let peak = x.iter().map(|v| v * v).fold(0.0, f32::max);
    assert!(peak / norm2 < 0.02, "largest coordinate holds {} of the energy", peak / norm2);
}

#[test]
fn odd_head_sizes_are_typed_errors() {
    assert!(matches!(HadamardRotation::new(63, 1), Err(Error::RotationSize { head_dim: 63, seed: 1 })));
    let spec = QuantSpec { rotation: Some(Rotation { seed: 4 }), ..QuantSpec::new(Bits::B4, 7, GroupAxis::PerToken) };
    let err = spec.validate(63).unwrap_err();
    assert!(matches!(err, Error::RotationSize { head_dim: 63, seed: 4 }), "{err}");
    assert!(err.to_string().contains("head_dim"), "{err}");
    assert!(spec.validate(72).is_err(), "group 7 does not divide 72, rotation or not");
    assert!(QuantSpec { group: 8, ..spec }.validate(72).is_ok());
}
