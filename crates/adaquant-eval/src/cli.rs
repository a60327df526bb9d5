//! Command-line arguments of `adaquant sweep`, `adaquant ppl` and `adaquant eval-tasks`, and what they run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use adaquant_cache::{CacheSpec, KvCache};
use adaquant_kernels::GroupAxis;
use adaquant_model::{paths, Model};
use anyhow::{bail, Context};
use clap::Args;

use crate::metrics::{build_reference, evaluate_text, TextEvalSpec};
use crate::progress::Progress;
use crate::report::{markdown_table, write_report};
use crate::results::merge_dirs;
use crate::sweep::{
    git_revision, parse_side_bits, run_sweep, run_tasks, sha256_file, PointSpec, PolicySpec, SensSource, Shard,
    SweepPlan, TaskData, TaskSelection,
};
use crate::tasks::PasskeySpec;

/// Windows of the default sweep: 8 x 512 tokens (2,040 scored tokens per point) keeps the default sweep of seven
/// points under ten minutes on two cores.
pub const DEFAULT_WINDOWS: usize = 8;

/// The paper's key points (K bits : V bits).
pub const PAPER_PAIRS: &str = "8:8,4:4,4:2,2:4,2:2";

/// Arguments of `adaquant sweep`.
#[derive(Clone, Debug, Args)]
pub struct SweepArgs {
    /// Model: a .gguf file or a Hugging Face folder [default: the SmolLM2-135M-Instruct GGUF in the data folder].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text for perplexity and KL, tokenized as one string (BOS in front and first in every window for models that add BOS, as llama.cpp does) [default: WikiText-2 raw test].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Output folder: results.jsonl (one line per finished point), table.md and the plots.
    #[arg(long, default_value = "results/sweep")]
    pub out: PathBuf,
    /// Window length in tokens; the first half of each window is context, the second half is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Number of non-overlapping windows from the start of the text (scored tokens = windows x (ctx/2 - 1)).
    #[arg(long, default_value_t = DEFAULT_WINDOWS)]
    pub windows: usize,
    /// Keep the reference's top-K log-probabilities per position for KL (0 = whole rows: exact KL, 4 x vocab bytes
    /// per scored token). With K > 0 the KL is a lower bound over {top-K, rest}; perplexity and top-1 are exact.
    #[arg(long, default_value_t = 256)]
    pub ref_topk: usize,
    /// K:V bit pairs, e.g. `4:2,2:4` (16 = unquantized). Used unless --k-bits/--v-bits are given [default: the
    /// paper's K8V8, K4V4, K4V2, K2V4, K2V2].
    #[arg(long, value_delimiter = ',')]
    pub pairs: Vec<String>,
    /// Key widths of a full K x V grid (any of 1, 1.58, 2, 3, 4, 5, 6, 8, 16); needs --v-bits.
    #[arg(long, value_delimiter = ',')]
    pub k_bits: Vec<String>,
    /// Value widths of a full K x V grid; needs --k-bits.
    #[arg(long, value_delimiter = ',')]
    pub v_bits: Vec<String>,
    /// Group sizes (per-token: channels of one head, must divide head_dim; per-channel: tokens).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub group: Vec<usize>,
    /// Group layouts of keys: per-token (the authors' HQQ axis=1) and/or per-channel (KIVI).
    #[arg(long, value_delimiter = ',', default_value = "per-token")]
    pub k_axis: Vec<GroupAxis>,
    /// Group layouts of values.
    #[arg(long, value_delimiter = ',', default_value = "per-token")]
    pub v_axis: Vec<GroupAxis>,
    /// Most recent tokens kept in full precision (per-channel groups need a multiple of the group size).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub residual: Vec<usize>,
    /// Leading tokens (attention sinks) kept in full precision.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub sinks: Vec<usize>,
    /// Average bits per element of layer-wise budget allocations (the budget solver over per-layer sensitivities).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub budget: Vec<f64>,
    /// Sensitivities of the budget solver: weight_fro, weight_spec (computed from the model's W_K/W_V), kl
    /// (measured per layer), or sensitivities .json files written by `adaquant analyze`.
    #[arg(long, value_delimiter = ',', default_value = "weight_fro")]
    pub sensitivity: Vec<String>,
    /// Run no budget points.
    #[arg(long)]
    pub no_budget: bool,
    /// HellaSwag accuracy on the first N items at every point (0 = all 10,042).
    #[arg(long)]
    pub hellaswag: Option<usize>,
    /// ARC-Easy accuracy on the first N items (0 = all 2,376).
    #[arg(long)]
    pub arc: Option<usize>,
    /// LAMBADA greedy last-word accuracy on the first N items (0 = all 5,153).
    #[arg(long)]
    pub lambada: Option<usize>,
    /// Passkey retrieval at these prompt lengths in tokens, e.g. 1024,2048,4096,8192.
    #[arg(long, value_delimiter = ',')]
    pub passkey: Vec<usize>,
    /// Needle depths of the passkey prompts (0 = start, 1 = end).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    pub passkey_depths: Vec<f64>,
    /// Passkey prompts per (length, depth).
    #[arg(long, default_value_t = 1)]
    pub passkey_trials: usize,
    /// Run shard i of N (0-based), e.g. 0/4; also read from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
    #[arg(long)]
    pub shard: Option<String>,
    /// Build the table and plots from the results*.jsonl files in these folders (shards' outputs) and exit;
    /// they are written to --out.
    #[arg(long, num_args = 1..)]
    pub merge: Vec<PathBuf>,
    /// Print the points and exit.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_points(a: &SweepArgs) -> anyhow::Result<Vec<PointSpec>> {
    let pairs: Vec<(String, String)> = if !a.k_bits.is_empty() || !a.v_bits.is_empty() {
        if a.k_bits.is_empty() || a.v_bits.is_empty() {
            bail!("--k-bits and --v-bits go together (a K x V grid); use --pairs for a list of K:V pairs");
        }
        a.k_bits.iter().flat_map(|k| a.v_bits.iter().map(move |v| (k.clone(), v.clone()))).collect()
    } else {
        let list: Vec<String> =
            if a.pairs.is_empty() { PAPER_PAIRS.split(',').map(String::from).collect() } else { a.pairs.clone() };
        list.iter()
            .map(|p| {
                let t = p.trim().to_ascii_lowercase();
                let t = t.trim_start_matches('k');
                let (k, v) = t.split_once([':', 'v']).with_context(|| format!("pair '{p}': write K:V, e.g. 4:2"))?;
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut policies = Vec::new();
    for (k, v) in &pairs {
        policies.push(PolicySpec::Fixed { k: parse_side_bits(k)?, v: parse_side_bits(v)? });
    }
    if !a.no_budget {
        for &b in &a.budget {
            for s in &a.sensitivity {
                policies.push(PolicySpec::Budget { avg_bits: b, sensitivity: s.parse::<SensSource>()? });
            }
        }
    }
    let mut points = vec![PointSpec {
        policy: PolicySpec::Full,
        group: a.group[0],
        k_axis: a.k_axis[0],
        v_axis: a.v_axis[0],
        residual: 0,
        sinks: 0,
    }];
    for &group in &a.group {
        for &k_axis in &a.k_axis {
            for &v_axis in &a.v_axis {
                for &residual in &a.residual {
                    for &sinks in &a.sinks {
                        for policy in &policies {
                            points.push(PointSpec { policy: policy.clone(), group, k_axis, v_axis, residual, sinks });
                        }
                    }
                }
            }
        }
    }
    Ok(points)
}

fn tasks_from(a: &SweepArgs) -> TaskSelection {
    TaskSelection {
        hellaswag: a.hellaswag,
        arc_easy: a.arc,
        lambada: a.lambada,
        passkey: (!a.passkey.is_empty()).then(|| PasskeySpec {
            lengths: a.passkey.clone(),
            depths: a.passkey_depths.clone(),
            trials: a.passkey_trials,
            seed: 7,
        }),
    }
}

fn load_model(path: &Path) -> anyhow::Result<Model> {
    let t = Instant::now();
    let m = Model::load(path).with_context(|| format!("loading {}", path.display()))?;
    eprintln!("loaded {} in {:.1} s", path.display(), t.elapsed().as_secs_f64());
    Ok(m)
}

/// Tokenizes a text file for evaluation in `ctx`-token windows, with llama.cpp's BOS rule (BOS in front and at the
/// start of every window for models that add BOS; see `adaquant_model::perplexity::text_tokens`).
fn tokenize_text(model: &Model, path: &Path, ctx: usize) -> anyhow::Result<Vec<u32>> {
    let t = Instant::now();
    let text = crate::data::load_text(path)?;
    let tokens = adaquant_model::perplexity::text_tokens(model.tokenizer(), &text, ctx)?;
    eprintln!("tokenized {} ({} tokens) in {:.1} s", path.display(), tokens.len(), t.elapsed().as_secs_f64());
    Ok(tokens)
}

/// Writes the table and plots of `dir`'s records and prints the table.
fn finish_report(records: &[crate::results::PointResult], out: &Path) -> anyhow::Result<()> {
    let files = write_report(records, out)?;
    println!("\n{}", markdown_table(records));
    println!("table: {}", files.table.display());
    println!("plots ({}): {}", files.plots.len(), out.display());
    Ok(())
}

/// `adaquant sweep`.
pub fn sweep(a: &SweepArgs) -> anyhow::Result<()> {
    if !a.merge.is_empty() {
        let records = merge_dirs(&a.merge)?;
        if records.is_empty() {
            bail!("no results*.jsonl records found in {:?}", a.merge);
        }
        println!("merged {} points from {} folders", records.len(), a.merge.len());
        return finish_report(&records, &a.out);
    }
    let points = parse_points(a)?;
    let shard = match &a.shard {
        Some(s) => Some(Shard::parse(s)?),
        None => Shard::from_slurm(|k| std::env::var(k).ok())?,
    };
    let text = TextEvalSpec { ctx: a.ctx, windows: a.windows, topk: a.ref_topk };
    if a.dry_run {
        for (i, p) in points.iter().enumerate() {
            let mine = shard.is_none_or(|s| s.owns(i));
            println!("{i:4} {} {:<28} {}", if mine { '*' } else { ' ' }, p.name(), p.config_key());
        }
        return Ok(());
    }
    let model_path = a.model.clone().unwrap_or_else(paths::default_model);
    let text_path = a.text.clone().unwrap_or_else(paths::wikitext2_test);
    let model = load_model(&model_path)?;
    let tokens = tokenize_text(&model, &text_path, text.ctx)?;
    let plan = SweepPlan {
        points,
        text,
        tasks: tasks_from(a),
        out: a.out.clone(),
        shard,
        model_name: model_path.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        model_sha256: sha256_file(&model_path)?,
        data_sha256: sha256_file(&text_path)?,
        git_rev: git_revision(),
        hellaswag_path: paths::hellaswag(),
        arc_path: paths::arc_easy(),
        lambada_path: paths::lambada(),
    };
    let t = Instant::now();
    let file = run_sweep(&model, &tokens, &plan)?;
    println!("sweep finished in {:.1} min; results in {}", t.elapsed().as_secs_f64() / 60.0, file.path().display());
    // The table covers every results file of the output folder (all shards written there so far).
    let records = merge_dirs(std::slice::from_ref(&a.out))?;
    finish_report(&records, &a.out)
}

/// Parses a cache argument: a shorthand (`f32`, `f16`, `k4v2`, `k4v2-kivi-g32-r64-s4`) or a JSON file.
pub fn parse_cache(s: &str) -> anyhow::Result<CacheSpec> {
    if s.ends_with(".json") {
        return Ok(CacheSpec::load(Path::new(s))?);
    }
    Ok(s.parse::<CacheSpec>()?)
}

/// Arguments of `adaquant ppl`.
#[derive(Clone, Debug, Args)]
pub struct PplArgs {
    /// Model [default: the SmolLM2-135M-Instruct GGUF in the data folder].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text [default: WikiText-2 raw test].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// KV cache: f32, f16, a shorthand such as k4v2 or k4v2-kivi-r64-s4 (16 = unquantized side), or a JSON spec file.
    #[arg(long, default_value = "f32")]
    pub cache: String,
    /// Window length (llama.cpp protocol: first half context, second half scored); try 2048, 4096 or 8192 too.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Number of windows.
    #[arg(long, default_value_t = 100)]
    pub windows: usize,
    /// Also compute KL and top-1 against the f32 cache (runs the f32 reference first).
    #[arg(long)]
    pub kl: bool,
    /// Reference top-K for KL (0 = exact).
    #[arg(long, default_value_t = 256)]
    pub ref_topk: usize,
}

/// `adaquant ppl`.
pub fn ppl(a: &PplArgs) -> anyhow::Result<()> {
    let cache_spec = parse_cache(&a.cache)?;
    let model_path = a.model.clone().unwrap_or_else(paths::default_model);
    let model = load_model(&model_path)?;
    let tokens = tokenize_text(&model, &a.text.clone().unwrap_or_else(paths::wikitext2_test), a.ctx)?;
    let spec = TextEvalSpec { ctx: a.ctx, windows: a.windows, topk: a.ref_topk };
    let windows = spec.windows(&tokens)?;
    let shape = model.cache_shape(a.ctx);
    let processed = (windows.len() * a.ctx) as u64;
    let mut fp = CacheSpec::FullF32.build(shape.clone())?;
    let mut p = Progress::new("f32 reference", processed, "tokens");
    let t = Instant::now();
    let reference = build_reference(&model, fp.as_mut(), &windows, &spec, &mut |n| p.inc(n))?;
    p.finish();
    let fp_s = t.elapsed().as_secs_f64();
    let r = &reference.metrics;
    println!(
        "f32: ppl {:.4} +/- {:.4} over {} scored tokens ({} windows of {}), {:.1} s, {:.0} tokens/s",
        r.ppl, r.ppl_stderr, r.scored_tokens, a.windows, a.ctx, fp_s, r.tokens_per_s
    );
    if cache_spec != CacheSpec::FullF32 {
        let mut cache: Box<dyn KvCache> = cache_spec.build(shape)?;
        let mut p = Progress::new(cache.describe(), processed, "tokens");
        let m = evaluate_text(&model, cache.as_mut(), &windows, &reference, &mut |n| p.inc(n))?;
        p.finish();
        println!(
            "{}: ppl {:.4} +/- {:.4}{}, kv {:.1} KiB at {} tokens ({:.3} bits/element), {:.1} s, {:.0} tokens/s ({:.2}x the f32 time)",
            cache.describe(),
            m.ppl,
            m.ppl_stderr,
            if a.kl { format!(", KL mean {:.5} p99 {:.4}, top-1 {:.4}", m.kl_mean, m.kl_p99, m.top1) } else { String::new() },
            m.kv_bytes as f64 / 1024.0,
            a.ctx,
            m.bits_per_element,
            m.wall_s,
            m.tokens_per_s,
            m.wall_s / fp_s
        );
    }
    Ok(())
}

/// Arguments of `adaquant eval-tasks`.
#[derive(Clone, Debug, Args)]
pub struct TasksArgs {
    /// Model [default: the SmolLM2-135M-Instruct GGUF in the data folder].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// KV cache: f32, f16, a shorthand such as k4v2, or a JSON spec file.
    #[arg(long, default_value = "f32")]
    pub cache: String,
    /// Tasks to run: hellaswag, arc, lambada, passkey.
    #[arg(long, value_delimiter = ',', default_value = "hellaswag,arc,lambada")]
    pub tasks: Vec<String>,
    /// Items per task (0 = all).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    /// Passkey prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    pub passkey: Vec<usize>,
    /// Passkey needle depths.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    pub passkey_depths: Vec<f64>,
}

/// `adaquant eval-tasks`.
pub fn eval_tasks(a: &TasksArgs) -> anyhow::Result<()> {
    let mut sel = TaskSelection::default();
    for t in &a.tasks {
        match t.trim() {
            "hellaswag" => sel.hellaswag = Some(a.limit),
            "arc" | "arc_easy" | "arc-easy" => sel.arc_easy = Some(a.limit),
            "lambada" => sel.lambada = Some(a.limit),
            "passkey" => {
                sel.passkey = Some(PasskeySpec {
                    lengths: a.passkey.clone(),
                    depths: a.passkey_depths.clone(),
                    trials: 1,
                    seed: 7,
                })
            }
            other => bail!("unknown task '{other}': use hellaswag, arc, lambada, passkey"),
        }
    }
    let cache_spec = parse_cache(&a.cache)?;
    let model = load_model(&a.model.clone().unwrap_or_else(paths::default_model))?;
    let max_seq = sel.passkey.as_ref().and_then(|p| p.lengths.iter().max().copied()).unwrap_or(0).max(2048) + 64;
    let mut cache = cache_spec.build(model.cache_shape(max_seq))?;
    let plan_paths = TaskData {
        hellaswag: if sel.hellaswag.is_some() { crate::data::load_hellaswag(&paths::hellaswag())? } else { Vec::new() },
        arc: if sel.arc_easy.is_some() { crate::data::load_arc(&paths::arc_easy())? } else { Vec::new() },
        lambada: if sel.lambada.is_some() { crate::data::load_lambada(&paths::lambada())? } else { Vec::new() },
    };
    let label = cache.describe();
    let results = run_tasks(&model, cache.as_mut(), &sel, &plan_paths, &label)?;
    for (name, r) in &results {
        println!(
            "{label}: {name} accuracy {:.4} ({}/{}), {} tokens in {:.1} s",
            r.accuracy, r.correct, r.total, r.tokens, r.wall_s
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    #[test]
    fn default_points_are_full_paper_pairs_and_budget() {
        let a = Cli::parse_from(["x"]).sweep;
        let names: Vec<String> = parse_points(&a).unwrap().iter().map(PointSpec::name).collect();
        assert_eq!(names, ["full", "K8V8", "K4V4", "K4V2", "K2V4", "K2V2", "budget4 weight_fro"]);
    }

    #[test]
    fn grids_multiply_out_and_bad_flags_are_errors() {
        let a = Cli::parse_from([
            "x",
            "--k-bits",
            "1.58,2,16",
            "--v-bits",
            "2,4",
            "--k-axis",
            "per-token,per-channel",
            "--no-budget",
        ])
        .sweep;
        let pts = parse_points(&a).unwrap();
        assert_eq!(pts.len(), 1 + 3 * 2 * 2);
        let keys: std::collections::HashSet<String> = pts.iter().map(PointSpec::config_key).collect();
        assert_eq!(keys.len(), pts.len());
        assert!(pts.iter().any(|p| p.name() == "K16V4" && p.k_axis == GroupAxis::PerChannel));
        let bad = Cli::parse_from(["x", "--k-bits", "4"]).sweep;
        assert!(parse_points(&bad).is_err());
        let bad = Cli::parse_from(["x", "--pairs", "4:7"]).sweep;
        assert!(parse_points(&bad).is_err());
        let ok = Cli::parse_from(["x", "--pairs", "k4v2,8:4", "--sensitivity", "weight_spec,kl"]).sweep;
        let names: Vec<String> = parse_points(&ok).unwrap().iter().map(PointSpec::name).collect();
        assert_eq!(names, ["full", "K4V2", "K8V4", "budget4 weight_spec", "budget4 kl"]);
        assert!(Cli::try_parse_from(["x", "--k-axis", "diagonal"]).is_err());
    }
}
