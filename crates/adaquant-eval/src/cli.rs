//! Command-line arguments of `adaquant sweep`, `adaquant ppl` and `adaquant eval-tasks`, and what they run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use adaquant_cache::{CacheShape, CacheSpec, KvCache, Quantizer};
use adaquant_kernels::GroupAxis;
use adaquant_model::{paths, Model, ModelConfig};
use anyhow::{anyhow, bail, Context};
use clap::Args;

use crate::metrics::{build_reference, evaluate_text, TextEvalSpec};
use crate::progress::Progress;
use crate::report::{markdown_table, write_report};
use crate::results::merge_dirs;
use crate::sweep::{
    git_revision, parse_pin, parse_side_bits, run_sweep, run_tasks, sha256_file, validate_points, PointSpec,
    PolicySpec, SensSource, Shard, SweepPlan, TaskData, TaskSelection,
};
use crate::tasks::PasskeySpec;

/// Windows of the default sweep: 8 x 512 tokens (2,040 scored tokens per point) keeps the default sweep of seven
/// points under ten minutes on two cores.
pub const DEFAULT_WINDOWS: usize = 8;

/// The paper's key points (K bits : V bits).
pub const PAPER_PAIRS: &str = "8:8,4:4,4:2,2:4,2:2";

/// Where the default model and texts come from, for `--help`.
pub const DATA_HELP: &str = "\
Data: the default model and texts are read from the data folder: $ADAQUANT_DATA when set, else ./data, else a \
data/ folder beside the adaquant executable (or up to three folders above it, which finds the repository's data/ \
from target/release/). `cargo xtask fetch` fills the repository's data/.";

