//! Matrix statistics on synthetic matrices with known spectra: A = U diag(s) V^T with seeded random orthogonal
//! factors, so the singular values are known exactly.

use adaquant_analysis::error::AnalysisError;
use adaquant_analysis::linalg::{
    channel_stats, channel_stats_ref, effective_rank, frobenius, mat_stats, mean_min_max, singular_values,
    singular_values_ref, spectral_gap, View,
};
use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A random m x k matrix with orthonormal columns (k <= m), from the QR factorisation of a Gaussian matrix.
fn orthonormal(rng: &mut rand::rngs::StdRng, m: usize, k: usize) -> Mat<f64> {
    let g = Mat::from_fn(m, k, |_, _| rng.sample::<f64, _>(StandardNormal));
    g.qr().compute_thin_Q()
}

/// Row-major data of U diag(s) V^T for an m x n matrix; `s` has min(m, n) entries.
fn with_spectrum(seed: u64, m: usize, n: usize, s: &[f64]) -> Vec<f64> {
    let k = m.min(n);
    assert_eq!(s.len(), k);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let u = orthonormal(&mut rng, m, k);
    let v = orthonormal(&mut rng, n, k);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| u[(i, l)] * s[l] * v[(j, l)]).sum();
        }
    }
    out
}

/// Spectra to test: geometric decay over four decades, a flat one, one with a repeated value and zeros.
fn spectra(k: usize) -> Vec<Vec<f64>> {
    let geometric: Vec<f64> = (0..k).map(|i| 100.0 * 10f64.powf(-4.0 * i as f64 / k as f64)).collect();
    let flat = vec![3.5; k];
    let mut deficient: Vec<f64> = (0..k).map(|i| (k - i) as f64).collect();
    if k > 2 {
        deficient[1] = deficient[0];
        for x in deficient.iter_mut().skip(k - k / 3) {
            *x = 0.0;
        }
    }
    vec![geometric, flat, deficient]
}

/// Each singular value within 1e-9 of the truth relative to itself, or relative to sigma1 where the truth is 0.
fn assert_spectrum(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let s1 = want[0];
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = if w > 0.0 { 1e-9 * w } else { 1e-12 * s1 };
        assert!((g - w).abs() <= tol, "{what}: sigma_{i} = {g}, want {w}");
    }
}

const SHAPES: [(usize, usize); 7] = [(1, 1), (5, 3), (3, 5), (17, 17), (97, 54), (40, 130), (300, 64)];

#[test]
fn faer_spectrum_matches_known_singular_values() {
    for (seed, &(m, n)) in SHAPES.iter().enumerate() {
        for (si, s) in spectra(m.min(n)).iter().enumerate() {
            let a = with_spectrum(seed as u64 * 10 + si as u64, m, n, s);
            let got = singular_values(View::new(&a, m, n), "A").unwrap();
            assert_spectrum(&got, s, &format!("faer {m}x{n} spectrum {si}"));
        }
    }
}

#[test]
fn jacobi_reference_matches_known_singular_values() {
    for (seed, &(m, n)) in SHAPES.iter().enumerate() {
        for (si, s) in spectra(m.min(n)).iter().enumerate() {
            let a = with_spectrum(seed as u64 * 10 + si as u64 + 1000, m, n, s);
            let got = singular_values_ref(View::new(&a, m, n), "A").unwrap();
            assert_spectrum(&got, s, &format!("jacobi {m}x{n} spectrum {si}"));
        }
    }
}

#[test]
fn stats_follow_from_the_spectrum() {
    let (m, n) = (97, 54);
    let s = &spectra(54)[0];
    let a = with_spectrum(3, m, n, s);
    let st = mat_stats(View::new(&a, m, n), "A").unwrap();
    let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((st.fro - fro).abs() <= 1e-12 * fro);
    assert!((st.spec - s[0]).abs() <= 1e-9 * s[0]);
    assert!((st.spectral_gap.unwrap() - s[0] / s[1]).abs() <= 1e-9 * s[0] / s[1]);
    assert!((st.stable_rank - (fro / s[0]).powi(2)).abs() <= 1e-9);
    assert!((st.effective_rank - effective_rank(s)).abs() <= 1e-9);
    assert_eq!((st.rows, st.cols), (m, n));

    // Known effective ranks: n equal values give n, one non-zero value gives 1, the zero matrix 0.
    assert!((effective_rank(&[2.0; 17]) - 17.0).abs() < 1e-12);
    assert!((effective_rank(&[5.0, 0.0, 0.0]) - 1.0).abs() < 1e-15);
    assert_eq!(effective_rank(&[0.0, 0.0]), 0.0);
    // Two values with p = (3/4, 1/4): exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
    let h: f64 = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
    assert!((effective_rank(&[3.0, 1.0]) - h.exp()).abs() < 1e-15);
    assert_eq!(spectral_gap(&[4.0, 2.0, 1.0]), Some(2.0));
    assert_eq!(spectral_gap(&[4.0, 0.0]), None);
    assert_eq!(spectral_gap(&[4.0]), None);
}

