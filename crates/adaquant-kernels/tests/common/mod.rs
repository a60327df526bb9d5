//! Seeded data for the kernel tests.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A seeded generator, one per test so tests are independent of order.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` samples of N(0, sigma^2).
pub fn gaussian(rng: &mut StdRng, n: usize, sigma: f32) -> Vec<f32> {
    let normal = Normal::new(0.0f32, sigma).unwrap();
    (0..n).map(|_| normal.sample(rng)).collect()
}

/// `n` codes below `levels`.
pub fn codes(rng: &mut StdRng, n: usize, levels: u32) -> Vec<u8> {
    (0..n).map(|_| rng.random_range(0..levels) as u8).collect()
}

/// Keys with a few outlier channels, as real key caches have (larger norms on some channels).
pub fn keys_with_outliers(rng: &mut StdRng, tokens: usize, d: usize) -> Vec<f32> {
    let mut x = gaussian(rng, tokens * d, 1.0);
    for t in 0..tokens {
        x[t * d + 3 % d] *= 6.0;
        x[t * d + (d - 5) % d] += 4.0;
    }
    x
}

/// Norm-wise relative error ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}
