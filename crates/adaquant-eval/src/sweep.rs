//! The sweep runner: a grid of cache configurations evaluated against one shared full-precision reference.
//!
//! A sweep is a list of [`PointSpec`]s (fixed K/V splits, budget-solver allocations, full precision) and one set of
//! evaluation settings. Each point's key joins its configuration (a sensitivity file by its content) with a hash of
//! everything else that changes a number: the results version, the model's and the text's sha256, the text windows,
//! the reference's top-k and the tasks (item counts, datasets' sha256, passkey lengths, depths, trials and seed).
//! A rerun in the same folder skips what is recorded; a rerun with another model, text or setting runs every point
//! again and never reports old numbers as new.
//! Points are ordered deterministically and shard `i` of `N` runs the points whose index is `i` modulo `N`; every
//! shard computes the (cheap, one point's worth) reference itself and writes its own results file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use adaquant_cache::alloc::{BitBudget, Sensitivities};
use adaquant_cache::config::{CacheSpec, LayerPrecision, Precision, QuantCacheConfig};
use adaquant_cache::{CacheShape, KvCache, Quantizer};
use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};
use crate::lm::{LanguageModel, WeightNorm};
use crate::metrics::{build_reference, evaluate_text, Reference, TextEvalSpec};
use crate::progress::Progress;
use crate::results::{PointResult, ResultsFile, RESULTS_VERSION};
use crate::tasks::{self, PasskeySpec, TaskResult};

/// Width of one side: a packed width, or `None` for unquantized (written 16).
pub type SideBits = Option<Bits>;

/// Parses `16` as unquantized, anything else as a packed width.
pub fn parse_side_bits(s: &str) -> Result<SideBits> {
    let t = s.trim();
    if t == "16" || t.eq_ignore_ascii_case("full") {
        return Ok(None);
    }
    t.parse::<Bits>()
        .map(Some)
        .map_err(|e| EvalError::BadRequest(format!("bit width '{t}': {e} (or 16 for unquantized)")))
}

fn side_name(b: SideBits) -> &'static str {
    b.map_or("16", |b| b.name())
}

/// Where a budget point's per-layer sensitivities come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SensSource {
    /// Frobenius norms of W_K and W_V, computed from the model's weights.
    WeightFro,
    /// Spectral norms of W_K and W_V, computed from the model's weights.
    WeightSpec,
    /// A `sensitivities.json` file (`{"k": [...], "v": [...], "kind": ...}`) as `adaquant analyze` writes.
    File(PathBuf),
    /// Measured: KL divergence when only one layer's keys (or values) are quantized to 2 bits.
    Kl,
    /// Frobenius norms of W_K and W_V with their biases, `sqrt(||W||_F^2 + ||b||^2)`: the RMS key (value) norm
    /// that unit-variance inputs give, so a large key bias (Qwen2's first and last layers) counts; equal to
    /// `weight_fro` for models without biases.
    WeightBias,
    /// Measured outlier size: on the first window, `sqrt(sum over groups of G * R^2 / 12)` of the layer's keys
    /// (values), `R` being a group's range (max - min) in this point's layout. Outliers set `R`, and this is
    /// the min-max error model's `s`, so the solver predicts the error of each width from the measured ranges.
    Outlier,
}

impl SensSource {
    /// Short name used in keys and tables.
    pub fn name(&self) -> String {
        match self {
            SensSource::WeightFro => "weight_fro".into(),
            SensSource::WeightSpec => "weight_spec".into(),
            SensSource::Kl => "kl".into(),
            SensSource::WeightBias => "weight_bias".into(),
            SensSource::Outlier => "outlier".into(),
            SensSource::File(p) => {
                let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("file");
                let parent = p.parent().and_then(|d| d.file_name()).and_then(|s| s.to_str()).unwrap_or("");
                if parent.is_empty() {
                    format!("file:{stem}")
                } else {
                    format!("file:{parent}/{stem}")
                }
            }
        }
    }
}

impl FromStr for SensSource {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<SensSource> {
        Ok(match s.trim() {
            "weight_fro" | "fro" => SensSource::WeightFro,
            "weight_spec" | "spec" => SensSource::WeightSpec,
            "kl" => SensSource::Kl,
            "weight_bias" | "bias" => SensSource::WeightBias,
            "outlier" => SensSource::Outlier,
            p if p.ends_with(".json") => SensSource::File(PathBuf::from(p)),
            other => {
                return Err(EvalError::BadRequest(format!(
                    "sensitivity '{other}': use weight_fro, weight_spec, weight_bias, kl, outlier, or a sensitivities \
                     .json file from `adaquant analyze`"
                )))
            }
        })
    }
}

/// How a point chooses each layer's precision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PolicySpec {
    /// The full-precision (f32) cache.
    Full,
    /// The same key and value widths on every layer.
    Fixed { k: SideBits, v: SideBits },
    /// The budget solver over per-layer sensitivities, at `avg_bits` bits per element on average, with `pinned`
    /// layers' keys and values held at a width (a negative layer counts from the end: -1 is the last).
    Budget {
        avg_bits: f64,
        sensitivity: SensSource,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pinned: Vec<(i64, Bits)>,
    },
}

/// `0:8,-1:8` for pins, as `--pin` takes them.
pub fn pins_name(pinned: &[(i64, Bits)]) -> String {
    pinned.iter().map(|(l, b)| format!("{l}:{}", b.name())).collect::<Vec<_>>().join(",")
}

/// Parses `--pin` entries (`LAYER:BITS`, a negative layer counting from the end).
pub fn parse_pin(s: &str) -> Result<(i64, Bits)> {
    let bad = || EvalError::BadRequest(format!("pin '{s}': write LAYER:BITS, e.g. 0:8 or -1:8 for the last layer"));
    let (l, b) = s.trim().split_once(':').ok_or_else(bad)?;
    let layer = l.trim().parse::<i64>().map_err(|_| bad())?;
    let bits = b
        .trim()
        .parse::<f64>()
        .map_err(|_| bad())
        .and_then(|x| Bits::from_f64(x).map_err(|e| EvalError::BadRequest(format!("pin '{s}': {e}"))))?;
    Ok((layer, bits))
}

/// The layer a pin names in a model of `n_layers` layers, or why it names none.
fn pin_layer(layer: i64, n_layers: usize) -> std::result::Result<usize, String> {
    let n = n_layers as i64;
    let l = if layer < 0 { n + layer } else { layer };
    if (0..n).contains(&l) {
        Ok(l as usize)
    } else {
        Err(format!("pinned layer {layer} does not exist (the model has {n_layers} layers: 0..{} or -1..-{n})", n - 1))
    }
}

/// One sweep point: a policy and the quantization layout shared by its quantized layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointSpec {
    pub policy: PolicySpec,
    pub group: usize,
    pub k_axis: GroupAxis,
    pub v_axis: GroupAxis,
    pub residual: usize,
    pub sinks: usize,
    /// Quantizer family of every quantized side (zero point, levels, rotation); min-max when absent.
    #[serde(default)]
    pub quantizer: Quantizer,
}

fn axis_short(a: GroupAxis) -> &'static str {
    match a {
        GroupAxis::PerToken => "tok",
        GroupAxis::PerChannel => "chan",
    }
}

