//! The `analyze` command: load a model, run the weight and activation studies, write the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use adaquant_cache::FullPrecisionCache;
use adaquant_kernels::Bits;
use adaquant_model::{paths, ForwardOptions, LayerHook, LayerTaps, LogitsRange, Model};
use rayon::prelude::*;

use crate::error::{AnalysisError, Result};
use crate::report::{Calibration, LayerReport, Report, Timings};
use crate::study::{
    activation_layer, weight_layer, ActivationOptions, Dims, GroupQuantizer, LayerActivations, LayerWeights,
};

/// Command-line options of `adaquant analyze` and `cargo xtask analyze`.
#[derive(clap::Args, Clone, Debug)]
pub struct AnalyzeArgs {
    /// Model: a `.gguf` file or a Hugging Face folder [default: <data>/models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// <data> = $ADAQUANT_DATA, ./data, or data/ beside the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Calibration text (plain UTF-8); its first `--tokens` tokens are run through the model [default:
    /// <data>/wikitext-2-raw/wiki.test.raw].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Number of calibration tokens.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Output folder (default `results/analyze-<model stem>-<unix time>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// KV heads to report per head, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub heads: Option<Vec<usize>>,
    /// Analyse the weights only (no forward pass).
    #[arg(long)]
    pub weights_only: bool,
    /// Analyse keys before RoPE instead of after (quantization errors always use post-RoPE keys).
    #[arg(long)]
    pub pre_rope: bool,
    /// Widths at which quantization errors are measured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1.58,2,3,4,5,6,8")]
    pub bits: Vec<Bits>,
    /// Group size of the quantization-error measurements (per-token groups; must divide head_dim).
    #[arg(long, default_value_t = 64)]
    pub group: usize,
    /// Query positions (spread over the second half of the text) for the attention-output error; 0 disables it.
    #[arg(long, default_value_t = 16)]
    pub attn_queries: usize,
    /// Tokens per forward call (smaller calls use less memory; one call is fastest).
    #[arg(long, default_value_t = 2048)]
    pub chunk: usize,
    /// Skip the plots (JSON and Markdown only).
    #[arg(long)]
    pub no_plots: bool,
}

impl Default for AnalyzeArgs {
    fn default() -> Self {
        AnalyzeArgs {
            model: None,
            text: None,
            tokens: 2048,
            out: None,
            heads: None,
            weights_only: false,
            pre_rope: false,
            bits: vec![Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4, Bits::B5, Bits::B6, Bits::B8],
            group: 64,
            attn_queries: 16,
            chunk: 2048,
            no_plots: false,
        }
    }
}

/// Collects every layer's Q, K (before and after RoPE) and V over the forward calls.
struct Capture {
    layers: Vec<LayerActivations>,
    keep_pre_rope: bool,
    keep_q: bool,
}

impl LayerHook for Capture {
    fn on_layer(&mut self, layer: usize, taps: &LayerTaps<'_>) {
        let a = &mut self.layers[layer];
        a.tokens += taps.positions.len();
        a.k.extend_from_slice(taps.k);
        a.v.extend_from_slice(taps.v);
        if self.keep_pre_rope {
            a.k_pre_rope.extend_from_slice(taps.k_pre_rope);
        }
        if self.keep_q {
            a.q.extend_from_slice(taps.q);
        }
    }
}

