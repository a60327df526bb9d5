//! `adaquant bench`: prompt-processing and decoding speed of the real model at a given cache depth, after
//! llama.cpp's `llama-bench` (`pp512`, `tg64`, `-d <depth>`), so the two engines compare on the same terms.
//!
//! For each cache configuration and depth, the cache is filled with `depth` tokens once (untimed), and every
//! repetition starts from a copy of that filled state ([`KvCache::snapshot`]):
//! - `pp`: one forward over `pp` new tokens (logits of the last only), timed;
//! - `tg`: `tg` single-token forwards, each feeding the previous step's greedy token, timed as a whole.
//!
//! Token ids are drawn from a seeded generator over the vocabulary, as `llama-bench` does; speed does not depend on
//! what the tokens say. During `tg` the time spent inside the cache (append, quantization and attention) is
//! measured separately and reported as attention's share of a decode step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use adaquant_cache::{CacheShape, CacheSpec, KvCache, LayerMemory, MemoryReport};
use adaquant_model::{ForwardOptions, LogitsRange, Model, WeightsMode};
use anyhow::{bail, Context};
use serde::Serialize;

/// Flags of `adaquant bench`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
    adaquant bench                                    # f32, f16, K8V8, K4V2 at depths 0 and 4096\n  \
    adaquant bench --cache f16,k4v2 --depth 0,4096,16384 --reps 5\n  \
    adaquant bench --cache k4v2-r0 --pp 0 --tg 128    # decoding only, nothing kept in full precision\n\n\
    Prints a Markdown table (mean ± sd over the repetitions) and appends one JSON line per cache and depth to \
    --out. Progress goes to stderr.")]
pub struct BenchArgs {
    /// GGUF file or Hugging Face folder (default: the default model under the data folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated cache configurations (`f32`, `f16`, shorthands such as `k4v2` or `k4v2-g32-r64`, JSON).
    #[arg(long, default_value = "f32,f16,k8v8,k4v2", value_delimiter = ',')]
    pub cache: Vec<String>,
    /// Comma-separated cache depths: tokens already in the cache when the timed work starts.
    #[arg(long, default_value = "0,4096", value_delimiter = ',')]
    pub depth: Vec<usize>,
    /// Prompt tokens processed in one forward (0 skips the prompt test).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens generated one at a time (0 skips the generation test).
    #[arg(long, default_value_t = 64)]
    pub tg: usize,
    /// Repetitions of each test (the table shows mean ± sample standard deviation).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Tokens per forward while filling the cache to its depth.
    #[arg(long, default_value_t = 512)]
    pub fill_chunk: usize,
    /// JSON-lines file the results are appended to.
    #[arg(long, default_value = "results/bench.jsonl")]
    pub out: PathBuf,
}

/// One cache configuration at one depth: the JSON line `adaquant bench` writes.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub model: String,
    pub cache: String,
    pub cache_describe: String,
    pub depth: usize,
    pub threads: usize,
    pub reps: usize,
    pub pp: usize,
    /// Prompt tokens per second, one value per repetition.
    pub pp_tps: Vec<f64>,
    pub pp_tps_mean: Option<f64>,
    pub pp_tps_sd: Option<f64>,
    pub tg: usize,
    pub tg_tps: Vec<f64>,
    pub tg_tps_mean: Option<f64>,
    pub tg_tps_sd: Option<f64>,
    /// Fraction of decode time spent inside the cache (append, quantization, attention), mean over repetitions.
    pub tg_attention_share: Option<f64>,
    /// Bytes the cache holds at `depth`.
    pub cache_bytes_at_depth: usize,
    /// Bytes the model's weights occupy in memory.
    pub weight_bytes: usize,
    /// How the linear layers compute (`f32`, or `packed` for products on the GGUF block formats).
    pub weights: String,
    pub git_rev: String,
    pub unix_time: u64,
}

/// Mean and sample standard deviation (0 for a single value); `None` for no values.
pub fn mean_sd(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    Some((mean, sd))
}

/// A cache that measures the time spent in its inner cache's `append_attend`.
struct Timed {
    inner: Box<dyn KvCache>,
    spent: Duration,
}

impl KvCache for Timed {
    fn shape(&self) -> &CacheShape {
        self.inner.shape()
    }
    fn seq_len(&self, layer: usize) -> usize {
        self.inner.seq_len(layer)
    }
    fn append_attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) -> adaquant_cache::Result<()> {
        let t = Instant::now();
        let r = self.inner.append_attend(layer, q, k, v, out);
        self.spent += t.elapsed();
        r
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn clear(&mut self) {
        self.inner.clear()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Deterministic token ids in `1..vocab` (xorshift), so every run and every cache sees the same tokens.
fn tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (1 + s % (vocab as u64 - 1).max(1)) as u32
        })
        .collect()
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs the benchmark and prints its table.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    run_modes(a, &[adaquant_model::default_weights_mode()])
}