impl PointSpec {
    /// Short display name: `full`, `K4V2`, `budget4 weight_fro`, with the quantizer appended when it is not
    /// min-max (`K4V2 hqq`).
    pub fn name(&self) -> String {
        let base = match &self.policy {
            PolicySpec::Full => return "full".into(),
            PolicySpec::Fixed { k, v } => format!("K{}V{}", side_name(*k), side_name(*v)),
            PolicySpec::Budget { avg_bits, sensitivity, pinned } if pinned.is_empty() => {
                format!("budget{avg_bits} {}", sensitivity.name())
            }
            PolicySpec::Budget { avg_bits, sensitivity, pinned } => {
                format!("budget{avg_bits} {} pin{}", sensitivity.name(), pins_name(pinned))
            }
        };
        match self.quantizer {
            Quantizer::MinMax => base,
            q => format!("{base} {q}"),
        }
    }

    /// The layout part of the key: group, axes, exact window and sinks, then `|q<quantizer>` unless the quantizer
    /// is min-max (so keys recorded before quantizers were selectable still match).
    pub fn layout_key(&self) -> String {
        let mut key = format!(
            "g{}|k{}|v{}|r{}|s{}",
            self.group,
            axis_short(self.k_axis),
            axis_short(self.v_axis),
            self.residual,
            self.sinks
        );
        if self.quantizer != Quantizer::MinMax {
            key.push_str(&format!("|q{}", self.quantizer));
        }
        key
    }

    /// The configuration part of the key (layout included, so grids over layouts stay distinct).
    pub fn config_key(&self) -> String {
        let layout = self.layout_key();
        match &self.policy {
            PolicySpec::Full => "full".into(),
            PolicySpec::Fixed { k, v } => format!("fixed|K{}|V{}|{layout}", side_name(*k), side_name(*v)),
            PolicySpec::Budget { avg_bits, sensitivity, pinned } if pinned.is_empty() => {
                format!("budget|{avg_bits}|{}|{layout}", sensitivity.name())
            }
            PolicySpec::Budget { avg_bits, sensitivity, pinned } => {
                format!("budget|{avg_bits}|{}|pin{}|{layout}", sensitivity.name(), pins_name(pinned))
            }
        }
    }

    fn quant_spec(&self, bits: Bits, axis: GroupAxis) -> QuantSpec {
        self.quantizer.apply(QuantSpec::new(bits, self.group, axis))
    }

    fn precision(&self, bits: SideBits, axis: GroupAxis) -> Precision {
        bits.map_or(Precision::Full, |b| Precision::Quant(self.quant_spec(b, axis)))
    }

    /// The cache spec of a fixed or full point; budget points need their allocation ([`Self::cache_spec_for`]).
    pub fn layers_fixed(&self, n_layers: usize) -> Option<Vec<LayerPrecision>> {
        match &self.policy {
            PolicySpec::Full => None,
            PolicySpec::Fixed { k, v } => {
                Some(vec![
                    LayerPrecision::new(self.precision(*k, self.k_axis), self.precision(*v, self.v_axis));
                    n_layers
                ])
            }
            PolicySpec::Budget { .. } => None,
        }
    }

    /// The cache spec for given per-layer precisions (`None`: the full-precision cache).
    pub fn cache_spec_for(&self, layers: Option<Vec<LayerPrecision>>) -> CacheSpec {
        match layers {
            None => CacheSpec::FullF32,
            Some(layers) => CacheSpec::Quant(QuantCacheConfig { layers, residual: self.residual, sinks: self.sinks }),
        }
    }
}

impl PointSpec {
    /// The layout's cache config on `n_layers` layers: the fixed split's precisions, or for a budget point 4-bit
    /// placeholders with its groups and axes (the solver changes only the widths, which no shape check depends on).
    /// `None` for the full-precision point.
    pub fn layout_config(&self, n_layers: usize) -> Option<QuantCacheConfig> {
        let layers = match &self.policy {
            PolicySpec::Full => return None,
            PolicySpec::Fixed { .. } => self.layers_fixed(n_layers)?,
            PolicySpec::Budget { .. } => vec![
                LayerPrecision::new(
                    Precision::Quant(self.quant_spec(Bits::B4, self.k_axis)),
                    Precision::Quant(self.quant_spec(Bits::B4, self.v_axis)),
                );
                n_layers
            ],
        };
        Some(QuantCacheConfig { layers, residual: self.residual, sinks: self.sinks })
    }

    /// Why this point cannot run on a model of this shape, or `None` when it can: groups that do not divide
    /// head_dim, per-channel groups that do not divide the exact window, a missing sensitivities file.
    pub fn check(&self, shape: &CacheShape) -> Option<String> {
        if let Some(config) = self.layout_config(shape.n_layers) {
            if let Err(e) = config.validate(shape) {
                return Some(e.to_string());
            }
        }
        if let PolicySpec::Budget { pinned, .. } = &self.policy {
            for &(l, _) in pinned {
                if let Err(why) = pin_layer(l, shape.n_layers) {
                    return Some(why);
                }
            }
        }
        if let PolicySpec::Budget { sensitivity: SensSource::File(p), .. } = &self.policy {
            if !p.is_file() {
                return Some(format!(
                    "sensitivities file {} not found (write one with `adaquant analyze`)",
                    p.display()
                ));
            }
        }
        None
    }

    /// Scored tokens per window of `text` whose history holds a quantized token (see
    /// [`TextEvalSpec::scored_with_quantized_history`]); 0 for the full-precision point.
    pub fn quantized_scored_per_window(&self, text: &TextEvalSpec, n_layers: usize) -> usize {
        text.scored_with_quantized_history(
            self.layout_config(n_layers).as_ref().and_then(crate::metrics::config_first_quantized_len),
        )
    }

    /// A short description of the layout for messages: `g64 tok/chan r128 s4`.
    pub fn layout_name(&self) -> String {
        let mut s =
            format!("g{} {}/{} r{}", self.group, axis_short(self.k_axis), axis_short(self.v_axis), self.residual);
        if self.sinks > 0 {
            s.push_str(&format!(" s{}", self.sinks));
        }
        s
    }
}

/// Checks every point against the model's shape before any work; an error lists each invalid point and why, so
/// one run fixes the whole grid.
pub fn validate_points(points: &[PointSpec], shape: &CacheShape) -> Result<()> {
    let bad: Vec<String> = points
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.check(shape).map(|why| format!("  point {i} {} ({}): {why}", p.name(), p.layout_name())))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(EvalError::BadRequest(format!(
        "{} of {} points cannot run on this model (head_dim {}, {} layers, {} KV heads); nothing was computed. \
         Drop or fix them (--group, --residual, --k-axis/--v-axis, --sensitivity):\n{}",
        bad.len(),
        points.len(),
        shape.head_dim,
        shape.n_layers,
        shape.n_kv_heads,
        bad.join("\n")
    )))
}

/// Rounds an average of bit widths to 9 decimals, so `1.58` averaged over layers is written `1.58`, not
/// `1.579999999999999`.
pub fn round_bits(b: f64) -> f64 {
    (b * 1e9).round() / 1e9
}

impl fmt::Display for PointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.config_key())
    }
}

/// A task whose dataset is read from a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Hellaswag,
    ArcEasy,
    Lambada,
}