fn model_err(e: adaquant_model::ModelError) -> AnalysisError {
    AnalysisError::Model(e.to_string())
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// The first `n` tokens of the text file. Tokenizes a prefix first and the whole file only when the prefix is short.
pub fn calibration_tokens(model: &Model, text: &Path, n: usize) -> Result<Vec<u32>> {
    if !text.is_file() {
        return Err(AnalysisError::Missing {
            what: "calibration text".into(),
            path: text.into(),
            hint: "pass --text FILE, or run `cargo xtask fetch` for WikiText-2".into(),
        });
    }
    let raw = std::fs::read(text).map_err(|source| AnalysisError::Io { path: text.into(), source })?;
    let s = String::from_utf8(raw)
        .map_err(|e| AnalysisError::InvalidArgument(format!("{} is not UTF-8 text: {e}", text.display())))?;
    let tok = model.tokenizer();
    // llama.cpp's rule, shared with the evaluator: BOS in front only for models that add BOS.
    let add_bos = adaquant_model::perplexity::window_bos(tok).is_some();
    // English text averages about 4-5 bytes per token; 16 leaves a wide margin.
    let mut cut = (n.saturating_mul(16)).min(s.len());
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    let mut ids = tok.encode(&s[..cut], add_bos).map_err(model_err)?;
    if ids.len() < n && cut < s.len() {
        ids = tok.encode(&s, add_bos).map_err(model_err)?;
    }
    if ids.len() < n {
        return Err(AnalysisError::TextTooShort { path: text.into(), wanted: n, got: ids.len() });
    }
    ids.truncate(n);
    Ok(ids)
}

/// Runs the analysis and writes the report; returns the output folder (the caller prints it).
pub fn run(args: &AnalyzeArgs) -> anyhow::Result<PathBuf> {
    Ok(run_typed(args)?)
}

/// [`run`] with the crate's error type.
pub fn run_typed(args: &AnalyzeArgs) -> Result<PathBuf> {
    let t0 = Instant::now();
    // Defaults are resolved now, at run time, from the data folder (see `adaquant_model::paths`).
    let searched = || format!("data folders searched: {}; ", paths::data_search());
    let model_path = args.model.clone().unwrap_or_else(paths::default_model);
    let text_path = args.text.clone().unwrap_or_else(paths::wikitext2_test);
    if !model_path.exists() {
        return Err(AnalysisError::Missing {
            what: "model".into(),
            path: model_path,
            hint: format!(
                "{}pass --model FILE.gguf (or a Hugging Face folder), or run `cargo xtask fetch`",
                if args.model.is_none() { searched() } else { String::new() }
            ),
        });
    }
    if !args.weights_only && !text_path.is_file() {
        // Checked before the model is loaded.
        return Err(AnalysisError::Missing {
            what: "calibration text".into(),
            path: text_path,
            hint: format!(
                "{}pass --text FILE, or run `cargo xtask fetch` for WikiText-2",
                if args.text.is_none() { searched() } else { String::new() }
            ),
        });
    }
    if !args.weights_only {
        if args.tokens < 2 {
            return Err(AnalysisError::InvalidArgument(format!("--tokens {} is too few; use at least 2", args.tokens)));
        }
        if args.chunk == 0 {
            return Err(AnalysisError::InvalidArgument("--chunk must be positive".into()));
        }
    }
    eprintln!("analyze: loading {}", model_path.display());
    let model = Model::load(&model_path).map_err(model_err)?;
    let c = &model.config;
    let dims = Dims {
        n_layers: c.n_layers,
        n_q_heads: c.n_q_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        hidden: c.hidden,
    };
    dims.validate()?;
    if let Some(h) = args.heads.as_ref().and_then(|hs| hs.iter().find(|&&h| h >= dims.n_kv_heads)) {
        return Err(AnalysisError::InvalidArgument(format!(
            "--heads names KV head {h}, but the model has {} KV heads (0..{})",
            dims.n_kv_heads,
            dims.n_kv_heads - 1
        )));
    }
    if !args.weights_only && (args.group == 0 || !dims.head_dim.is_multiple_of(args.group)) {
        return Err(AnalysisError::InvalidArgument(format!(
            "--group {} must divide head_dim = {}",
            args.group, dims.head_dim
        )));
    }
    let out = args.out.clone().unwrap_or_else(|| default_out(&model_path));
    let mut timings = Timings { load_s: secs(t0), ..Timings::default() };

    let t = Instant::now();
    eprintln!("analyze: weights of {} layers", dims.n_layers);
    let weights = (0..dims.n_layers)
        .into_par_iter()
        .map(|l| {
            let w = model.layer_weights(l);
            weight_layer(l, &LayerWeights { wq: w.wq, wk: w.wk, wv: w.wv, wo: w.wo }, &dims)
        })
        .collect::<Result<Vec<_>>>()?;
    timings.weights_s = secs(t);

    let mut calibration = None;
    let mut activations: Vec<Option<crate::study::ActivationLayer>> = vec![None; dims.n_layers];
    if !args.weights_only {
        let t = Instant::now();
        let ids = calibration_tokens(&model, &text_path, args.tokens)?;
        let mut cache =
            FullPrecisionCache::new(model.cache_shape(ids.len())).map_err(|e| AnalysisError::Model(e.to_string()))?;
        let mut cap = Capture {
            layers: vec![LayerActivations::default(); dims.n_layers],
            keep_pre_rope: args.pre_rope,
            keep_q: args.attn_queries > 0,
        };
        for (i, chunk) in ids.chunks(args.chunk).enumerate() {
            eprintln!("analyze: forward tokens {}..{} of {}", i * args.chunk, i * args.chunk + chunk.len(), ids.len());
            let mut opts = ForwardOptions::with_hook(LogitsRange::None, &mut cap);
            model.forward(chunk, &mut cache, &mut opts).map_err(model_err)?;
        }
        drop(cache);
        timings.forward_s = secs(t);

        let t = Instant::now();
        let opts = ActivationOptions {
            pre_rope: args.pre_rope,
            bits: args.bits.clone(),
            attn_queries: args.attn_queries,
            softmax_scale: model.config.attn_scale,
            window: None,
        };
        let quantizer = GroupQuantizer { group: args.group };
        let done = AtomicUsize::new(0);
        let results = cap
            .layers
            .par_iter()
            .enumerate()
            .map(|(l, a)| {
                // A local layer's queries see only its window.
                let opts = ActivationOptions { window: model.config.layer_window(l), ..opts.clone() };
                let r = activation_layer(l, a, &dims, &opts, &quantizer);
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                eprintln!("analyze: activations of layer {l} done ({d}/{})", dims.n_layers);
                r
            })
            .collect::<Result<Vec<_>>>()?;
        activations = results.into_iter().map(Some).collect();
        timings.activations_s = secs(t);
        calibration = Some(Calibration {
            text: text_path.clone(),
            tokens: ids.len(),
            pre_rope: args.pre_rope,
            group: args.group,
            attn_queries: args.attn_queries,
        });
    }

    let mut layers: Vec<LayerReport> = weights
        .into_iter()
        .zip(activations)
        .enumerate()
        .map(|(layer, (weights, activations))| LayerReport { layer, weights, activations })
        .collect();
    if let Some(keep) = &args.heads {
        for l in &mut layers {
            l.keep_heads(keep);
        }
    }
    timings.total_s = secs(t0);
    let mut report = Report::new(model_path, dims, calibration, layers, timings);
    report.windows = (0..model.config.n_layers).map(|l| model.config.layer_window(l)).collect();
    if !report.windows.iter().any(Option::is_some) {
        report.windows.clear();
    }
    eprintln!("analyze: writing {}", out.display());
    if args.no_plots {
        report.write_data(&out)?;
    } else {
        report.write(&out)?;
    }
    for c in &report.claims {
        eprintln!("analyze: ||K|| > ||V|| ({}): {}", c.norm, c.sentence());
    }
    Ok(out)
}

/// `results/analyze-<model stem>-<unix seconds>`.
pub fn default_out(model: &Path) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("results").join(format!("analyze-{stem}-{now}"))
}
