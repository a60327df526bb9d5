//! Shared helpers for the criterion benchmarks: seeded data, packed KV heads, and memory bandwidth measured in the
//! same process as the kernels, so that achieved bandwidth can be compared with what the machine delivers.

use std::hint::black_box;
use std::time::{Duration, Instant};

use adaquant_kernels::attn::HeadKv;
use adaquant_kernels::quant::{quantize, PackedStream};
use adaquant_kernels::QuantSpec;
use half::f16;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// `n` seeded samples of N(0, 1).
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

/// Attention shape of one layer: query heads, KV heads, head dimension.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub n_q: usize,
    pub n_kv: usize,
    pub d: usize,
}

/// SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64.
pub const SMOLLM2: Shape = Shape { name: "smollm2", n_q: 9, n_kv: 3, d: 64 };
/// Llama-3-8B: 32 query heads, 8 KV heads, head_dim 128.
pub const LLAMA3_8B: Shape = Shape { name: "llama3-8b", n_q: 32, n_kv: 8, d: 128 };

/// The packed keys and values of every KV head of one layer.
pub struct PackedLayer {
    pub k: Vec<PackedStream>,
    pub v: Vec<PackedStream>,
}

impl PackedLayer {
    /// Quantizes `tokens` seeded tokens per KV head.
    pub fn new(shape: Shape, tokens: usize, kspec: QuantSpec, vspec: QuantSpec, seed: u64) -> PackedLayer {
        let mut k = Vec::new();
        let mut v = Vec::new();
        for h in 0..shape.n_kv {
            let x = gaussian(seed + 2 * h as u64, tokens * shape.d);
            k.push(quantize(&kspec, shape.d, &x).unwrap());
            let x = gaussian(seed + 2 * h as u64 + 1, tokens * shape.d);
            v.push(quantize(&vspec, shape.d, &x).unwrap());
        }
        PackedLayer { k, v }
    }

    /// The heads as the attention kernels take them (no sinks, no tail).
    pub fn heads(&self) -> Vec<HeadKv<'_>> {
        self.k.iter().zip(&self.v).map(|(k, v)| HeadKv::packed(k.view(), v.view())).collect()
    }

    /// Packed bytes the kernel reads (codes and metadata of keys and values).
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(PackedStream::bytes).sum()
    }
}

/// Unquantized keys and values of one layer, in f32 and f16.
pub struct DenseLayer {
    pub k32: Vec<Vec<f32>>,
    pub v32: Vec<Vec<f32>>,
    pub k16: Vec<Vec<f16>>,
    pub v16: Vec<Vec<f16>>,
}

impl DenseLayer {
    pub fn new(shape: Shape, tokens: usize, seed: u64, with_f32: bool) -> DenseLayer {
        let mut l = DenseLayer { k32: vec![], v32: vec![], k16: vec![], v16: vec![] };
        for h in 0..shape.n_kv {
            for (i, (d32, d16)) in [(&mut l.k32, &mut l.k16), (&mut l.v32, &mut l.v16)].into_iter().enumerate() {
                let x = gaussian(seed + 2 * h as u64 + i as u64, tokens * shape.d);
                d16.push(x.iter().map(|&a| f16::from_f32(a)).collect());
                if with_f32 {
                    d32.push(x);
                }
            }
        }
        l
    }
}

/// Median wall time of `f` over at least `min_runs` runs and about `budget` of time.
pub fn median_time(min_runs: usize, budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Memory bandwidth of this machine, measured now, in GB/s (10^9 bytes per second).
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    /// STREAM-style copy: bytes read plus bytes written per second, one thread.
    pub copy: f64,
    /// Bytes read per second by a vectorized sum over a buffer far larger than the caches, one thread.
    pub read: f64,
}

/// Measures single-threaded copy and read bandwidth over `bytes`-byte buffers (use well above the last-level cache).
pub fn measure_bandwidth(bytes: usize) -> Bandwidth {
    let n = bytes / 4;
    let src: Vec<f32> = (0..n).map(|i| (i % 1024) as f32).collect();
    let mut dst = vec![0f32; n];
    let copy = median_time(5, Duration::from_millis(1500), || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let read = median_time(5, Duration::from_millis(1500), || {
        let mut acc = [0f32; 16];
        for c in black_box(&src).chunks_exact(16) {
            for l in 0..16 {
                acc[l] += c[l];
            }
        }
        black_box(acc);
    });
    Bandwidth { copy: 2.0 * bytes as f64 / copy.as_secs_f64() / 1e9, read: bytes as f64 / read.as_secs_f64() / 1e9 }
}
