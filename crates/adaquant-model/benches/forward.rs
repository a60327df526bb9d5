//! Criterion benchmarks of the forward pass: the batch-invariant product against faer's GEMM (the baseline, same
//! process) and the plain-loop twin, the packed-weight products (`qgemm`, Q4_1 and Q8_0 blocks with 8-bit block
//! activations, quantization of the activations included) on the same shapes (SmolLM2-135M's projections, one row
//! and 512 rows, and its output head for one row), and prefill and decode of the
//! default model through the f32 cache with f32 and packed weights (skipped with a message when the model is absent).

use adaquant_cache::{FullPrecisionCache, KvCache};
use adaquant_model::linalg::{matmul_t, matmul_t_faer, matmul_t_ref};
use adaquant_model::paths::{default_model, require};
use adaquant_model::qgemm::{self, PackedMatrix};
use adaquant_model::quant::GgmlType;
use adaquant_model::{ForwardOptions, LogitsRange, Model, WeightsMode};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// SmolLM2-135M's projection shapes `(k, m)`: gate/up, q/o, k/v, down; then its tied output head (Q8_0).
const SHAPES: [(usize, usize); 4] = [(576, 1536), (576, 576), (576, 192), (1536, 576)];
const HEAD: (usize, usize) = (576, 49152);

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_t");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(3));
    let mut cases: Vec<(usize, usize, usize)> = vec![(1, 576, 1536), (64, 576, 1536), (512, 576, 1536)];
    cases.extend(SHAPES[1..].iter().flat_map(|&(k, m)| [(1, k, m), (512, k, m)]));
    cases.push((1, HEAD.0, HEAD.1));
    for &(n, k, m) in &cases {
        let head = (k, m) == HEAD;
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut out = vec![0.0f32; n * m];
        g.throughput(Throughput::Elements((2 * n * k * m) as u64));
        if !head {
            g.bench_with_input(BenchmarkId::new("faer", format!("{n}x{k}x{m}")), &(), |b, _| {
                b.iter(|| matmul_t_faer(&x, n, k, &w, m, &mut out))
            });
        }
        g.bench_with_input(BenchmarkId::new("batch_invariant", format!("{n}x{k}x{m}")), &(), |b, _| {
            b.iter(|| matmul_t(&x, n, k, &w, m, &mut out))
        });
        let types: &[GgmlType] = if head { &[GgmlType::Q8_0] } else { &[GgmlType::Q4_1, GgmlType::Q8_0] };
        for &ty in types {
            let pm = packed(ty, m, k);
            g.bench_with_input(BenchmarkId::new(format!("packed_{ty:?}"), format!("{n}x{k}x{m}")), &(), |b, _| {
                b.iter(|| qgemm::linear(&x, n, &pm, &mut out).unwrap())
            });
        }
        if n <= 64 && (k, m) == SHAPES[0] {
            g.bench_with_input(BenchmarkId::new("reference", format!("{n}x{k}x{m}")), &(), |b, _| {
                b.iter(|| matmul_t_ref(&x, n, k, &w, m, &mut out))
            });
        }
    }
    g.finish();
}

/// Well-formed blocks of `ty`: deterministic codes, f16 scales (and minimums) in a sane range.
fn packed(ty: GgmlType, rows: usize, cols: usize) -> PackedMatrix {
    let bytes = ty.bytes_for(cols).unwrap() * rows;
    let mut data: Vec<u8> = (0..bytes).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
    for (i, blk) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
        let d = half::f16::from_f32(0.01 + (i % 7) as f32 * 0.001).to_le_bytes();
        blk[..2].copy_from_slice(&d);
        if ty == GgmlType::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.1).to_le_bytes());
        }
    }
    PackedMatrix::new(ty, rows, cols, data).unwrap()
}

fn model(c: &mut Criterion) {
    let Some(path) = require(default_model(), "forward benchmarks") else { return };
    for mode in [WeightsMode::F32, WeightsMode::Packed] {
        model_with(c, &path, mode);
    }
}

fn model_with(c: &mut Criterion, path: &std::path::Path, mode: WeightsMode) {
    let model = Model::load_with(path, mode).expect("the default model loads");
    let tokens: Vec<u32> = (0..512u32).map(|i| 100 + (i * 37) % 20000).collect();
    let mut cache = FullPrecisionCache::new(model.cache_shape(1024)).unwrap();
    let mut g = c.benchmark_group(format!("smollm2_f32_cache_{}_weights", mode.name()));
    g.sample_size(10);
    g.throughput(Throughput::Elements(512));
    g.bench_function("prefill_512_last_logits", |b| {
        b.iter(|| {
            cache.clear();
            model.forward(&tokens, &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap()
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_one_token_at_depth_512", |b| {
        cache.clear();
        model.forward(&tokens, &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
        b.iter(|| {
            // Each step appends one token; start over before the cache fills.
            if cache.seq_len(0) + 1 > 1024 {
                cache.clear();
                model.forward(&tokens, &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
            }
            model.forward(&[tokens[7]], &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, matmul, model);
criterion_main!(benches);