/// [`run`] once per weights mode (`adaquant bench --weights packed,f32`), one table for all, in one process.
pub fn run_modes(a: &BenchArgs, modes: &[WeightsMode]) -> anyhow::Result<()> {
    if modes.is_empty() {
        bail!("give at least one --weights mode");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if a.pp == 0 && a.tg == 0 {
        bail!("--pp and --tg are both 0: nothing to measure");
    }
    if a.fill_chunk == 0 {
        bail!("--fill-chunk must be at least 1");
    }
    if a.cache.is_empty() || a.depth.is_empty() {
        bail!("give at least one --cache and one --depth");
    }
    if a.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if let Some(t) = a.threads.filter(|&t| t != rayon::current_num_threads() || rayon::current_thread_index().is_none())
    {
        // Not yet on a worker of a pool of `t` threads (the `adaquant` binary runs every command on one): measure on
        // one, so that parallel loops start from a worker and no idle caller thread is left beside them.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build()?;
        return pool.install(|| run_modes(a, modes));
    }
    let path = a.model.clone().unwrap_or_else(adaquant_model::paths::default_model);
    if !path.exists() {
        bail!("model {} not found; run `cargo xtask fetch` for the default model or give --model", path.display());
    }
    let mut records = Vec::new();
    for &mode in modes {
        bench_model(a, &path, mode, &mut records)?;
    }
    print!("{}", table(&records));
    eprintln!("[bench] results appended to {}", a.out.display());
    Ok(())
}

/// Every cache and depth of `a` on the model at `path` loaded with `mode`; appends to `records` and `a.out`.
fn bench_model(a: &BenchArgs, path: &Path, mode: WeightsMode, records: &mut Vec<BenchRecord>) -> anyhow::Result<()> {
    let build = |spec: &str, shape: CacheShape| -> anyhow::Result<Box<dyn KvCache>> {
        Ok(CacheSpec::parse_arg(spec)?.build(shape)?)
    };
    let threads = rayon::current_num_threads();
    let max_depth = *a.depth.iter().max().unwrap_or(&0);
    let max_len = max_depth + a.pp.max(a.tg) + 1;
    // Build every cache once before any long work, so a bad spec fails at once.
    let model = Model::load_with(path, mode).with_context(|| format!("loading {}", path.display()))?;
    if max_len > model.config.max_seq_len {
        eprintln!(
            "[bench] note: depth {max_depth} + {} tokens is beyond the {} tokens the model was trained for; speed is \
             still meaningful, its outputs are not",
            a.pp.max(a.tg),
            model.config.max_seq_len
        );
    }
    for spec in &a.cache {
        build(spec, model.cache_shape(max_len)).with_context(|| format!("cache `{spec}`"))?;
    }
    let model_name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let weight_bytes = model.resident_weight_bytes();
    let weights_kind = model.weights_mode().name().to_string();
    let rev = git_rev();
    let fill = tokens(model.config.vocab, max_depth, 0x5eed);
    let prompt = tokens(model.config.vocab, a.pp.max(1), 0xbeef);
    for spec in &a.cache {
        for &depth in &a.depth {
            let mut cache = build(spec, model.cache_shape(depth + a.pp.max(a.tg) + 1))?;
            let t = Instant::now();
            for chunk in fill[..depth].chunks(a.fill_chunk) {
                model.forward(chunk, cache.as_mut(), &mut ForwardOptions::new(LogitsRange::Last))?;
            }
            if depth > 0 {
                eprintln!("[bench] {spec}: filled to depth {depth} in {:.1} s", t.elapsed().as_secs_f64());
            }
            let memory = cache.memory();
            let describe = cache.describe();
            let start = || -> anyhow::Result<Box<dyn KvCache>> {
                cache.snapshot().with_context(|| format!("cache `{spec}` cannot be copied for repeated runs"))
            };
            let (mut pp_tps, mut tg_tps, mut shares) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..a.reps {
                if a.pp > 0 {
                    let mut c = start()?;
                    let t = Instant::now();
                    model.forward(&prompt[..a.pp], c.as_mut(), &mut ForwardOptions::new(LogitsRange::Last))?;
                    let dt = t.elapsed().as_secs_f64();
                    pp_tps.push(a.pp as f64 / dt);
                    eprintln!("[bench] {spec} d{depth} rep {}: pp{} {:.1} t/s", rep + 1, a.pp, a.pp as f64 / dt);
                }
                if a.tg > 0 {
                    let mut c = Timed { inner: start()?, spent: Duration::ZERO };
                    let mut next = prompt[0];
                    let t = Instant::now();
                    for _ in 0..a.tg {
                        let logits = model.forward(&[next], &mut c, &mut ForwardOptions::new(LogitsRange::Last))?;
                        next = logits.argmax(0);
                    }
                    let dt = t.elapsed().as_secs_f64();
                    tg_tps.push(a.tg as f64 / dt);
                    shares.push(c.spent.as_secs_f64() / dt);
                    eprintln!("[bench] {spec} d{depth} rep {}: tg{} {:.1} t/s", rep + 1, a.tg, a.tg as f64 / dt);
                }
            }
            let pp = mean_sd(&pp_tps);
            let tg = mean_sd(&tg_tps);
            let rec = BenchRecord {
                model: model_name.clone(),
                cache: spec.clone(),
                cache_describe: describe,
                depth,
                threads,
                reps: a.reps,
                pp: a.pp,
                pp_tps_mean: pp.map(|p| p.0),
                pp_tps_sd: pp.map(|p| p.1),
                pp_tps,
                tg: a.tg,
                tg_tps_mean: tg.map(|p| p.0),
                tg_tps_sd: tg.map(|p| p.1),
                tg_tps,
                tg_attention_share: mean_sd(&shares).map(|p| p.0),
                cache_bytes_at_depth: memory.layers.iter().map(LayerMemory::total).sum(),
                weight_bytes,
                weights: weights_kind.clone(),
                git_rev: rev.clone(),
                unix_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            append_jsonl(&a.out, &rec)?;
            records.push(rec);
        }
    }
    Ok(())
}

fn append_jsonl(path: &Path, rec: &BenchRecord) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut line = serde_json::to_string(rec)?;
    line.push('\n');
    f.write_all(line.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The Markdown table of a run, one row per test, after `llama-bench`.
pub fn table(records: &[BenchRecord]) -> String {
    let mut s = String::from(
        "| model | weights | cache | threads | test | t/s | cache MiB at depth | attention share |\n\
         | --- | --- | --- | ---: | --- | ---: | ---: | ---: |\n",
    );
    let fmt = |m: Option<f64>, sd: Option<f64>| match (m, sd) {
        (Some(m), Some(sd)) => format!("{m:.2} ± {sd:.2}"),
        _ => "-".into(),
    };
    for r in records {
        let mib = r.cache_bytes_at_depth as f64 / (1 << 20) as f64;
        if r.pp > 0 {
            s += &format!(
                "| {} | {} | {} | {} | pp{} @ d{} | {} | {mib:.1} | |\n",
                r.model,
                r.weights,
                r.cache,
                r.threads,
                r.pp,
                r.depth,
                fmt(r.pp_tps_mean, r.pp_tps_sd)
            );
        }
        if r.tg > 0 {
            let share = r.tg_attention_share.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x));
            s += &format!(
                "| {} | {} | {} | {} | tg{} @ d{} | {} | {mib:.1} | {share} |\n",
                r.model,
                r.weights,
                r.cache,
                r.threads,
                r.tg,
                r.depth,
                fmt(r.tg_tps_mean, r.tg_tps_sd)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(mean_sd(&[]), None);
        assert_eq!(mean_sd(&[3.0]), Some((3.0, 0.0)));
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m, 2.5);
        assert!((sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn tokens_are_deterministic_and_inside_the_vocabulary() {
        let a = tokens(100, 1000, 7);
        assert_eq!(a, tokens(100, 1000, 7));
        assert_ne!(a, tokens(100, 1000, 8));
        assert!(a.iter().all(|&t| (1..100).contains(&(t as usize))));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 50);
    }

    #[test]
    fn table_has_a_row_per_test() {
        let rec = BenchRecord {
            model: "m.gguf".into(),
            cache: "k4v2".into(),
            cache_describe: "K4V2".into(),
            depth: 4096,
            threads: 2,
            reps: 2,
            pp: 512,
            pp_tps: vec![100.0, 110.0],
            pp_tps_mean: Some(105.0),
            pp_tps_sd: Some(7.07),
            tg: 64,
            tg_tps: vec![30.0, 32.0],
            tg_tps_mean: Some(31.0),
            tg_tps_sd: Some(1.41),
            tg_attention_share: Some(0.25),
            cache_bytes_at_depth: 3 << 20,
            weight_bytes: 1,
            weights: "packed".into(),
            git_rev: String::new(),
            unix_time: 0,
        };
        let t = table(&[rec]);
        assert!(t.contains("| pp512 @ d4096 | 105.00 ± 7.07 | 3.0 |"), "{t}");
        assert!(t.contains("| tg64 @ d4096 | 31.00 ± 1.41 | 3.0 | 25% |"), "{t}");
        assert_eq!(t.lines().count(), 4);
    }
}