/// Which tasks run at every point, with their item limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSelection {
    pub hellaswag: Option<usize>,
    pub arc_easy: Option<usize>,
    pub lambada: Option<usize>,
    pub passkey: Option<PasskeySpec>,
}

impl TaskSelection {
    /// Every task setting that changes a number: item counts, the datasets' sha256 (through `sha`, called with
    /// the dataset path of each selected task), passkey lengths, depth values, trials and seed.
    pub fn describe(&self, sha: &mut dyn FnMut(Task) -> Result<String>) -> Result<String> {
        let mut parts = Vec::new();
        let items = |n: usize| if n == 0 { "all".to_string() } else { n.to_string() };
        if let Some(n) = self.hellaswag {
            parts.push(format!("hellaswag {} of {}", items(n), sha(Task::Hellaswag)?));
        }
        if let Some(n) = self.arc_easy {
            parts.push(format!("arc_easy {} of {}", items(n), sha(Task::ArcEasy)?));
        }
        if let Some(n) = self.lambada {
            parts.push(format!("lambada {} of {}", items(n), sha(Task::Lambada)?));
        }
        if let Some(p) = &self.passkey {
            let join = |xs: Vec<String>| xs.join("+");
            parts.push(format!(
                "passkey lengths {} depths {} trials {} seed {}",
                join(p.lengths.iter().map(|l| l.to_string()).collect()),
                join(p.depths.iter().map(|d| format!("{d:?}")).collect()),
                p.trials,
                p.seed
            ));
        }
        Ok(if parts.is_empty() { "none".into() } else { parts.join("; ") })
    }

    /// Whether no task is selected.
    pub fn is_empty(&self) -> bool {
        self.hellaswag.is_none() && self.arc_easy.is_none() && self.lambada.is_none() && self.passkey.is_none()
    }
}

/// A shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `i/N` (0-based `i`).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || EvalError::BadRequest(format!("--shard '{s}': expected i/N with 0 <= i < N, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard of a Slurm job array (`SLURM_ARRAY_TASK_ID` relative to `SLURM_ARRAY_TASK_MIN`, out of
    /// `SLURM_ARRAY_TASK_COUNT`), read through `get` so tests need not touch the environment.
    pub fn from_slurm(get: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let (Some(id), Some(count)) = (get("SLURM_ARRAY_TASK_ID"), get("SLURM_ARRAY_TASK_COUNT")) else {
            return Ok(None);
        };
        let min = get("SLURM_ARRAY_TASK_MIN").unwrap_or_else(|| "0".into());
        let parse = |name: &str, v: &str| {
            v.trim().parse::<usize>().map_err(|_| EvalError::BadRequest(format!("{name}='{v}' is not a number")))
        };
        let (id, count, min) = (
            parse("SLURM_ARRAY_TASK_ID", &id)?,
            parse("SLURM_ARRAY_TASK_COUNT", &count)?,
            parse("SLURM_ARRAY_TASK_MIN", &min)?,
        );
        let index = id.checked_sub(min).ok_or_else(|| {
            EvalError::BadRequest(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))
        })?;
        Shard::parse(&format!("{index}/{count}")).map(Some)
    }

    /// Whether the point at `index` of the deterministic order belongs to this shard.
    pub fn owns(&self, index: usize) -> bool {
        index % self.count == self.index
    }

    /// File name of this shard's results.
    pub fn file_name(&self) -> String {
        format!("results.shard-{}-of-{}.jsonl", self.index, self.count)
    }
}

/// Everything a sweep needs besides the model.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    pub points: Vec<PointSpec>,
    pub text: TextEvalSpec,
    pub tasks: TaskSelection,
    pub out: PathBuf,
    pub shard: Option<Shard>,
    /// Identity of the model and data, recorded in every line.
    pub model_name: String,
    pub model_sha256: String,
    pub data_sha256: String,
    /// File name of the text, recorded in every line and named in tables and plots.
    pub text_name: String,
    pub git_rev: String,
    /// How the model's linear layers computed: `f32` (dequantized weights) or `packed` (GGUF blocks with 8-bit
    /// activations). Anything but `f32` is part of the settings, so results of the two paths never share a key
    /// (and f32 results keep the keys they had before the packed path existed).
    pub weights: String,
    /// The attention kernels in force (`adaquant_kernels::attn::effective_attn_kernel`): `exact` (f32) or `int`
    /// (integer products for per-token groups). Anything but `exact` is part of the settings, so results of the
    /// two never share a key (and exact results keep the keys they had before the integer kernels existed).
    pub attention: String,
    /// Task datasets, read when the corresponding task is selected.
    pub hellaswag_path: PathBuf,
    pub arc_path: PathBuf,
    pub lambada_path: PathBuf,
}

impl SweepPlan {
    /// The identity of this sweep's results: the settings behind every number and each point's key. Reads (and
    /// hashes) the task datasets and sensitivity files the plan names.
    pub fn identity(&self) -> Result<SweepIdentity> {
        let tasks = self.tasks.describe(&mut |t| {
            sha256_file(match t {
                Task::Hellaswag => &self.hellaswag_path,
                Task::ArcEasy => &self.arc_path,
                Task::Lambada => &self.lambada_path,
            })
        })?;
        let mut settings = format!(
            "results v{RESULTS_VERSION}; model sha256 {}; text sha256 {}; {} windows of {} tokens; reference top-{}; \
             tasks: {tasks}",
            self.model_sha256, self.data_sha256, self.text.windows, self.text.ctx, self.text.topk
        );
        if self.weights != "f32" {
            settings.push_str(&format!("; weights {}", self.weights));
        }
        if self.attention != "exact" {
            settings.push_str(&format!("; attention {}", self.attention));
        }
        let settings_id = short_sha(settings.as_bytes());
        let mut keys = Vec::with_capacity(self.points.len());
        let mut file_sha: BTreeMap<PathBuf, String> = BTreeMap::new();
        for p in &self.points {
            let mut config = p.config_key();
            if let PolicySpec::Budget { sensitivity: SensSource::File(path), .. } = &p.policy {
                let sha = match file_sha.get(path) {
                    Some(s) => s.clone(),
                    None => {
                        let s = sha256_file(path)?;
                        file_sha.insert(path.clone(), s.clone());
                        s
                    }
                };
                config.push_str(&format!("|sens sha256 {}", &sha[..16]));
            }
            keys.push(format!("{config}|{settings_id}"));
        }
        Ok(SweepIdentity { settings, settings_id, keys })
    }

    /// The results file this run appends to.
    pub fn results_path(&self) -> PathBuf {
        self.out.join(self.shard.map_or_else(|| "results.jsonl".to_string(), |s| s.file_name()))
    }
}

/// What identifies a sweep's results: see [`SweepPlan::identity`].
#[derive(Clone, Debug, PartialEq)]
pub struct SweepIdentity {
    /// Every evaluation setting behind the numbers, in words (recorded in each line as `settings`).
    pub settings: String,
    /// The first 16 hex digits of the settings' sha256, the last part of every key.
    pub settings_id: String,
    /// The key of each point of the plan, in the plan's order.
    pub keys: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 16 hex digits of the sha256 of `bytes`.
pub fn short_sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))[..16].to_string()
}

