//! Costs of the analysis' inner steps at SmolLM2 sizes (2048 tokens, 3 KV heads of 64 channels, 9 query heads):
//! one head's spectrum through faer and through the Jacobi reference, and the attention-output errors of one layer.
//!
//! `cargo bench -p adaquant-analysis --bench analysis`

use adaquant_analysis::linalg::{singular_values, singular_values_ref, View};
use adaquant_analysis::study::{attention_errors, quantize_heads, query_positions, Dims, GroupQuantizer};
use adaquant_kernels::Bits;
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

fn spectra(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (t, hd) = (2048, 64);
    let x = randn(&mut rng, t * hd);
    let mut g = c.benchmark_group("spectrum_2048x64");
    g.sample_size(10);
    g.bench_function("faer", |b| b.iter(|| singular_values(View::new(&x, t, hd), "x").unwrap()));
    g.bench_function("jacobi_ref", |b| b.iter(|| singular_values_ref(View::new(&x, t, hd), "x").unwrap()));
    g.finish();
}

fn attention_error(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let d = Dims { n_layers: 1, n_q_heads: 9, n_kv_heads: 3, head_dim: 64, hidden: 576 };
    let t = 2048;
    let (q, k, v) = (randn(&mut rng, t * d.q_dim()), randn(&mut rng, t * d.kv_dim()), randn(&mut rng, t * d.kv_dim()));
    let quant = GroupQuantizer { group: 64 };
    let widths = [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4, Bits::B5, Bits::B6, Bits::B8];
    let kq: Vec<Vec<f32>> = widths.iter().map(|&b| quantize_heads(&quant, &k, t, 3, 64, b).unwrap()).collect();
    let vq: Vec<Vec<f32>> = widths.iter().map(|&b| quantize_heads(&quant, &v, t, 3, 64, b).unwrap()).collect();
    let pos = query_positions(t, 16);
    let mut g = c.benchmark_group("attention_errors_2048_tokens_16_queries_8_widths");
    g.sample_size(10);
    g.bench_function("fused", |b| b.iter(|| attention_errors(&q, &k, &v, &kq, &vq, &pos, None, &d, 0.125)));
    g.finish();
}

criterion_group!(benches, spectra, attention_error);
criterion_main!(benches);
