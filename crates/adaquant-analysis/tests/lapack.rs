//! Cross-check of faer's singular values against LAPACK (`gesdd` through ndarray-linalg).
//!
//! Runs only with the `lapack` feature and a LAPACK backend, for example
//! `cargo test -p adaquant-analysis --features lapack,ndarray-linalg/openblas-system --test lapack`.
#![cfg(feature = "lapack")]

use adaquant_analysis::linalg::{frobenius, singular_values, View};
use ndarray::Array2;
use ndarray_linalg::SVD;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

#[test]
fn faer_and_lapack_agree() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for &(m, n) in &[(1usize, 1usize), (7, 3), (3, 7), (64, 64), (97, 54), (192, 576), (2048, 64)] {
        // Columns of very different scales give a spread-out spectrum.
        let data: Vec<f64> =
            (0..m * n).map(|i| rng.sample::<f64, _>(StandardNormal) * (1.0 + (i % n) as f64).powf(-1.5)).collect();
        let ours = singular_values(View::new(&data, m, n), "A").unwrap();
        let a = Array2::from_shape_vec((m, n), data.clone()).unwrap();
        let (_, s, _) = a.svd(false, false).unwrap();
        assert_eq!(ours.len(), s.len());
        for (i, (x, y)) in ours.iter().zip(s.iter()).enumerate() {
            assert!((x - y).abs() <= 1e-6 * y.max(1e-12 * ours[0]), "{m}x{n} sigma_{i}: faer {x}, LAPACK {y}");
        }
        let fro_lapack = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((frobenius(View::new(&data, m, n)) - fro_lapack).abs() <= 1e-6 * fro_lapack);
    }
}