/// The `--cache` grammar, for `--help`.
pub const CACHE_HELP: &str = "\
Cache specifications (--cache):
  f32, f16                  full precision (f16 rounds keys and values to half precision)
  k4v2                      4-bit keys, 2-bit values; widths 1, 1.58, 2, 3, 4, 5, 6, 8, or 16 (= unquantized)
  k16v2                     keys unquantized, values 2-bit
  k4v2-g32-r64-s4-kivi      options after the widths, in any order: g<group size> (default 64),
                            r<recent tokens kept exact> (default 128), s<leading sink tokens kept exact>
                            (default 0), kivi (keys in per-channel groups of g tokens; values per token)
  my-cache.json             a JSON file, e.g. {\"kind\": \"uniform\", \"layer\": {\"k\": {\"quant\": {\"bits\": 4,
                            \"group\": 64, \"axis\": \"per_token\"}}, \"v\": \"full\"}, \"residual\": 32}, or per layer
                            {\"kind\": \"quant\", \"layers\": [...], \"residual\": 128, \"sinks\": 0}
  '{\"kind\":\"full_f16\"}'     the same JSON written inline
A token is quantized only once it leaves the exact window (r) and the sinks (s): a prompt or text window shorter
than r + s is never quantized, and the commands say so.";

/// Examples of `adaquant sweep --help`.
pub const SWEEP_EXAMPLES: &str = "\
Examples:
  adaquant sweep --pairs 4:2,2:4 --windows 2 --out results/first
      two K:V splits against full precision on 2 windows of 512 tokens (about a minute)
  adaquant sweep --k-bits 2,4,8 --v-bits 2,4,8 --no-budget --out results/grid
      a 3 x 3 grid of key and value widths
  adaquant sweep --pairs 4:2 --group 32,64 --k-axis per-token,per-channel --residual 64,128
      layouts: every combination of the listed groups, key layouts and exact windows
  adaquant sweep --budget 3,4 --sensitivity weight_fro,kl
      layer-wise budget allocations from weight norms and from measured per-layer KL
  adaquant sweep --budget 3 --sensitivity weight_bias,outlier --pin 0:8,-1:8
      budgets from weight norms with key biases and from measured group ranges (outliers), first and last
      layer held at 8 bits
  adaquant sweep --k-bits 2,4 --v-bits 2,4 --dry-run
      list the points and check each against the model's shape; computes nothing
  adaquant sweep --k-bits 2,4,8 --v-bits 2,4,8 --shard 0/4 --out results/grid
      one of four slices (shard i of N; Slurm array variables are read too)
  adaquant sweep --merge results/grid results/grid-more --out results/all
      the table and plots of several folders' results files, without computing

Every point is checked against the model's shape before any forward pass; a grid with an invalid point is refused
as a whole, listing each. Rows whose exact window and sinks cover the whole text window quantize nothing and are
marked ‡ in the table. Plot files are named after the model, text and window settings they show.";

/// Examples of `adaquant ppl --help`.
pub const PPL_EXAMPLES: &str = "\
Examples:
  adaquant ppl --cache k4v2 --windows 20
      perplexity through a K4V2 cache (one pass, no f32 reference)
  adaquant ppl --cache k4v2-r64 --kl --windows 20
      also KL and top-1 agreement against the f32 cache, which then runs first (twice the time)
  adaquant ppl --cache k2v4-kivi-g32-r64 --ctx 2048 --windows 8
      KIVI layout on longer windows";

/// Examples of `adaquant eval-tasks --help`.
pub const TASKS_EXAMPLES: &str = "\
Examples:
  adaquant eval-tasks --cache k4v2-r0 --tasks hellaswag,arc --limit 100
      accuracy with every prompt token quantized (r0: no exact window)
  adaquant eval-tasks --cache k2v4 --tasks passkey --passkey 1024,4096";

/// Examples of `adaquant generate --help`.
pub const GENERATE_EXAMPLES: &str = "\
Examples:
  adaquant generate --prompt \"The capital of France is\"
  adaquant generate --chat --prompt \"What is the capital of France?\" --cache k4v2-r16-s4
      a quantized cache on a short prompt: r16 keeps only the 16 most recent tokens exact and s4 the first 4
      (attention sinks), so the rest of the prompt is quantized (with the default r128 a 37-token prompt would not be)
  adaquant generate --prompt \"$(head -c 2000 data/wikitext-2-raw/wiki.test.raw)\" --cache k2v4 --max-tokens 32

generate reports how many tokens were quantized and the bits per element of the quantized part and of the whole
cache, and warns when nothing was quantized.";

/// Examples of `adaquant analyze --help`.
pub const ANALYZE_EXAMPLES: &str = "\
Examples:
  adaquant analyze --out results/analyze
  adaquant analyze --weights-only --out results/weights
  adaquant analyze --model other.gguf --tokens 4096 --heads 0,1";

/// Arguments of `adaquant sweep`.
#[derive(Clone, Debug, Args)]
pub struct SweepArgs {
    /// Model: a .gguf file or a Hugging Face folder [default: <data>/models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// <data> = $ADAQUANT_DATA, ./data, or data/ beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text for perplexity and KL, tokenized as one string (BOS in front and first in every window for models that
    /// add BOS, as llama.cpp does) [default: <data>/wikitext-2-raw/wiki.test.raw].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Output folder: results.jsonl (one line per finished point; one sweep at a time per results file), table.md and
    /// the plots. Results files of an older adaquant are refused: pick another folder or rename the old file.
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
    /// Quantizer families: minmax, hqq (HQQ zero points: 20 iterations, p 0.7, beta 10, kappa 1.01), rot-minmax,
    /// rot-hqq (random-sign Hadamard rotation per KV head first), lloyd, rot-lloyd (Lloyd-Max levels of a unit
    /// Gaussian, one f16 scale per group; widths 1, 1.58, 2, 3, 4).
    #[arg(long, value_delimiter = ',', default_value = "minmax")]
    pub quantizer: Vec<Quantizer>,
    /// Most recent tokens kept in full precision (per-channel groups need a multiple of the group size).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub residual: Vec<usize>,
    /// Leading tokens (attention sinks) kept in full precision.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub sinks: Vec<usize>,
    /// Average bits per element of layer-wise budget allocations (the budget solver over per-layer sensitivities).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub budget: Vec<f64>,
    /// Sensitivities of the budget solver: weight_fro, weight_spec, weight_bias (computed from the model's
    /// W_K/W_V, weight_bias with their biases), kl (measured per layer), outlier (group ranges of K/V measured on
    /// the first window), or sensitivities .json files written by `adaquant analyze`.
    #[arg(long, value_delimiter = ',', default_value = "weight_fro")]
    pub sensitivity: Vec<String>,
    /// Run no budget points.
    #[arg(long)]
    pub no_budget: bool,
    /// Layers whose keys and values every budget point holds at a width, LAYER:BITS (a negative layer counts from
    /// the end), e.g. `--pin 0:8,-1:8` for the first and last layer at 8 bits; the solver spreads what is left.
    #[arg(long, value_delimiter = ',')]
    pub pin: Vec<String>,
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
    /// they are written to --out. A point recorded twice with different numbers is an error.
    #[arg(long, num_args = 1..)]
    pub merge: Vec<PathBuf>,
    /// Check every point against the model's shape (read from its header, no weights loaded), print the points
    /// with how many scored tokens per window see quantized history, and exit.
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
                policies.push(PolicySpec::Budget {
                    avg_bits: b,
                    sensitivity: s.parse::<SensSource>()?,
                    pinned: a.pin.iter().map(|p| parse_pin(p)).collect::<Result<_, _>>()?,
                });
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
        quantizer: Quantizer::MinMax,
    }];
    for &group in &a.group {
        for &k_axis in &a.k_axis {
            for &v_axis in &a.v_axis {
                for &residual in &a.residual {
                    for &sinks in &a.sinks {
                        for &quantizer in &a.quantizer {
                            for policy in &policies {
                                points.push(PointSpec {
                                    policy: policy.clone(),
                                    group,
                                    k_axis,
                                    v_axis,
                                    residual,
                                    sinks,
                                    quantizer,
                                });
                            }
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

/// The model to use: `--model` when given (it must exist), else the default model of the data folder. A missing
/// file is reported with where adaquant looked, before anything is loaded.
pub fn resolve_model(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) if p.exists() => Ok(p.to_path_buf()),
        Some(p) => bail!("--model {}: no such file or folder", p.display()),
        None => {
            let p = paths::default_model();
            if p.is_file() {
                return Ok(p);
            }
            bail!(
                "the default model {} is missing; data folders searched: {}. Run `cargo xtask fetch` in the \
                 repository, set ADAQUANT_DATA to a folder holding models/{}, or pass --model FILE.gguf",
                p.display(),
                paths::data_search(),
                paths::DEFAULT_MODEL_FILE
            )
        }
    }
}

/// The text to use: `--text` when given, else WikiText-2 in the data folder; missing files are reported with where
/// adaquant looked.
pub fn resolve_text(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) => bail!("--text {}: no such file", p.display()),
        None => {
            let p = paths::wikitext2_test();
            if p.is_file() {
                return Ok(p);
            }
            bail!(
                "the default text {} is missing; data folders searched: {}. Run `cargo xtask fetch`, set \
                 ADAQUANT_DATA, or pass --text FILE",
                p.display(),
                paths::data_search()
            )
        }
    }
}

/// Checks what can be checked about the text before the model is loaded: the window settings, that the file is
/// not empty, and that it has at least one byte per token the windows need (a token is never shorter than a byte).
pub fn check_text_before_loading(path: &Path, spec: &TextEvalSpec) -> anyhow::Result<()> {
    if spec.ctx < 4 || spec.windows == 0 {
        // The window checks of `TextEvalSpec::windows`, which come before its length check.
        spec.windows(&[])?;
    }
    let bytes = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if bytes == 0 {
        bail!("the text {} is empty; pass a --text file with some text", path.display());
    }
    let need = (spec.ctx as u64).saturating_mul(spec.windows as u64);
    if bytes < need {
        bail!(
            "the text {} has {bytes} bytes, but {} of {} tokens need at least {need} (a token is at least one \
             byte); lower --windows or --ctx, or pass a longer --text",
            path.display(),
            plural(spec.windows, "window"),
            spec.ctx
        );
    }
    Ok(())
}

/// `1 window`, `2 windows`.
pub fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The model's configuration from its header alone (no weights read), for checks before any work.
pub fn read_config(path: &Path) -> anyhow::Result<ModelConfig> {
    // The model error names the file already; no context that repeats it.
    ModelConfig::read(path).map_err(|e| anyhow!("cannot read the model's configuration: {e}"))
}

fn load_model(path: &Path) -> anyhow::Result<Model> {
    let t = Instant::now();
    let m = Model::load(path).map_err(|e| anyhow!("cannot load the model: {e}"))?;
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

/// Checks that the datasets of the selected tasks exist, before the model is loaded.
fn check_task_files(sel: &TaskSelection) -> anyhow::Result<()> {
    let wanted = [
        (sel.hellaswag.is_some(), "HellaSwag", paths::hellaswag()),
        (sel.arc_easy.is_some(), "ARC-Easy", paths::arc_easy()),
        (sel.lambada.is_some(), "LAMBADA", paths::lambada()),
    ];
    for (on, name, path) in wanted {
        if on && !path.is_file() {
            bail!(
                "{name} is missing at {}; data folders searched: {}. Run `cargo xtask fetch` or set ADAQUANT_DATA",
                path.display(),
                paths::data_search()
            );
        }
    }
    Ok(())
}

/// Checks a cache spec against the model's shape before any forward pass.
fn check_cache(spec: &CacheSpec, shape: &CacheShape) -> anyhow::Result<()> {
    if let Some(config) = spec.quant_config(shape.n_layers)? {
        config.validate(shape).context("--cache does not fit this model")?;
    }
    Ok(())
}

/// Writes the table and plots of `dir`'s records and prints the table.
fn finish_report(records: &[crate::results::PointResult], out: &Path) -> anyhow::Result<()> {
    let files = write_report(records, out)?;
    println!("\n{}", markdown_table(records));
    println!("table: {}", files.table.display());
    println!("plots ({}, listed in {}): {}", files.plots.len(), files.index.display(), out.display());
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
    // Everything that can fail is checked before the model is loaded and before any forward pass.
    let text_path = resolve_text(a.text.as_deref())?;
    check_text_before_loading(&text_path, &text)?;
    check_task_files(&tasks_from(a))?;
    let model_path = resolve_model(a.model.as_deref())?;
    let config = read_config(&model_path)?;
    let shape = config.cache_shape(a.ctx);
    validate_points(&points, &shape)?;
    let per_window = text.scored_per_window();
    if a.dry_run {
        println!(
            "{} on {}: {} of {} tokens, {} scored tokens per window; every point fits the model (head_dim {}, {} \
             layers)",
            model_path.display(),
            text_path.display(),
            plural(a.windows, "window"),
            a.ctx,
            per_window,
            shape.head_dim,
            shape.n_layers
        );
        println!("   # * {:<28} {:<18} {:<40}", "point", "quantized history", "key");
        let mut none = 0;
        for (i, p) in points.iter().enumerate() {
            let mine = shard.is_none_or(|s| s.owns(i));
            let q = p.quantized_scored_per_window(&text, shape.n_layers);
            let hist = if p.policy == PolicySpec::Full {
                "-".to_string()
            } else {
                none += usize::from(q == 0);
                format!("{q}/{per_window}{}", if q == 0 { " ‡" } else { "" })
            };
            println!("{i:4} {} {:<28} {:<18} {}", if mine { '*' } else { ' ' }, p.name(), hist, p.config_key());
        }
        if none > 0 {
            println!(
                "‡ {} quantize nothing any scored position sees (exact window and sinks cover the {}-token \
                 window); use a --residual below {} or a longer --ctx",
                plural(none, "point"),
                a.ctx,
                text.first()
            );
        }
        return Ok(());
    }
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
        text_name: text_path.file_name().map_or_else(|| "text".into(), |n| n.to_string_lossy().into_owned()),
        git_rev: git_revision(),
        weights: model.weights_mode().name().to_string(),
        attention: adaquant_kernels::attn::effective_attn_kernel().name().to_string(),
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

/// Parses a `--cache` argument with the one parser of every command and the library, [`CacheSpec::parse_arg`].
fn parse_cache(s: &str) -> anyhow::Result<CacheSpec> {
    CacheSpec::parse_arg(s).with_context(|| format!("--cache '{s}'"))
}

/// Arguments of `adaquant ppl`.
#[derive(Clone, Debug, Args)]
pub struct PplArgs {
    /// Model [default: <data>/models/SmolLM2-135M-Instruct.Q4_1.gguf, <data> = $ADAQUANT_DATA, ./data, or data/
    /// beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text [default: <data>/wikitext-2-raw/wiki.test.raw].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// KV cache: f32, f16, a shorthand such as k4v2 or k4v2-kivi-r64-s4 (16 = unquantized side), inline JSON, or a
    /// JSON spec file.
    #[arg(long, default_value = "f32")]
    pub cache: String,
    /// Window length (llama.cpp protocol: first half context, second half scored); try 2048, 4096 or 8192 too.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Number of windows.
    #[arg(long, default_value_t = 100)]
    pub windows: usize,
    /// Also compute KL and top-1 agreement against the f32 cache. The f32 reference then runs first (about twice
    /// the time); without --kl only the chosen cache runs.
    #[arg(long)]
    pub kl: bool,
    /// Reference top-K for KL (0 = exact).
    #[arg(long, default_value_t = 256)]
    pub ref_topk: usize,
}

/// `adaquant ppl`.
pub fn ppl(a: &PplArgs) -> anyhow::Result<()> {
    let cache_spec = parse_cache(&a.cache)?;
    let spec = TextEvalSpec { ctx: a.ctx, windows: a.windows, topk: a.ref_topk };
    let text_path = resolve_text(a.text.as_deref())?;
    check_text_before_loading(&text_path, &spec)?;
    let model_path = resolve_model(a.model.as_deref())?;
    let shape = read_config(&model_path)?.cache_shape(a.ctx);
    check_cache(&cache_spec, &shape)?;
    let model = load_model(&model_path)?;
    let tokens = tokenize_text(&model, &text_path, a.ctx)?;
    let windows = spec.windows(&tokens)?;
    let processed = (windows.len() * a.ctx) as u64;
    let scored = windows.len() * spec.scored_per_window();
    let first_len =
        cache_spec.quant_config(shape.n_layers)?.as_ref().and_then(crate::metrics::config_first_quantized_len);
    let quantized = windows.len() * spec.scored_with_quantized_history(first_len);
    let settings = format!("{} of {}", plural(a.windows, "window"), a.ctx);
    let mut cache: Box<dyn KvCache> = cache_spec.build(shape.clone())?;
    let label = cache.describe();
    if cache_spec != CacheSpec::FullF32 && quantized == 0 {
        eprintln!(
            "warning: {label} quantizes nothing any scored position sees: its exact window and sinks cover the \
             {}-token window, so the numbers equal the f32 cache's by construction. Use a smaller r<tokens> in \
             --cache (below {}) or a longer --ctx.",
            a.ctx,
            spec.first()
        );
    }
    let history = if cache_spec == CacheSpec::FullF32 {
        String::new()
    } else {
        format!(", quantized history {quantized}/{scored} scored tokens{}", if quantized == 0 { " (none)" } else { "" })
    };
    if !a.kl || cache_spec == CacheSpec::FullF32 {
        // One pass through the chosen cache: perplexity needs no reference (the top-1 kept is a few bytes a token).
        let one = TextEvalSpec { topk: 1, ..spec.clone() };
        let mut p = Progress::new(label.clone(), processed, "tokens");
        let m = build_reference(&model, cache.as_mut(), &windows, &one, &mut |n| p.inc(n))?.metrics;
        p.finish();
        println!(
            "{label}: ppl {:.4} +/- {:.4} over {} scored tokens ({settings}){history}, kv {:.1} KiB at {} tokens \
             ({:.3} bits/element), {:.1} s, {:.0} tokens/s",
            m.ppl,
            m.ppl_stderr,
            m.scored_tokens,
            m.kv_bytes as f64 / 1024.0,
            a.ctx,
            m.bits_per_element,
            m.wall_s,
            m.tokens_per_s
        );
        return Ok(());
    }
    let mut fp = CacheSpec::FullF32.build(shape)?;
    let mut p = Progress::new("f32 reference", processed, "tokens");
    let t = Instant::now();
    let reference = build_reference(&model, fp.as_mut(), &windows, &spec, &mut |n| p.inc(n))?;
    p.finish();
    let fp_s = t.elapsed().as_secs_f64();
    let r = &reference.metrics;
    println!(
        "f32: ppl {:.4} +/- {:.4} over {} scored tokens ({settings}), {:.1} s, {:.0} tokens/s",
        r.ppl, r.ppl_stderr, r.scored_tokens, fp_s, r.tokens_per_s
    );
    let mut p = Progress::new(label.clone(), processed, "tokens");
    let m = evaluate_text(&model, cache.as_mut(), &windows, &reference, &mut |n| p.inc(n))?;
    p.finish();
    println!(
        "{label}: ppl {:.4} +/- {:.4}, KL mean {:.5} p99 {:.4}, top-1 {:.4}{history}, kv {:.1} KiB at {} tokens \
         ({:.3} bits/element), {:.1} s, {:.0} tokens/s ({:.2}x the f32 time)",
        m.ppl,
        m.ppl_stderr,
        m.kl_mean,
        m.kl_p99,
        m.top1,
        m.kv_bytes as f64 / 1024.0,
        a.ctx,
        m.bits_per_element,
        m.wall_s,
        m.tokens_per_s,
        m.wall_s / fp_s
    );
    Ok(())
}

/// Arguments of `adaquant eval-tasks`.
#[derive(Clone, Debug, Args)]
pub struct TasksArgs {
    /// Model [default: <data>/models/SmolLM2-135M-Instruct.Q4_1.gguf, <data> = $ADAQUANT_DATA, ./data, or data/
    /// beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// KV cache: f32, f16, a shorthand such as k4v2, inline JSON, or a JSON spec file.
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
    check_task_files(&sel)?;
    let model_path = resolve_model(a.model.as_deref())?;
    let max_seq = sel.passkey.as_ref().and_then(|p| p.lengths.iter().max().copied()).unwrap_or(0).max(2048) + 64;
    check_cache(&cache_spec, &read_config(&model_path)?.cache_shape(max_seq))?;
    let model = load_model(&model_path)?;
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
    fn files_are_checked_before_the_model_loads_and_named_once() {
        let dir = std::env::temp_dir().join(format!("adaquant-cli-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.gguf");
        let e = resolve_model(Some(&missing)).unwrap_err().to_string();
        assert!(e.starts_with("--model ") && e.matches("missing.gguf").count() == 1, "{e}");
        let e = resolve_text(Some(&dir.join("absent.txt"))).unwrap_err().to_string();
        assert!(e.starts_with("--text ") && e.matches("absent.txt").count() == 1, "{e}");
        let spec = TextEvalSpec { ctx: 512, windows: 2, topk: 0 };
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        assert!(check_text_before_loading(&empty, &spec).unwrap_err().to_string().contains("is empty"));
        let short = dir.join("short.txt");
        std::fs::write(&short, "x".repeat(1000)).unwrap();
        let e = check_text_before_loading(&short, &spec).unwrap_err().to_string();
        assert!(e.contains("has 1000 bytes, but 2 windows of 512 tokens need at least 1024"), "{e}");
        let one = TextEvalSpec { windows: 1, ..spec.clone() };
        assert!(check_text_before_loading(&short, &one).is_ok());
        let e = check_text_before_loading(&short, &TextEvalSpec { windows: 0, ..spec }).unwrap_err().to_string();
        assert!(e.contains("--windows"), "{e}");
        assert_eq!((plural(1, "window"), plural(2, "window")), ("1 window".to_string(), "2 windows".to_string()));
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

    #[test]
    fn quantizers_are_a_grid_dimension() {
        let a = Cli::parse_from([
            "x",
            "--pairs",
            "4:2,2:2",
            "--quantizer",
            "minmax,hqq,rot-minmax,rot-lloyd",
            "--k-axis",
            "per-token,per-channel",
            "--no-budget",
        ])
        .sweep;
        let pts = parse_points(&a).unwrap();
        assert_eq!(pts.len(), 1 + 2 * 4 * 2);
        let keys: std::collections::HashSet<String> = pts.iter().map(PointSpec::config_key).collect();
        assert_eq!(keys.len(), pts.len());
        assert!(pts.iter().any(|p| p.name() == "K2V2 rot-lloyd" && p.k_axis == GroupAxis::PerChannel));
        assert_eq!(pts.iter().filter(|p| p.quantizer == Quantizer::Hqq).count(), 4);
        let err = Cli::try_parse_from(["x", "--quantizer", "turbo"]).err().unwrap().to_string();
        assert!(err.contains("rot-lloyd"), "{err}");
    }
}
