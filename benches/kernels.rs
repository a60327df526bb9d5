//! Criterion benchmarks of the kernels: quantize/dequantize throughput per width, and one decode step of fused
//! attention over packed K/V (K4V2, K4V4, K2V4, K8V8; per-channel keys, per-token values, group 64) against the f32
//! and f16 baselines, at 1K to 64K tokens of context, for SmolLM2 and Llama-3-8B attention shapes. In the same
//! group, K4V2 under every other quantizer family: `K4V2 hqq` (same kernel, HQQ zero points), `K4V2 rot-minmax`
//! (the query rotated before and the output rotated back after the min-max kernel, as the cache does once per
//! step), `K4V2 lloyd` and `K4V2 rot-lloyd` (the Lloyd-Max lookup kernel), so each can be compared with `K4V2`.
//! `K4V2 tok` is the cache's default `k4v2` layout (per-token keys and values), which takes the integer-dot kernels
//! where the CPU has AVX-512 VNNI, and `K4V2 tok exact` the same layout with `ADAQUANT_ATTN=exact`'s f32 kernels.
//!
//! After the criterion runs, a summary table prints median time, bytes read, achieved GB/s, the share of the copy
//! bandwidth measured in the same process, and the speedup over the f16 baseline, with rayon (2 threads here) and on
//! one thread. `ADAQUANT_BENCH_QUICK=1` limits contexts to 4K and 32K; `ADAQUANT_BENCH_SHAPES=smollm2` keeps one
//! attention shape.
//!
//! Run: `cargo bench -p adaquant-benches --bench kernels`.

use std::hint::black_box;
use std::time::Duration;

use adaquant_benches::{gaussian, measure_bandwidth, median_time, DenseLayer, PackedLayer, Shape, LLAMA3_8B, SMOLLM2};
use adaquant_cache::Quantizer;
use adaquant_kernels::attn::{attention_f16, attention_f32, set_attn_kernel, AttnKernel};
use adaquant_kernels::quant::{dequantize, quantize};
use adaquant_kernels::rotate::{head_seed, HadamardRotation};
use adaquant_kernels::simd;
use adaquant_kernels::{decode_attention, Bits, GroupAxis, QuantSpec};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;

const CONFIGS: [(&str, Bits, Bits); 4] = [
    ("K4V2", Bits::B4, Bits::B2),
    ("K4V4", Bits::B4, Bits::B4),
    ("K2V4", Bits::B2, Bits::B4),
    ("K8V8", Bits::B8, Bits::B8),
];

/// K4V2 under the other quantizer families, benchmarked beside the min-max `K4V2`.
const FAMILIES: [(&str, Quantizer); 4] = [
    ("K4V2 hqq", Quantizer::Hqq),
    ("K4V2 rot-minmax", Quantizer::RotMinMax),
    ("K4V2 lloyd", Quantizer::Lloyd),
    ("K4V2 rot-lloyd", Quantizer::RotLloyd),
];

fn specs(kb: Bits, vb: Bits) -> (QuantSpec, QuantSpec) {
    (QuantSpec::new(kb, 64, GroupAxis::PerChannel), QuantSpec::new(vb, 64, GroupAxis::PerToken))
}

/// One packed configuration of a point, with the per-KV-head rotations of its keys and values when it rotates.
struct Packed {
    name: &'static str,
    layer: PackedLayer,
    rot: Option<(Vec<HadamardRotation>, Vec<HadamardRotation>)>,
    /// Runs with the exact (f32) attention kernels whatever `ADAQUANT_ATTN` says.
    exact: bool,
}

fn bench_quant(c: &mut Criterion) {
    let d = 128;
    let tokens = 8192;
    let x = gaussian(7, tokens * d);
    let mut g = c.benchmark_group("quant");
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    for axis in [GroupAxis::PerToken, GroupAxis::PerChannel] {
        for bits in Bits::ALL {
            let spec = QuantSpec::new(bits, 64, axis);
            g.bench_function(BenchmarkId::new(format!("quantize/{axis}"), bits), |b| {
                b.iter(|| quantize(&spec, d, black_box(&x)).unwrap())
            });
            if matches!(bits, Bits::B2 | Bits::B4) {
                for q in [Quantizer::Hqq, Quantizer::Lloyd] {
                    let spec = q.apply(spec);
                    g.bench_function(BenchmarkId::new(format!("quantize-{q}/{axis}"), bits), |b| {
                        b.iter(|| quantize(&spec, d, black_box(&x)).unwrap())
                    });
                }
            }
            let s = quantize(&spec, d, &x).unwrap();
            let mut y = vec![0f32; x.len()];
            g.bench_function(BenchmarkId::new(format!("dequantize/{axis}"), bits), |b| {
                b.iter(|| dequantize(&s.view(), black_box(&mut y)).unwrap())
            });
        }
    }
    g.finish();
}

