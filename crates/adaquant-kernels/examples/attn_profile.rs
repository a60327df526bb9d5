//! Runs one decode-attention configuration in a loop, for profiling (`perf record`) and quick timing.
//!
//! Usage: `cargo run --release -p adaquant-kernels --example attn_profile -- [kbits] [vbits] [ctx] [n_q] [n_kv] [d]
//! [channel|token]`.
//! Keys are quantized per channel (or per token with `token`) and values per token, group 64, f16 metadata; the key
//! kernel (`exact` or `int`, see `AttnKernel`; `ADAQUANT_ATTN=exact` forces the f32 one) is printed. One thread
//! (`decode_attention_serial`). Prints the median time of one decode step of one layer, for the packed kernel and
//! for the f16 baseline over the same shape, and the single-threaded copy bandwidth measured in the same process
//! (256 MiB buffers, bytes read plus bytes written).

use std::hint::black_box;
use std::time::Instant;

use adaquant_kernels::attn::attention_f16;
use adaquant_kernels::quant::quantize;
use adaquant_kernels::{decode_attention_serial, Bits, GroupAxis, HeadKv, QuantSpec};
use half::f16;

/// Median of `reps` timings of `f`, in seconds.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() -> Result<(), adaquant_kernels::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let kb: Bits = arg(0, "4").parse()?;
    let vb: Bits = arg(1, "2").parse()?;
    let ctx: usize = arg(2, "32768").parse().unwrap_or(32768);
    let n_q: usize = arg(3, "9").parse().unwrap_or(9);
    let n_kv: usize = arg(4, "3").parse().unwrap_or(3);
    let d: usize = arg(5, "64").parse().unwrap_or(64);
    let kaxis = if arg(6, "channel").starts_with('t') { GroupAxis::PerToken } else { GroupAxis::PerChannel };
    let ks = QuantSpec::new(kb, 64, kaxis);
    let vs = QuantSpec::new(vb, 64, GroupAxis::PerToken);
    // A cheap deterministic pseudo-random sequence is enough for timing.
    let data = |seed: usize, n: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0).collect()
    };
    let mut streams = Vec::new();
    let mut dense = Vec::new();
    for h in 0..n_kv {
        let (k, v) = (data(2 * h, ctx * d), data(2 * h + 1, ctx * d));
        streams.push((quantize(&ks, d, &k)?, quantize(&vs, d, &v)?));
        let to16 = |x: &[f32]| -> Vec<f16> { x.iter().map(|&y| f16::from_f32(y)).collect() };
        dense.push((to16(&k), to16(&v)));
    }
    let heads: Vec<HeadKv<'_>> = streams.iter().map(|(k, v)| HeadKv::packed(k.view(), v.view())).collect();
    let bytes: usize = streams.iter().map(|(k, v)| k.bytes() + v.bytes()).sum();
    let bytes16 = 2 * n_kv * ctx * d * 2;
    let k16: Vec<&[f16]> = dense.iter().map(|(k, _)| k.as_slice()).collect();
    let v16: Vec<&[f16]> = dense.iter().map(|(_, v)| v.as_slice()).collect();
    let q = data(99, n_q * d);
    let mut out = vec![0f32; n_q * d];
    let reps = 51;
    let mut err = None;
    let t = median(reps, || {
        if let Err(e) = decode_attention_serial(black_box(&q), &heads, d, 0.125, &mut out) {
            err = Some(e);
        }
    });
    // The baseline runs on a one-thread pool so that both kernels use one core.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    let t16 = pool.install(|| {
        median(reps, || {
            if let Err(e) = attention_f16(black_box(&q), &k16, &v16, d, 0.125, &mut out) {
                err = Some(e);
            }
        })
    });
    if let Some(e) = err {
        return Err(e);
    }
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let tc = median(5, || dst.copy_from_slice(black_box(&src)));
    let copy = 2.0 * n as f64 / tc / 1e9;
    let gbs = bytes as f64 / t / 1e9;
    println!(
        "K{kb}V{vb} keys {kaxis} ({} kernel) ctx={ctx} ({n_q},{n_kv},{d}) simd={}: {:.3} ms, {:.2} GB/s over {bytes} packed bytes ({:.0}% of copy \
         bandwidth {copy:.1} GB/s); f16 baseline {:.3} ms ({:.2} GB/s); speed-up over f16 {:.2}x",
        adaquant_kernels::attn::key_kernel_for(&ks, d).name(),
        adaquant_kernels::simd::active().name(),
        t * 1e3,
        gbs,
        100.0 * gbs / copy,
        t16 * 1e3,
        bytes16 as f64 / t16 / 1e9,
        t16 / t
    );
    Ok(())
}
