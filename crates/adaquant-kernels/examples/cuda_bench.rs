//! GPU decode-attention benchmark (needs `--features cuda` and an NVIDIA GPU):
//! measures the card's device-to-device copy bandwidth, then times the fused K4V2, K4V4 and K8V8 kernels and the
//! f16 baseline at several context lengths and batch sizes with Llama-3-8B head shapes (32 query heads, 8 KV heads,
//! head_dim 128), and prints time, bytes read, achieved GB/s and percent of copy bandwidth.
//!
//! ```text
//! cargo run --release --features cuda -p adaquant-kernels --example cuda_bench -- \
//!     [--contexts 4096,32768,131072] [--batches 1,16] [--iters 20] [--json results.jsonl]
//! cargo run --release --features cuda -p adaquant-kernels --example cuda_bench -- --write-ptx DIR [--arch compute_90]
//! ```
//!
//! `--write-ptx` needs only NVRTC (no GPU): it compiles every specialisation and writes the PTX files that
//! `ADAQUANT_PTX_DIR` loads on a GPU machine without NVRTC.
//!
//! Keys are 4- or 8-bit per-channel groups of 64 tokens, values per-token groups of 64 channels, f16 metadata, a
//! 128-token exact window and no sinks. The cache buffers are allocated zeroed and only their lengths are set:
//! decode attention does the same work whatever the values are.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench needs the `cuda` feature: cargo run --release --features cuda --example cuda_bench");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = bench::main() {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::io::Write as _;
    use std::sync::Arc;

    use adaquant_kernels::cuda::layout::{DType, KernelSpec};
    use adaquant_kernels::cuda::{median, to_dtype_bytes, CudaKernels, DeviceCacheConfig, DeviceF16Kv, DeviceKvCache};
    use adaquant_kernels::{Bits, GroupAxis, QuantSpec, Result};

    const N_Q_HEADS: usize = 32;
    const N_KV_HEADS: usize = 8;
    const HEAD_DIM: usize = 128;

    struct Args {
        contexts: Vec<usize>,
        batches: Vec<usize>,
        iters: usize,
        json: Option<String>,
        write_ptx: Option<String>,
        arch: String,
    }

    fn list(s: &str) -> std::result::Result<Vec<usize>, String> {
        s.split(',').map(|x| x.trim().parse::<usize>().map_err(|e| format!("bad number '{x}': {e}"))).collect()
    }

    fn parse() -> std::result::Result<Args, String> {
        let mut a = Args {
            contexts: vec![4096, 32768, 131072],
            batches: vec![1, 16],
            iters: 20,
            json: None,
            write_ptx: None,
            arch: "compute_90".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--contexts" => a.contexts = list(&value()?)?,
                "--batches" => a.batches = list(&value()?)?,
                "--iters" => a.iters = value()?.parse().map_err(|e| format!("--iters: {e}"))?,
                "--json" => a.json = Some(value()?),
                "--write-ptx" => a.write_ptx = Some(value()?),
                "--arch" => a.arch = value()?,
                "--bench" => {} // Passed by `cargo bench`-style runners; ignored.
                other => return Err(format!("unknown argument {other}; see the file header for usage")),
            }
        }
        Ok(a)
    }

    pub fn main() -> std::result::Result<(), String> {
        let args = parse()?;
        if let Some(dir) = &args.write_ptx {
            return write_ptx(dir, &args.arch).map_err(|e| e.to_string());
        }
        run(&args).map_err(|e| e.to_string())
    }

    fn write_ptx(dir: &str, arch: &str) -> Result<()> {
        let arch: &'static str = Box::leak(arch.to_string().into_boxed_str());
        std::fs::create_dir_all(dir).map_err(|e| adaquant_kernels::Error::Cuda(format!("creating {dir}: {e}")))?;
        let mut bytes = 0;
        let specs = KernelSpec::all();
        for spec in &specs {
            let ptx = adaquant_kernels::cuda::compile_ptx(spec, arch)?;
            let path = std::path::Path::new(dir).join(spec.ptx_file(arch));
            std::fs::write(&path, &ptx)
                .map_err(|e| adaquant_kernels::Error::Cuda(format!("writing {}: {e}", path.display())))?;
            bytes += ptx.len();
        }
        println!("wrote {} PTX files for {arch} ({:.1} MB) to {dir}", specs.len(), bytes as f64 / 1e6);
        Ok(())
    }

    struct Row {
        kernel: String,
        context: usize,
        batch: usize,
        ms: f64,
        bytes: usize,
    }

    fn time_median(k: &CudaKernels, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        k.synchronize()?;
        let mut t = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            t.push(k.time_ms(&mut f)?);
        }
        Ok(median(&mut t))
    }

    fn run(args: &Args) -> Result<()> {
        let k = CudaKernels::new(0)?;
        let name = k.device_name()?;
        let copy_bytes = 1 << 30;
        let copy = k.copy_bandwidth(copy_bytes, args.iters)?;
        println!("device: {name} ({}, {} SMs)", k.arch(), k.sm_count());
        println!("copy bandwidth: {copy:.0} GB/s (device-to-device copy of {} MiB, read + write)", copy_bytes >> 20);
        println!(
            "shapes: {N_Q_HEADS} query heads, {N_KV_HEADS} KV heads, head_dim {HEAD_DIM}; median of {} runs",
            args.iters
        );
        let configs: [(&str, Option<(Bits, Bits)>); 4] = [
            ("K4V2", Some((Bits::B4, Bits::B2))),
            ("K4V4", Some((Bits::B4, Bits::B4))),
            ("K8V8", Some((Bits::B8, Bits::B8))),
            ("f16", None),
        ];
        let mut rows: Vec<Row> = Vec::new();
        for &context in &args.contexts {
            for &batch in &args.batches {
                let q = to_dtype_bytes(
                    &(0..batch * N_Q_HEADS * HEAD_DIM).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>(),
                    DType::F16,
                );
                let qd = k.upload(&q)?;
                let mut out = k.upload(&vec![0u8; q.len()])?;
                let scale = 1.0 / (HEAD_DIM as f32).sqrt();
                for (label, widths) in configs {
                    let (ms, bytes) = match widths {
                        Some((kb, vb)) => {
                            let cfg = DeviceCacheConfig {
                                batch,
                                n_kv_heads: N_KV_HEADS,
                                head_dim: HEAD_DIM,
                                capacity: context,
                                k: QuantSpec::new(kb, 64, GroupAxis::PerChannel),
                                v: QuantSpec::new(vb, 64, GroupAxis::PerToken),
                                residual: 128,
                                sinks: 0,
                            };
                            let mut cache = DeviceKvCache::new(Arc::clone(&k), cfg)?;
                            cache.set_lengths_for_benchmark(&vec![context; batch])?;
                            let ms = time_median(&k, args.iters, || {
                                cache.attention_launch(&qd, &mut out, DType::F16, N_Q_HEADS, scale)
                            })?;
                            (ms, cache.attention_bytes())
                        }
                        None => {
                            let mut kv = DeviceF16Kv::new(Arc::clone(&k), batch, N_KV_HEADS, HEAD_DIM, context)?;
                            kv.set_lengths_for_benchmark(&vec![context; batch])?;
                            let ms = time_median(&k, args.iters, || {
                                kv.attention_launch(&qd, &mut out, DType::F16, N_Q_HEADS, scale)
                            })?;
                            (ms, kv.attention_bytes())
                        }
                    };
                    rows.push(Row { kernel: label.into(), context, batch, ms, bytes });
                }
            }
        }
        println!();
        println!("| kernel | context | batch | time (us) | bytes read (MB) | GB/s | % of copy | speedup vs f16 |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &rows {
            let gbs = r.bytes as f64 / (r.ms * 1e-3) / 1e9;
            let base = rows
                .iter()
                .find(|b| b.kernel == "f16" && b.context == r.context && b.batch == r.batch)
                .map_or(f64::NAN, |b| b.ms / r.ms);
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.2}x |",
                r.kernel,
                r.context,
                r.batch,
                r.ms * 1e3,
                r.bytes as f64 / 1e6,
                gbs,
                100.0 * gbs / copy,
                base
            );
        }
        if let Some(path) = &args.json {
            let mut f = std::fs::File::create(path)
                .map_err(|e| adaquant_kernels::Error::Cuda(format!("creating {path}: {e}")))?;
            for r in &rows {
                let gbs = r.bytes as f64 / (r.ms * 1e-3) / 1e9;
                let line = format!(
                    "{{\"device\":{:?},\"copy_gbs\":{copy:.1},\"kernel\":{:?},\"context\":{},\"batch\":{},\"ms\":{:.6},\"bytes\":{},\"gbs\":{gbs:.1}}}",
                    name, r.kernel, r.context, r.batch, r.ms, r.bytes
                );
                writeln!(f, "{line}").map_err(|e| adaquant_kernels::Error::Cuda(format!("writing {path}: {e}")))?;
            }
        }
        Ok(())
    }
}