/// A named kernel of one point: name, bytes it reads, and the call.
type Kernel<'a> = (String, usize, Box<dyn Fn(&mut [f32]) + Sync + 'a>);

/// Everything one (shape, context) point needs.
struct Point {
    shape: Shape,
    ctx: usize,
    q: Vec<f32>,
    packed: Vec<Packed>,
    dense: DenseLayer,
}

impl Point {
    fn new(shape: Shape, ctx: usize) -> Point {
        let mut packed: Vec<Packed> = CONFIGS
            .iter()
            .map(|&(name, kb, vb)| {
                let (ks, vs) = specs(kb, vb);
                Packed { name, layer: PackedLayer::new(shape, ctx, ks, vs, 100), rot: None, exact: false }
            })
            .collect();
        for (name, q) in FAMILIES {
            let (ks, vs) = specs(Bits::B4, Bits::B2);
            let rots = |side: usize| -> Vec<HadamardRotation> {
                (0..shape.n_kv).map(|h| HadamardRotation::new(shape.d, head_seed(0, 0, side, h)).unwrap()).collect()
            };
            let rot = q.rotates().then(|| (rots(0), rots(1)));
            packed.push(Packed {
                name,
                layer: PackedLayer::new(shape, ctx, q.apply(ks), q.apply(vs), 100),
                rot,
                exact: false,
            });
        }
        for (name, exact) in [("K4V2 tok", false), ("K4V2 tok exact", true)] {
            let (ks, vs) =
                (QuantSpec::new(Bits::B4, 64, GroupAxis::PerToken), QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken));
            packed.push(Packed { name, layer: PackedLayer::new(shape, ctx, ks, vs, 100), rot: None, exact });
        }
        Point { shape, ctx, q: gaussian(5, shape.n_q * shape.d), packed, dense: DenseLayer::new(shape, ctx, 100, true) }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.d as f32).sqrt()
    }

    fn run_packed(&self, p: &Packed, out: &mut [f32]) {
        let d = self.shape.d;
        let Some((kr, vr)) = &p.rot else {
            if p.exact {
                set_attn_kernel(Some(AttnKernel::Exact));
            }
            decode_attention(&self.q, &p.layer.heads(), d, self.scale(), out).unwrap();
            if p.exact {
                set_attn_kernel(None);
            }
            return;
        };
        // What the cache does once per step: rotate each query head with its KV head's key rotation, attend, rotate
        // each output head back with its KV head's value rotation.
        let rep = self.shape.n_q / self.shape.n_kv;
        let mut q = self.q.clone();
        for (h, qh) in q.chunks_exact_mut(d).enumerate() {
            kr[h / rep].rotate(qh);
        }
        decode_attention(&q, &p.layer.heads(), d, self.scale(), out).unwrap();
        for (h, oh) in out.chunks_exact_mut(d).enumerate() {
            vr[h / rep].unrotate(oh);
        }
    }

    fn run_f32(&self, out: &mut [f32]) {
        let k: Vec<&[f32]> = self.dense.k32.iter().map(Vec::as_slice).collect();
        let v: Vec<&[f32]> = self.dense.v32.iter().map(Vec::as_slice).collect();
        attention_f32(&self.q, &k, &v, self.shape.d, self.scale(), out).unwrap();
    }

    fn run_f16(&self, out: &mut [f32]) {
        let k: Vec<&[f16]> = self.dense.k16.iter().map(Vec::as_slice).collect();
        let v: Vec<&[f16]> = self.dense.v16.iter().map(Vec::as_slice).collect();
        attention_f16(&self.q, &k, &v, self.shape.d, self.scale(), out).unwrap();
    }

    fn dense_bytes(&self, elem: usize) -> usize {
        2 * self.shape.n_kv * self.ctx * self.shape.d * elem
    }

    /// (name, bytes read, kernel) for every kernel of this point.
    fn kernels(&self) -> Vec<Kernel<'_>> {
        let mut v: Vec<Kernel<'_>> = Vec::new();
        for p in &self.packed {
            v.push((p.name.to_string(), p.layer.bytes(), Box::new(move |o: &mut [f32]| self.run_packed(p, o))));
        }
        v.push(("f16".into(), self.dense_bytes(2), Box::new(|o: &mut [f32]| self.run_f16(o))));
        v.push(("f32".into(), self.dense_bytes(4), Box::new(|o: &mut [f32]| self.run_f32(o))));
        v
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listing = args.iter().any(|a| a == "--test" || a == "--list");
    let quick = std::env::var("ADAQUANT_BENCH_QUICK").is_ok();
    // A criterion filter that cannot match an attention benchmark (for example `quant`) skips building the layers.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let attention = filter.is_none_or(|f| "attention".contains(f.as_str()) || f.contains("attention"));
    let contexts: &[usize] = match (attention, quick) {
        (false, _) => &[],
        (true, true) => &[4096, 32768],
        (true, false) => &[1024, 4096, 16384, 32768, 65536],
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800))
        .configure_from_args();
    bench_quant(&mut c);

    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut rows = Vec::new();
    // `ADAQUANT_BENCH_SHAPES=smollm2` (or `llama3-8b`) keeps one attention shape.
    let only = std::env::var("ADAQUANT_BENCH_SHAPES").ok();
    for shape in [SMOLLM2, LLAMA3_8B] {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|n| n == shape.name)) {
            continue;
        }
        for &ctx in contexts {
            let p = Point::new(shape, ctx);
            let mut out = vec![0f32; shape.n_q * shape.d];
            let mut g = c.benchmark_group(format!("attention/{}/{}k", shape.name, ctx / 1024));
            for (name, bytes, f) in p.kernels() {
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_function(format!("{name}/rayon"), |b| b.iter(|| f(black_box(&mut out))));
                if name == "K4V2" || name == "f16" || name.starts_with("K4V2 tok") {
                    g.bench_function(format!("{name}/1-thread"), |b| b.iter(|| one.install(|| f(black_box(&mut out)))));
                }
                if !listing {
                    let budget = Duration::from_millis(300);
                    let t_par = median_time(5, budget, || f(&mut out));
                    let t_one = median_time(5, budget, || one.install(|| f(&mut out)));
                    rows.push((shape.name, ctx, name, bytes, t_par, t_one));
                }
            }
            g.finish();
        }
    }
    c.final_summary();
    if listing || rows.is_empty() {
        return;
    }
    let bw = measure_bandwidth(256 << 20);
    println!();
    println!("SIMD level: {}", simd::active().name());
    println!("copy bandwidth (1 thread, STREAM convention, read + write): {:.1} GB/s", bw.copy);
    println!("read bandwidth (1 thread, vectorized sum): {:.1} GB/s", bw.read);
    println!();
    println!("| shape | context | kernel | bytes read (MB) | time 2 thr (ms) | GB/s 2 thr | % copy bw | x f16 2 thr | time 1 thr (ms) | GB/s 1 thr | x f16 1 thr |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &(shape, ctx, ref name, bytes, t_par, t_one) in &rows {
        let f16row = rows.iter().find(|r| r.0 == shape && r.1 == ctx && r.2 == "f16").unwrap();
        let gbs = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
        println!(
            "| {shape} | {}K | {name} | {:.2} | {:.3} | {:.1} | {:.0}% | {:.2} | {:.3} | {:.1} | {:.2} |",
            ctx / 1024,
            bytes as f64 / 1e6,
            t_par.as_secs_f64() * 1e3,
            gbs(t_par),
            100.0 * gbs(t_par) / bw.copy,
            f16row.4.as_secs_f64() / t_par.as_secs_f64(),
            t_one.as_secs_f64() * 1e3,
            gbs(t_one),
            f16row.5.as_secs_f64() / t_one.as_secs_f64(),
        );
    }
}
