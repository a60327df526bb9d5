//! Criterion benchmarks of the KV caches: append throughput and one decode step of attention through the cache,
//! for K4V2 and K8V8 quantized caches (per-token groups of 64, 128 exact recent tokens) and K4V2 with KIVI's
//! per-channel keys, against the f32 full-precision cache, at
//! 4K and 32K tokens of context, with SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64), one
//! layer.
//!
//! Run with `cargo bench -p adaquant-benches --bench cache`. Decode steps report the bytes the cache holds as
//! throughput, so criterion's bytes per second is the achieved bandwidth over the cache.

use std::time::{Duration, Instant};

use adaquant_cache::{CacheShape, FullPrecisionCache, KvCache, QuantCacheConfig, QuantizedCache};
use adaquant_kernels::Bits;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const DEPTHS: [usize; 2] = [4096, 32768];
const APPEND_CHUNK: usize = 512;
/// Decode steps run on one copy of the cache before it is reset to its starting depth (the copy is not timed).
const STEPS_PER_RESET: u64 = 64;

fn shape() -> CacheShape {
    CacheShape::new(1, 9, 3, 64, 32768 + 8 * APPEND_CHUNK + STEPS_PER_RESET as usize)
}

/// Deterministic pseudo-random values in [-2, 2), with a per-channel offset like real keys.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0 + ((i % 64) as f32 * 0.37).sin()
        })
        .collect()
}

#[derive(Clone)]
enum AnyCache {
    Full(FullPrecisionCache),
    Quant(QuantizedCache),
}

impl AnyCache {
    fn new(name: &str) -> AnyCache {
        let s = shape();
        match name {
            "f32" => AnyCache::Full(FullPrecisionCache::new(s).unwrap()),
            "K4V2" => AnyCache::Quant(QuantizedCache::new(s, QuantCacheConfig::split(1, Bits::B4, Bits::B2)).unwrap()),
            "K8V8" => AnyCache::Quant(QuantizedCache::new(s, QuantCacheConfig::split(1, Bits::B8, Bits::B8)).unwrap()),
            "K4V2-kivi" => {
                AnyCache::Quant(QuantizedCache::new(s, QuantCacheConfig::kivi(1, Bits::B4, Bits::B2)).unwrap())
            }
            _ => unreachable!("unknown cache {name}"),
        }
    }

    fn append(&mut self, k: &[f32], v: &[f32]) {
        match self {
            AnyCache::Full(c) => c.append(0, k, v).unwrap(),
            AnyCache::Quant(c) => c.append(0, k, v).unwrap(),
        }
    }

    fn cache(&mut self) -> &mut dyn KvCache {
        match self {
            AnyCache::Full(c) => c,
            AnyCache::Quant(c) => c,
        }
    }

    fn filled(name: &str, tokens: usize) -> AnyCache {
        let kr = shape().kv_row();
        let mut c = AnyCache::new(name);
        let (k, v) = (data(tokens * kr, 1), data(tokens * kr, 2));
        for t in (0..tokens).step_by(4096) {
            let end = (t + 4096).min(tokens);
            c.append(&k[t * kr..end * kr], &v[t * kr..end * kr]);
        }
        c
    }
}

const CACHES: [&str; 4] = ["f32", "K4V2", "K8V8", "K4V2-kivi"];

fn append(c: &mut Criterion) {
    let kr = shape().kv_row();
    let (k, v) = (data(APPEND_CHUNK * kr, 3), data(APPEND_CHUNK * kr, 4));
    let mut g = c.benchmark_group("cache/append");
    g.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(APPEND_CHUNK as u64));
    for name in CACHES {
        let base = AnyCache::filled(name, 4096);
        g.bench_function(BenchmarkId::new(name, format!("{APPEND_CHUNK}@4096")), |b| {
            // Up to 8 chunks per copy of the 4096-token cache, so buffer growth is amortized as in real use.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut c = base.clone();
                    let steps = 8.min(iters - done);
                    let start = Instant::now();
                    for _ in 0..steps {
                        c.append(&k, &v);
                    }
                    total += start.elapsed();
                    done += steps;
                }
                total
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let s = shape();
    let (q, k, v) = (data(s.q_row(), 5), data(s.kv_row(), 6), data(s.kv_row(), 7));
    let mut out = vec![0.0; s.q_row()];
    let mut g = c.benchmark_group("cache/decode_step");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for depth in DEPTHS {
        for name in CACHES {
            let mut base = AnyCache::filled(name, depth);
            g.throughput(Throughput::Bytes(base.cache().memory().total_bytes() as u64));
            g.bench_function(BenchmarkId::new(name, depth), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let mut c = base.clone();
                        let steps = STEPS_PER_RESET.min(iters - done);
                        let start = Instant::now();
                        for _ in 0..steps {
                            c.cache().append_attend(0, &q, &k, &v, &mut out).unwrap();
                        }
                        total += start.elapsed();
                        done += steps;
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, append, decode);
criterion_main!(benches);