/// Hex sha256 of a file; of a folder (a Hugging Face model), the sha256 over its files' relative paths and
/// contents' sha256, in name order.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| EvalError::io(path, e))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).map_err(|e| EvalError::io(&dir, e))? {
                let p = e.map_err(|e| EvalError::io(&dir, e))?.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files.sort();
        let mut h = Sha256::new();
        for f in files {
            let rel = f.strip_prefix(path).unwrap_or(&f).to_string_lossy().into_owned();
            h.update(format!("{rel}\0{}\n", sha256_file(&f)?).as_bytes());
        }
        return Ok(hex(&h.finalize()));
    }
    let mut f = std::fs::File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| EvalError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// `git rev-parse HEAD` of the working directory's repository, or `unknown`.
pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

/// Reads a `sensitivities.json` (`{"k": [...], "v": [...], "kind": ...}`) or the authors' `{"w_k", "w_v"}` shape.
pub fn load_sensitivities(path: &Path) -> Result<Sensitivities> {
    #[derive(Deserialize)]
    struct File {
        k: Vec<f64>,
        v: Vec<f64>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let bad = |msg: String| EvalError::Malformed { path: path.display().to_string(), line: 1, msg };
    match serde_json::from_str::<File>(&text) {
        Ok(f) => Sensitivities::new(f.k, f.v).map_err(|e| bad(e.to_string())),
        Err(e) => Sensitivities::from_kvq_json(&text)
            .map_err(|_| bad(format!("expected {{\"k\": [...], \"v\": [...]}} or {{\"w_k\", \"w_v\"}}: {e}"))),
    }
}

/// Measured per-layer sensitivities: KL (mean over the first window) when only that layer's keys, or values,
/// are quantized to 2 bits with this point's layout; the square root is used, since the solver models error as
/// `s^2 2^(-2b)`.
pub fn measure_kl_sensitivities(
    lm: &dyn LanguageModel,
    point: &PointSpec,
    windows: &[&[u32]],
    reference: &Reference,
    max_seq: usize,
) -> Result<Sensitivities> {
    let n_layers = lm.cache_shape(max_seq).n_layers;
    let one_ref = Reference { windows: reference.windows[..1].to_vec(), ..reference.clone() };
    let mut progress = Progress::new("sensitivities (kl)", 2 * n_layers as u64, "layers");
    let mut measure = |layer: usize, keys: bool| -> Result<f64> {
        let mut layers = vec![LayerPrecision::full(); n_layers];
        let p = Precision::Quant(point.quant_spec(Bits::B2, if keys { point.k_axis } else { point.v_axis }));
        if keys {
            layers[layer].k = p;
        } else {
            layers[layer].v = p;
        }
        let mut cache = point.cache_spec_for(Some(layers)).build(lm.cache_shape(max_seq))?;
        let m = evaluate_text(lm, cache.as_mut(), &windows[..1], &one_ref, &mut |_| {})?;
        progress.inc(1);
        Ok(m.kl_mean.max(0.0).sqrt())
    };
    let mut k = Vec::with_capacity(n_layers);
    let mut v = Vec::with_capacity(n_layers);
    for l in 0..n_layers {
        k.push(measure(l, true)?);
        v.push(measure(l, false)?);
    }
    progress.finish();
    Ok(Sensitivities::new(k, v)?)
}

/// Measured outlier sensitivities ([`SensSource::Outlier`]): one full-precision forward over `window`, recording
/// the group ranges of every key and value the model appends, in this point's layout.
pub fn measure_outlier_sensitivities(
    lm: &dyn LanguageModel,
    point: &PointSpec,
    window: &[u32],
    max_seq: usize,
) -> Result<Sensitivities> {
    let shape = lm.cache_shape(max_seq);
    let inner = CacheSpec::FullF32.build(shape.clone())?;
    let mut rec = crate::ranges::RangeRecorder::new(inner, point.group, point.k_axis, point.v_axis);
    lm.forward(window, &mut rec, window.len().saturating_sub(1))?;
    let (k, v) = rec.sensitivities();
    Ok(Sensitivities::new(k, v)?)
}

/// Resolves a point to per-layer precisions (`None` for full precision).
pub fn resolve_layers(
    lm: &dyn LanguageModel,
    point: &PointSpec,
    windows: &[&[u32]],
    reference: &Reference,
    max_seq: usize,
    sens_cache: &mut BTreeMap<String, Sensitivities>,
) -> Result<Option<Vec<LayerPrecision>>> {
    let n_layers = lm.cache_shape(max_seq).n_layers;
    match &point.policy {
        PolicySpec::Full | PolicySpec::Fixed { .. } => Ok(point.layers_fixed(n_layers)),
        PolicySpec::Budget { avg_bits, sensitivity, pinned } => {
            // Sensitivities depend on the layout, not on the budget: budgets of one layout share a measurement.
            let name = format!("{}|{}", sensitivity.name(), point.layout_key());
            let sens = match sens_cache.get(&name) {
                Some(s) => s.clone(),
                None => {
                    let s = match sensitivity {
                        SensSource::WeightFro | SensSource::WeightSpec | SensSource::WeightBias => {
                            let kind = match sensitivity {
                                SensSource::WeightFro => WeightNorm::Frobenius,
                                SensSource::WeightBias => WeightNorm::FrobeniusWithBias,
                                _ => WeightNorm::Spectral,
                            };
                            let (k, v) = lm.kv_weight_norms(kind).ok_or_else(|| {
                                EvalError::BadRequest(
                                    "this model does not expose its K/V weights; pass a sensitivities file".into(),
                                )
                            })??;
                            Sensitivities::new(k, v)?
                        }
                        SensSource::File(p) => load_sensitivities(p)?,
                        SensSource::Kl => measure_kl_sensitivities(lm, point, windows, reference, max_seq)?,
                        SensSource::Outlier => measure_outlier_sensitivities(lm, point, windows[0], max_seq)?,
                    };
                    sens_cache.insert(name, s.clone());
                    s
                }
            };
            if sens.n_layers() != n_layers {
                return Err(EvalError::BadRequest(format!(
                    "sensitivities have {} layers but the model has {n_layers}",
                    sens.n_layers()
                )));
            }
            let mut budget = BitBudget::new(*avg_bits);
            for &(l, b) in pinned {
                budget = budget.pin(pin_layer(l, n_layers).map_err(EvalError::BadRequest)?, b);
            }
            let alloc = budget.solve(&sens)?;
            Ok(Some(alloc.layers(point.quant_spec(Bits::B4, point.k_axis), point.quant_spec(Bits::B4, point.v_axis))))
        }
    }
}

/// Bits per element of the packed history (codes and metadata, the exact window and sinks left out), averaged over
/// layers and over keys and values; 16 for an unquantized side. This is the storage cost of a configuration in a
/// long context, the x axis of the quantizer comparison.
pub fn packed_bits(layers: &[LayerPrecision], head_dim: usize) -> f64 {
    let side = |p: &Precision| match p.spec() {
        None => 16.0,
        Some(s) => {
            // A whole number of packing units and groups on either layout.
            let tokens = 40 * s.group;
            8.0 * s.bytes(tokens, 1, head_dim) as f64 / (tokens * head_dim) as f64
        }
    };
    let sum: f64 = layers.iter().map(|l| side(&l.k) + side(&l.v)).sum();
    sum / (2 * layers.len().max(1)) as f64
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Loaded task data, read once per sweep.
#[derive(Default)]
pub struct TaskData {
    pub hellaswag: Vec<crate::data::ChoiceItem>,
    pub arc: Vec<crate::data::ChoiceItem>,
    pub lambada: Vec<crate::data::LastWordItem>,
}

impl TaskData {
    /// Reads the datasets of the selected tasks.
    pub fn load(plan: &SweepPlan) -> Result<TaskData> {
        let mut d = TaskData::default();
        if plan.tasks.hellaswag.is_some() {
            d.hellaswag = crate::data::load_hellaswag(&plan.hellaswag_path)?;
        }
        if plan.tasks.arc_easy.is_some() {
            d.arc = crate::data::load_arc(&plan.arc_path)?;
        }
        if plan.tasks.lambada.is_some() {
            d.lambada = crate::data::load_lambada(&plan.lambada_path)?;
        }
        Ok(d)
    }
}

/// Runs the selected tasks through `cache`.
pub fn run_tasks(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    sel: &TaskSelection,
    data: &TaskData,
    label: &str,
) -> Result<BTreeMap<String, TaskResult>> {
    let mut out = BTreeMap::new();
    let lim = |n: usize, len: usize| if n == 0 { len } else { n.min(len) };
    if let Some(n) = sel.hellaswag {
        let mut p = Progress::new(format!("{label} hellaswag"), lim(n, data.hellaswag.len()) as u64, "items");
        out.insert(
            "hellaswag".into(),
            tasks::multiple_choice(lm, cache, &data.hellaswag, Some(lim(n, usize::MAX)), &mut |k| p.inc(k))?,
        );
        p.finish();
    }
    if let Some(n) = sel.arc_easy {
        let mut p = Progress::new(format!("{label} arc_easy"), lim(n, data.arc.len()) as u64, "items");
        out.insert(
            "arc_easy".into(),
            tasks::multiple_choice(lm, cache, &data.arc, Some(lim(n, usize::MAX)), &mut |k| p.inc(k))?,
        );
        p.finish();
    }
    if let Some(n) = sel.lambada {
        let mut p = Progress::new(format!("{label} lambada"), lim(n, data.lambada.len()) as u64, "items");
        out.insert(
            "lambada".into(),
            tasks::lambada(lm, cache, &data.lambada, Some(lim(n, usize::MAX)), &mut |k| p.inc(k))?,
        );
        p.finish();
    }
    if let Some(spec) = &sel.passkey {
        let total = spec.lengths.len() * spec.depths.len() * spec.trials;
        let mut p = Progress::new(format!("{label} passkey"), total as u64, "prompts");
        out.insert("passkey".into(), tasks::passkey(lm, cache, spec, &mut |k| p.inc(k))?);
        p.finish();
    }
    Ok(out)
}

/// The cache length every point is built for: the text window, the longest passkey prompt, and room for tasks.
pub fn max_seq_for(plan: &SweepPlan) -> usize {
    let pk = plan.tasks.passkey.as_ref().and_then(|p| p.lengths.iter().max().copied()).unwrap_or(0);
    plan.text.ctx.max(pk + 64).max(if plan.tasks.is_empty() { 0 } else { 2048 })
}

/// Runs every pending point of `plan` that belongs to its shard and returns the results file, which holds the
/// file's lock until it is dropped. A plan with a point that does not fit the model ([`validate_points`]) is
/// refused before any forward pass.
///
/// `tokens` is the tokenized text (WikiText-2 by default). Progress goes to stderr, a summary per point to stdout.
pub fn run_sweep(lm: &dyn LanguageModel, tokens: &[u32], plan: &SweepPlan) -> Result<ResultsFile> {
    // Every point must fit the model before anything is computed or written.
    validate_points(&plan.points, &lm.cache_shape(max_seq_for(plan)))?;
    let windows = plan.text.windows(tokens)?;
    let identity = plan.identity()?;
    let mut file = ResultsFile::open(&plan.results_path())?;
    let others = file.records().iter().filter(|r| r.settings != identity.settings).count();
    if others > 0 {
        eprintln!(
            "note: {} holds {others} point(s) measured with other settings (another model, text, window or task \
             setting); they are kept, are not reused, and get their own table section",
            file.path().display()
        );
    }
    let mut points: Vec<(usize, &PointSpec)> = plan.points.iter().enumerate().collect();
    if let Some(s) = plan.shard {
        points.retain(|(i, _)| s.owns(*i));
    }
    let total_here = points.len();
    points.retain(|(i, _)| !file.contains(&identity.keys[*i]));
    let skipped = total_here - points.len();
    println!(
        "sweep: {} points{}, {} already in {}, {} to run; {} windows of {} tokens ({} scored tokens per point)",
        total_here,
        plan.shard.map_or(String::new(), |s| format!(" in shard {}/{}", s.index, s.count)),
        skipped,
        file.path().display(),
        points.len(),
        windows.len(),
        plan.text.ctx,
        windows.len() * plan.text.scored_per_window()
    );
    if points.is_empty() {
        return Ok(file);
    }
    let max_seq = max_seq_for(plan);
    let shape = lm.cache_shape(max_seq);
    let scored = windows.len() * plan.text.scored_per_window();
    let unquantized: Vec<String> = points
        .iter()
        .filter(|(_, p)| p.policy != PolicySpec::Full && p.quantized_scored_per_window(&plan.text, shape.n_layers) == 0)
        .map(|(_, p)| format!("{} ({})", p.name(), p.layout_name()))
        .collect();
    if !unquantized.is_empty() {
        eprintln!(
            "warning: {} of {} points never quantize a token any scored position sees, because the exact window and \
             sinks cover the {}-token window: {}. Their text metrics equal the full-precision cache's by \
             construction (marked ‡ in the table); use a --residual below {} or a longer --ctx to measure them.",
            unquantized.len(),
            points.len(),
            plan.text.ctx,
            unquantized.join(", "),
            plan.text.first()
        );
    }
    let task_data = TaskData::load(plan)?;
    let processed = (windows.len() * plan.text.ctx) as u64;

    let t0 = Instant::now();
    let mut fp = CacheSpec::FullF32.build(shape.clone())?;
    let mut prog = Progress::new("reference (f32 cache)", processed, "tokens");
    let reference = build_reference(lm, fp.as_mut(), &windows, &plan.text, &mut |n| prog.inc(n))?;
    let ref_s = prog.finish();
    println!(
        "reference: ppl {:.4} +/- {:.4} over {} tokens in {:.1} s ({:.0} tokens/s); reference store {:.1} MiB",
        reference.metrics.ppl,
        reference.metrics.ppl_stderr,
        reference.metrics.scored_tokens,
        ref_s,
        reference.metrics.tokens_per_s,
        reference.bytes() as f64 / (1 << 20) as f64
    );
    // Quantized attention costs a little more than the f32 cache; tasks cost about the same per point.
    let est = ref_s * 1.2 * points.len() as f64;
    println!(
        "expected run time of the text metrics: about {:.1} min for {} points (tasks extra)",
        est / 60.0,
        points.len()
    );

    let mut sens_cache = BTreeMap::new();
    for (n_done, (index, point)) in points.iter().enumerate() {
        let start = Instant::now();
        let label = format!("{}/{} {}", n_done + 1, points.len(), point.name());
        let layers = resolve_layers(lm, point, &windows, &reference, max_seq, &mut sens_cache)?;
        let spec = point.cache_spec_for(layers.clone());
        let mut cache = spec.build(shape.clone())?;
        let metrics = if point.policy == PolicySpec::Full {
            reference.metrics.clone()
        } else {
            let mut prog = Progress::new(label.clone(), processed, "tokens");
            let m = evaluate_text(lm, cache.as_mut(), &windows, &reference, &mut |n| prog.inc(n))?;
            prog.finish();
            m
        };
        let task_results = run_tasks(lm, cache.as_mut(), &plan.tasks, &task_data, &label)?;
        let quantized_scored = windows.len() * point.quantized_scored_per_window(&plan.text, shape.n_layers);
        if point.policy != PolicySpec::Full {
            for (task, _) in task_results.iter().filter(|(_, t)| t.quantized == Some(0) && t.total > 0) {
                eprintln!(
                    "note: {label}: no {task} prompt reached the quantized part of the cache (exact window {} tokens, \
                     sinks {}), so its accuracy equals the full-precision cache's by construction; run with \
                     --residual 0 (or a window shorter than the prompts) to measure it",
                    point.residual, point.sinks
                );
            }
        }
        let (k_bits, v_bits, lk, lv) = match &layers {
            None => (16.0, 16.0, Vec::new(), Vec::new()),
            Some(ls) => {
                let lk: Vec<f64> = ls.iter().map(|l| l.k.nominal_bits()).collect();
                let lv: Vec<f64> = ls.iter().map(|l| l.v.nominal_bits()).collect();
                let n = ls.len().max(1) as f64;
                let (k, v) = (round_bits(lk.iter().sum::<f64>() / n), round_bits(lv.iter().sum::<f64>() / n));
                if matches!(point.policy, PolicySpec::Budget { .. }) {
                    (k, v, lk, lv)
                } else {
                    (k, v, Vec::new(), Vec::new())
                }
            }
        };
        let packed_bits = layers.as_ref().map_or(16.0, |ls| packed_bits(ls, shape.head_dim));
        let (budget, sensitivity) = match &point.policy {
            PolicySpec::Budget { avg_bits, sensitivity, .. } => (Some(*avg_bits), Some(sensitivity.name())),
            _ => (None, None),
        };
        let full = point.policy == PolicySpec::Full;
        let mut r = PointResult {
            results_version: RESULTS_VERSION,
            key: identity.keys[*index].clone(),
            settings: identity.settings.clone(),
            name: point.name(),
            policy: match point.policy {
                PolicySpec::Full => "full",
                PolicySpec::Fixed { .. } => "fixed",
                PolicySpec::Budget { .. } => "budget",
            }
            .into(),
            k_bits,
            v_bits,
            group_size: if full { 0 } else { point.group },
            k_axis: if full { String::new() } else { point.k_axis.to_string() },
            v_axis: if full { String::new() } else { point.v_axis.to_string() },
            residual: if full { 0 } else { point.residual },
            quantizer: if full { String::new() } else { point.quantizer.to_string() },
            packed_bits,
            sinks: if full { 0 } else { point.sinks },
            budget,
            sensitivity,
            layer_k_bits: lk,
            layer_v_bits: lv,
            tasks: task_results,
            ctx: plan.text.ctx,
            windows: plan.text.windows,
            ref_topk: plan.text.topk,
            model: plan.model_name.clone(),
            model_sha256: plan.model_sha256.clone(),
            data_sha256: plan.data_sha256.clone(),
            text: plan.text_name.clone(),
            git_rev: plan.git_rev.clone(),
            wall_s: if full { ref_s + start.elapsed().as_secs_f64() } else { start.elapsed().as_secs_f64() },
            finished_at: now_secs(),
            shard: plan.shard.map(|s| format!("{}/{}", s.index, s.count)),
            ..Default::default()
        };
        r.set_text(&metrics);
        file.append(&r)?;
        let tasks: Vec<String> = r.tasks.iter().map(|(k, t)| format!("{k} {:.3}", t.accuracy)).collect();
        let elapsed = t0.elapsed().as_secs_f64();
        let left = elapsed / (n_done + 1) as f64 * (points.len() - n_done - 1) as f64;
        println!(
            "[{}] ppl {:.4} kl {:.5} (p99 {:.4}) top1 {:.4} bits/elt {:.3} kv {:.2} MiB{}; {}{:.1} s; about {:.1} min left",
            label,
            r.ppl,
            r.kl_mean,
            r.kl_p99,
            r.top1,
            r.bits_per_element,
            r.kv_bytes as f64 / (1 << 20) as f64,
            match (full, quantized_scored) {
                (true, _) => String::new(),
                (false, 0) => format!(", quantized history 0/{scored} scored tokens: nothing quantized, equals full precision"),
                (false, q) => format!(", quantized history {q}/{scored} scored tokens"),
            },
            if tasks.is_empty() { String::new() } else { format!("{} ", tasks.join(" ")) },
            r.wall_s,
            left / 60.0
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_of_one_layout_share_measured_sensitivities() {
        use crate::lm::ToyLm;
        use crate::metrics::{build_reference, TextEvalSpec};
        let lm = ToyLm::small(9);
        let tokens: Vec<u32> = (0..96u32).map(|i| (i * 7 + 3) % 60).collect();
        let text = TextEvalSpec { ctx: 32, windows: 2, topk: 0 };
        let windows = text.windows(&tokens).unwrap();
        let mut fp = CacheSpec::FullF32.build(lm.cache_shape(32)).unwrap();
        let reference = build_reference(&lm, fp.as_mut(), &windows, &text, &mut |_| {}).unwrap();
        let mut sens = BTreeMap::new();
        let point = |avg_bits, residual| PointSpec {
            policy: PolicySpec::Budget { avg_bits, sensitivity: SensSource::Kl, pinned: vec![] },
            group: 16,
            k_axis: GroupAxis::PerToken,
            v_axis: GroupAxis::PerToken,
            residual,
            sinks: 0,
            quantizer: Quantizer::MinMax,
        };
        let n_layers = lm.cache_shape(32).n_layers;
        for (bits, residual) in [(3.0, 0), (4.0, 0), (5.0, 0)] {
            let layers = resolve_layers(&lm, &point(bits, residual), &windows, &reference, 32, &mut sens).unwrap();
            assert_eq!(layers.unwrap().len(), n_layers);
        }
        assert_eq!(sens.len(), 1, "one measurement for three budgets of one layout");
        resolve_layers(&lm, &point(4.0, 8), &windows, &reference, 32, &mut sens).unwrap();
        assert_eq!(sens.len(), 2, "another exact window is another layout");
    }

    /// Pins hold their layers at the width and count against the budget; a pin past the last layer is refused
    /// before any work. The bias and outlier sources see what they measure: the toy model's key bias raises every
    /// key sensitivity over `weight_fro` and leaves values alone, and an outlier source is the group-range energy
    /// of a plain forward.
    #[test]
    fn pins_and_the_bias_and_outlier_sources() {
        use crate::lm::ToyLm;
        use crate::metrics::{build_reference, TextEvalSpec};
        let lm = ToyLm::new(11, 64, 4, 4, 2, 16);
        let tokens: Vec<u32> = (0..96u32).map(|i| (i * 5 + 1) % 60).collect();
        let text = TextEvalSpec { ctx: 32, windows: 2, topk: 0 };
        let windows = text.windows(&tokens).unwrap();
        let mut fp = CacheSpec::FullF32.build(lm.cache_shape(32)).unwrap();
        let reference = build_reference(&lm, fp.as_mut(), &windows, &text, &mut |_| {}).unwrap();
        let shape = lm.cache_shape(32);
        let n = shape.n_layers;
        let point = |sensitivity, pinned| PointSpec {
            policy: PolicySpec::Budget { avg_bits: 3.0, sensitivity, pinned },
            group: 16,
            k_axis: GroupAxis::PerToken,
            v_axis: GroupAxis::PerToken,
            residual: 0,
            sinks: 0,
            quantizer: Quantizer::MinMax,
        };
        let mut sens = BTreeMap::new();
        let pinned = point(SensSource::WeightFro, vec![(0, Bits::B8), (-1, Bits::B1)]);
        assert!(pinned.check(&shape).is_none());
        let layers = resolve_layers(&lm, &pinned, &windows, &reference, 32, &mut sens).unwrap().unwrap();
        let bits = |p: &Precision| p.spec().unwrap().bits;
        assert_eq!((bits(&layers[0].k), bits(&layers[0].v)), (Bits::B8, Bits::B8));
        assert_eq!((bits(&layers[n - 1].k), bits(&layers[n - 1].v)), (Bits::B1, Bits::B1));
        let far = point(SensSource::WeightFro, vec![(-(n as i64) - 1, Bits::B8)]);
        assert!(far.check(&shape).unwrap().contains("does not exist"), "{:?}", far.check(&shape));
        assert!(validate_points(&[far], &shape).is_err());

        let norms = |kind| lm.kv_weight_norms(kind).unwrap().unwrap();
        let (fk, fv) = norms(WeightNorm::Frobenius);
        let (bk, bv) = norms(WeightNorm::FrobeniusWithBias);
        assert!(fk.iter().zip(&bk).all(|(f, b)| b > f), "{fk:?} {bk:?}");
        assert_eq!(fv, bv);

        let got = measure_outlier_sensitivities(&lm, &point(SensSource::Outlier, vec![]), windows[0], 32).unwrap();
        let mut rec = crate::ranges::RangeRecorder::new(
            CacheSpec::FullF32.build(shape.clone()).unwrap(),
            16,
            GroupAxis::PerToken,
            GroupAxis::PerToken,
        );
        lm.forward(windows[0], &mut rec, 0).unwrap();
        let (k, v) = rec.sensitivities();
        assert_eq!(got, Sensitivities::new(k.clone(), v).unwrap());
        assert!(k.iter().all(|&x| x > 0.0));
        let solved = resolve_layers(&lm, &point(SensSource::Outlier, vec![]), &windows, &reference, 32, &mut sens);
        assert_eq!(solved.unwrap().unwrap().len(), n);
    }

    #[test]
    fn averaged_widths_are_written_without_float_noise() {
        let avg = (0..30).map(|_| Bits::B1_58.nominal()).sum::<f64>() / 30.0;
        assert_eq!(serde_json::to_string(&round_bits(avg)).unwrap(), "1.58");
        assert_eq!(round_bits(4.066666666666666), 4.066666667);
    }

    #[test]
    fn shards_partition_the_points() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        let owned: Vec<usize> = (0..10).filter(|&i| s.owns(i)).collect();
        assert_eq!(owned, [1, 4, 7]);
        let mut all: Vec<usize> =
            (0..3).flat_map(|k| (0..10).filter(move |&i| Shard { index: k, count: 3 }.owns(i))).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        for bad in ["3/3", "x/2", "1", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slurm_variables_pick_the_shard() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Shard::from_slurm(env(&[])).unwrap(), None);
        let s = Shard::from_slurm(env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ]))
        .unwrap();
        assert_eq!(s, Some(Shard { index: 2, count: 4 }));
        assert!(Shard::from_slurm(env(&[("SLURM_ARRAY_TASK_ID", "9"), ("SLURM_ARRAY_TASK_COUNT", "4")])).is_err());
    }

    #[test]
    fn keys_distinguish_layouts_and_names_read_well() {
        let p = PointSpec {
            policy: PolicySpec::Fixed { k: Some(Bits::B4), v: Some(Bits::B2) },
            group: 64,
            k_axis: GroupAxis::PerChannel,
            v_axis: GroupAxis::PerToken,
            residual: 128,
            sinks: 4,
            quantizer: Quantizer::MinMax,
        };
        assert_eq!(p.name(), "K4V2");
        let key_before_quantizers = "fixed|K4|V2|g64|kchan|vtok|r128|s4";
        assert_eq!(p.config_key(), key_before_quantizers, "min-max keys are unchanged");
        for q in Quantizer::ALL.into_iter().skip(1) {
            let r = PointSpec { quantizer: q, ..p.clone() };
            assert_eq!(r.config_key(), format!("{key_before_quantizers}|q{q}"));
            assert_eq!(r.name(), format!("K4V2 {q}"));
            assert_eq!(
                r.layers_fixed(1).unwrap()[0].v,
                Precision::Quant(q.apply(QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken)))
            );
        }
        let mut q = p.clone();
        q.k_axis = GroupAxis::PerToken;
        assert_ne!(p.config_key(), q.config_key());
        let b = PointSpec {
            policy: PolicySpec::Budget { avg_bits: 4.0, sensitivity: SensSource::WeightFro, pinned: vec![] },
            ..p.clone()
        };
        assert_eq!(b.name(), "budget4 weight_fro");
        let pinned = PointSpec {
            policy: PolicySpec::Budget {
                avg_bits: 4.0,
                sensitivity: SensSource::WeightFro,
                pinned: vec![parse_pin("0:8").unwrap(), parse_pin("-1:8").unwrap()],
            },
            ..b.clone()
        };
        assert_eq!(pinned.name(), "budget4 weight_fro pin0:8,-1:8");
        assert_ne!(pinned.config_key(), b.config_key());
        assert!(b.config_key().ends_with(&b.layout_key()) && !b.config_key().contains("pin"));
        for bad in ["8", "x:8", "0:7", "0:"] {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_side_bits("16").unwrap(), None);
        assert_eq!(parse_side_bits("1.58").unwrap(), Some(Bits::B1_58));
        assert!(parse_side_bits("7").is_err());
        let layers = p.layers_fixed(3).unwrap();
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[0].k, Precision::Quant(QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel)));
        let f = PointSpec { policy: PolicySpec::Fixed { k: None, v: Some(Bits::B2) }, ..p };
        assert_eq!(f.layers_fixed(1).unwrap()[0].k, Precision::Full);
        assert!("bogus".parse::<SensSource>().is_err());
        assert_eq!("x/y/act_fro.json".parse::<SensSource>().unwrap().name(), "file:y/act_fro");
    }

    fn plan_for_keys(dir: &Path) -> SweepPlan {
        let point = |policy| PointSpec {
            policy,
            group: 64,
            k_axis: GroupAxis::PerToken,
            v_axis: GroupAxis::PerToken,
            residual: 128,
            sinks: 0,
            quantizer: Quantizer::MinMax,
        };
        let hs = dir.join("hellaswag.jsonl");
        let sens = dir.join("act_fro.json");
        std::fs::write(&hs, "one\n").unwrap();
        std::fs::write(&sens, r#"{"k":[1,2],"v":[3,4]}"#).unwrap();
        SweepPlan {
            points: vec![
                point(PolicySpec::Full),
                point(PolicySpec::Fixed { k: Some(Bits::B4), v: Some(Bits::B2) }),
                point(PolicySpec::Budget { avg_bits: 4.0, sensitivity: SensSource::File(sens), pinned: vec![] }),
            ],
            text: TextEvalSpec { ctx: 512, windows: 8, topk: 256 },
            tasks: TaskSelection {
                hellaswag: Some(200),
                passkey: Some(PasskeySpec { lengths: vec![1024], ..PasskeySpec::default() }),
                ..TaskSelection::default()
            },
            out: dir.join("out"),
            shard: None,
            model_name: "m.gguf".into(),
            text_name: "wiki.test.raw".into(),
            model_sha256: "aa".repeat(32),
            data_sha256: "bb".repeat(32),
            git_rev: "rev".into(),
            weights: "f32".into(),
            attention: "exact".into(),
            hellaswag_path: hs,
            arc_path: dir.join("absent-arc"),
            lambada_path: dir.join("absent-lambada"),
        }
    }

    type Change = dyn Fn(&mut SweepPlan);

    /// Every change of what a number depends on changes every key; what does not (file names, shards, the git
    /// revision) changes none.
    #[test]
    fn keys_cover_contents_and_every_setting() {
        let dir = std::env::temp_dir().join(format!("adaquant-eval-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = plan_for_keys(&dir);
        let id = base.identity().unwrap();
        assert_eq!(id.keys.len(), 3);
        assert!(id.keys.iter().all(|k| k.ends_with(&id.settings_id)));
        assert!(id.settings.contains(&base.model_sha256) && id.settings.contains(&base.data_sha256));
        assert!(id.settings.contains("depths 0.1+0.5+0.9"), "{}", id.settings);
        assert_eq!(base.identity().unwrap(), id, "keys are deterministic");

        let same: [&Change; 4] = [
            &|p| p.model_name = "renamed.gguf".into(),
            &|p| p.shard = Some(Shard { index: 1, count: 2 }),
            &|p| p.git_rev = "another".into(),
            &|p| p.out = p.out.join("elsewhere"),
        ];
        for (i, change) in same.iter().enumerate() {
            let mut p = plan_for_keys(&dir);
            change(&mut p);
            assert_eq!(p.identity().unwrap().keys, id.keys, "change {i} must keep the keys");
        }

        let differ: [(&str, &Change); 12] = [
            ("packed weights", &|p| p.weights = "packed".into()),
            ("integer attention", &|p| p.attention = "int".into()),
            ("model content", &|p| p.model_sha256 = "cc".repeat(32)),
            ("text content", &|p| p.data_sha256 = "dd".repeat(32)),
            ("window length", &|p| p.text.ctx = 1024),
            ("window count", &|p| p.text.windows = 9),
            ("reference top-k", &|p| p.text.topk = 0),
            ("hellaswag items", &|p| p.tasks.hellaswag = Some(0)),
            ("passkey depth values", &|p| p.tasks.passkey.as_mut().unwrap().depths = vec![0.2, 0.5, 0.8]),
            ("passkey seed", &|p| p.tasks.passkey.as_mut().unwrap().seed = 8),
            ("another task", &|p| p.tasks.lambada = Some(10)),
            ("hellaswag data", &|p| std::fs::write(&p.hellaswag_path, "two\n").unwrap()),
        ];
        for (what, change) in differ {
            let mut p = plan_for_keys(&dir);
            change(&mut p);
            if what == "another task" {
                std::fs::write(&p.lambada_path, "x").unwrap();
            }
            let other = p.identity().unwrap();
            for (a, b) in id.keys.iter().zip(&other.keys) {
                assert_ne!(a, b, "{what} must change the key");
            }
        }

        // A sensitivity file changes the key of its budget point only.
        let p = plan_for_keys(&dir);
        let PolicySpec::Budget { sensitivity: SensSource::File(sens), .. } = &p.points[2].policy else {
            unreachable!()
        };
        std::fs::write(sens, r#"{"k":[2,1],"v":[3,4]}"#).unwrap();
        let other = p.identity().unwrap();
        assert_eq!(other.keys[..2], id.keys[..2]);
        assert_ne!(other.keys[2], id.keys[2]);
        // A missing dataset of a selected task is an error, not a key without it.
        let mut p = plan_for_keys(&dir);
        p.tasks.arc_easy = Some(5);
        assert!(p.identity().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn folders_hash_by_names_and_contents() {
        let dir = std::env::temp_dir().join(format!("adaquant-eval-sha-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("sub/model.safetensors"), "weights").unwrap();
        let a = sha256_file(&dir).unwrap();
        assert_eq!(a.len(), 64);
        std::fs::write(dir.join("sub/model.safetensors"), "weight5").unwrap();
        let b = sha256_file(&dir).unwrap();
        assert_ne!(a, b);
        std::fs::rename(dir.join("config.json"), dir.join("config2.json")).unwrap();
        assert_ne!(sha256_file(&dir).unwrap(), b);
        // The sha256 of "abc".
        std::fs::write(dir.join("abc"), "abc").unwrap();
        assert_eq!(
            sha256_file(&dir.join("abc")).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod packed_bits_tests {
    use super::*;

    #[test]
    fn packed_bits_count_codes_and_metadata() {
        let point = |k, v, quantizer| PointSpec {
            policy: PolicySpec::Fixed { k: Some(k), v: Some(v) },
            group: 64,
            k_axis: GroupAxis::PerToken,
            v_axis: GroupAxis::PerToken,
            residual: 128,
            sinks: 0,
            quantizer,
        };
        let bits = |k, v, q| packed_bits(&point(k, v, q).layers_fixed(2).unwrap(), 64);
        // Two f16 metadata entries per group of 64 add half a bit; Lloyd-Max stores one.
        assert!((bits(Bits::B4, Bits::B2, Quantizer::MinMax) - 3.5).abs() < 1e-12);
        assert!((bits(Bits::B2, Bits::B2, Quantizer::Hqq) - 2.5).abs() < 1e-12);
        assert!((bits(Bits::B3, Bits::B2, Quantizer::RotLloyd) - 2.75).abs() < 1e-12);
        assert!((bits(Bits::B1_58, Bits::B1_58, Quantizer::RotLloyd) - 1.85).abs() < 1e-12);
        let full = PointSpec {
            policy: PolicySpec::Fixed { k: None, v: Some(Bits::B4) },
            ..point(Bits::B4, Bits::B4, Quantizer::MinMax)
        };
        assert!((packed_bits(&full.layers_fixed(1).unwrap(), 64) - (16.0 + 4.5) / 2.0).abs() < 1e-12);
    }
}
