//! Runs one decode-attention configuration in a loop, for profiling (`perf record`) and quick timing.
//!
//! Usage: `cargo run --release -p adaquant-kernels --example attn_profile -- [kbits] [vbits] [ctx] [n_q] [n_kv] [d]`.

use std::time::Instant;

use adaquant_kernels::quant::quantize;
use adaquant_kernels::{decode_attention_serial, Bits, GroupAxis, HeadKv, QuantSpec};

fn main() -> Result<(), adaquant_kernels::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let kb: Bits = arg(0, "4").parse()?;
    let vb: Bits = arg(1, "2").parse()?;
    let ctx: usize = arg(2, "32768").parse().unwrap_or(32768);
    let n_q: usize = arg(3, "9").parse().unwrap_or(9);
    let n_kv: usize = arg(4, "3").parse().unwrap_or(3);
    let d: usize = arg(5, "64").parse().unwrap_or(64);
    let ks = QuantSpec::new(kb, 64, GroupAxis::PerChannel);
    let vs = QuantSpec::new(vb, 64, GroupAxis::PerToken);
    // A cheap deterministic pseudo-random sequence is enough for timing.
    let data = |seed: usize, n: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0).collect()
    };
    let mut streams = Vec::new();
    for h in 0..n_kv {
        streams.push((quantize(&ks, d, &data(2 * h, ctx * d))?, quantize(&vs, d, &data(2 * h + 1, ctx * d))?));
    }
    let heads: Vec<HeadKv<'_>> = streams
        .iter()
        .map(|(k, v)| HeadKv {
            sink_k: &[],
            sink_v: &[],
            k: Some(k.view()),
            v: Some(v.view()),
            tail_k: &[],
            tail_v: &[],
        })
        .collect();
    let bytes: usize = streams.iter().map(|(k, v)| k.bytes() + v.bytes()).sum();
    let q = data(99, n_q * d);
    let mut out = vec![0f32; n_q * d];
    let reps = 50;
    let start = Instant::now();
    for _ in 0..reps {
        decode_attention_serial(&q, &heads, d, 0.125, &mut out)?;
    }
    let t = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "K{kb}V{vb} ctx={ctx} ({n_q},{n_kv},{d}): {:.3} ms, {:.2} GB/s over {bytes} packed bytes",
        t * 1e3,
        bytes as f64 / t / 1e9
    );
    Ok(())
}