#[test]
fn strided_head_view_equals_dense_copy() {
    // A token-major cache slice [tokens][heads][head_dim] with awkward sizes.
    let (tokens, heads, hd) = (53, 3, 24);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let data: Vec<f32> = (0..tokens * heads * hd).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
    for h in 0..heads {
        let view = View::columns(&data, tokens, heads * hd, h * hd, hd);
        let dense: Vec<f32> = (0..tokens).flat_map(|t| data[t * heads * hd + h * hd..][..hd].to_vec()).collect();
        let a = mat_stats(view, "head").unwrap();
        let b = mat_stats(View::new(&dense, tokens, hd), "dense").unwrap();
        assert_eq!(a, b);
        assert_eq!(channel_stats(view), channel_stats(View::new(&dense, tokens, hd)));
    }
    // Row ranges: the first 10 tokens.
    let all = View::new(&data, tokens, heads * hd);
    let first = all.row_range(0, 10);
    assert!((frobenius(first) - frobenius(View::new(&data[..10 * heads * hd], 10, heads * hd))).abs() < 1e-12);
}

#[test]
fn channel_stats_match_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for &(m, n) in &[(1usize, 1usize), (7, 3), (54, 97), (129, 64)] {
        let data: Vec<f32> = (0..m * n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let fast = channel_stats(View::new(&data, m, n));
        let slow = channel_stats_ref(View::new(&data, m, n));
        assert_eq!(fast.max_abs, slow.max_abs);
        for (a, b) in fast.mean_abs.iter().zip(&slow.mean_abs) {
            assert!((a - b).abs() <= 1e-12 * b.max(1.0), "{a} vs {b}");
        }
    }
    let c = channel_stats(View::new(&[1.0f64, -4.0, -3.0, 2.0], 2, 2));
    assert_eq!(c.max_abs, vec![3.0, 4.0]);
    assert_eq!(c.mean_abs, vec![2.0, 3.0]);
}

#[test]
fn frobenius_does_not_overflow() {
    let big = [1e200f64, 1e200, 1e200, 1e200];
    assert!((frobenius(View::new(&big, 2, 2)) - 2e200).abs() < 1e186);
    assert_eq!(frobenius(View::new(&[0.0f64; 6], 2, 3)), 0.0);
}

#[test]
fn bad_matrices_are_typed_errors() {
    let mut data = vec![1.0f32; 12];
    data[7] = f32::NAN;
    let e = singular_values(View::new(&data, 3, 4), "K").unwrap_err();
    assert!(matches!(e, AnalysisError::NonFinite { row: 1, col: 3, .. }), "{e}");
    let e = singular_values(View::new(&data[..11], 3, 4), "K").unwrap_err();
    assert!(matches!(e, AnalysisError::Shape { needed: 12, got: 11, .. }), "{e}");
    let e = mat_stats(View::new(&data, 0, 4), "K").unwrap_err();
    assert!(matches!(e, AnalysisError::EmptyMatrix { .. }), "{e}");
    assert!(e.to_string().contains('K'));
}

#[test]
fn mean_min_max_over_heads() {
    let a = [3.0, 2.0, 1.0];
    let b = [5.0, 1.0];
    let (mean, lo, hi) = mean_min_max(&[&a, &b]);
    assert_eq!(mean, vec![4.0, 1.5, 1.0]);
    assert_eq!(lo, vec![3.0, 1.0, 1.0]);
    assert_eq!(hi, vec![5.0, 2.0, 1.0]);
}
