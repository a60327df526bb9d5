//! The analysis report: its JSON shape, the paper's two claims checked per layer, the Markdown summary, the plots
//! and the sensitivity files the cache crate's budget solver reads.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AnalysisError, Result};
use crate::linalg::mean_min_max;
use crate::plot::{self, BarChart, BarGroup, Heatmap, LineChart, Series};
use crate::study::{ActivationLayer, Dims, QuantError, WeightLayer};

/// Where the activations came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub text: PathBuf,
    pub tokens: usize,
    /// Keys analysed before RoPE (quantization errors always use post-RoPE keys).
    pub pre_rope: bool,
    /// Group size of the quantization-error measurements (per-token groups).
    pub group: usize,
    /// Query positions used for the attention-output error.
    pub attn_queries: usize,
}

/// Wall-clock seconds of the steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub load_s: f64,
    pub weights_s: f64,
    pub forward_s: f64,
    pub activations_s: f64,
    pub total_s: f64,
}

/// One layer of the report. `w_k`, `w_v`, `k` and `v` each hold `fro`, `spec`, `singular_values`, `spectral_gap`,
/// `effective_rank`, `stable_rank`, and per-head arrays (`heads`, `head_fro`, `head_spec`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    #[serde(flatten)]
    pub weights: WeightLayer,
    /// Activation study (absent with `--weights-only`).
    #[serde(flatten)]
    pub activations: Option<ActivationLayer>,
}

/// Whether ||K|| > ||V|| in one norm, layer by layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// `weight_fro`, `weight_spec`, `act_fro` or `act_spec`.
    pub norm: String,
    /// ||K|| / ||V|| per layer.
    pub ratio: Vec<f64>,
    /// Layers where ||K|| > ||V||.
    pub holds: Vec<usize>,
    /// Layers where it does not.
    pub fails: Vec<usize>,
}

impl Claim {
    fn new(norm: &str, k: &[f64], v: &[f64]) -> Claim {
        let ratio: Vec<f64> = k.iter().zip(v).map(|(a, b)| a / b).collect();
        let (holds, fails) = (0..ratio.len()).partition(|&i| k[i] > v[i]);
        Claim { norm: norm.into(), ratio, holds, fails }
    }

    /// A sentence such as "holds in 24 of 30 layers; fails in layers 20, 23".
    pub fn sentence(&self) -> String {
        let n = self.ratio.len();
        if self.fails.is_empty() {
            format!("holds in all {n} layers")
        } else if self.holds.is_empty() {
            format!("fails in all {n} layers")
        } else {
            let noun = if self.fails.len() == 1 { "layer" } else { "layers" };
            format!("holds in {} of {n} layers; fails in {noun} {}", self.holds.len(), ranges(&self.fails))
        }
    }
}

/// "1-3, 7, 9-10" for [1, 2, 3, 7, 9, 10].
fn ranges(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        parts.push(if j == i { xs[i].to_string() } else { format!("{}-{}", xs[i], xs[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// The whole report (`report.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub model: PathBuf,
    pub dims: Dims,
    pub calibration: Option<Calibration>,
    pub layers: Vec<LayerReport>,
    /// The paper's claims: ||W_K|| > ||W_V|| (weights) and ||K|| > ||V|| (activations), per norm.
    pub claims: Vec<Claim>,
    pub timings: Timings,
    /// Per layer, `Some(w)` for a sliding-window (local) layer (Gemma 3); empty when no layer slides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Option<usize>>,
}

/// Kinds of sensitivity files (`sensitivities-<kind>.json`).
pub const SENSITIVITY_KINDS: [&str; 6] = ["weight_fro", "weight_spec", "act_fro", "act_spec", "quant_err", "attn_err"];

/// Reference width of the measured sensitivities `quant_err` and `attn_err`.
pub const SENSITIVITY_REF_BITS: f64 = 4.0;

/// One sensitivity file: `{"kind": ..., "k": [one per layer], "v": [one per layer]}`, the shape
/// `adaquant_cache::alloc::Sensitivities` reads (it ignores `kind` and `note`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensitivityFile {
    pub kind: String,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub note: String,
}

impl Report {
    /// Builds the report and checks the claims.
    pub fn new(
        model: PathBuf,
        dims: Dims,
        calibration: Option<Calibration>,
        layers: Vec<LayerReport>,
        timings: Timings,
    ) -> Report {
        let mut r = Report { model, dims, calibration, layers, claims: Vec::new(), timings, windows: Vec::new() };
        r.claims = r.check_claims();
        r
    }

    fn column(&self, f: impl Fn(&LayerReport) -> Option<f64>) -> Option<Vec<f64>> {
        self.layers.iter().map(f).collect()
    }

    fn check_claims(&self) -> Vec<Claim> {
        let mut out = vec![
            Claim::new(
                "weight_fro",
                &self.layers.iter().map(|l| l.weights.w_k.whole.fro).collect::<Vec<_>>(),
                &self.layers.iter().map(|l| l.weights.w_v.whole.fro).collect::<Vec<_>>(),
            ),
            Claim::new(
                "weight_spec",
                &self.layers.iter().map(|l| l.weights.w_k.whole.spec).collect::<Vec<_>>(),
                &self.layers.iter().map(|l| l.weights.w_v.whole.spec).collect::<Vec<_>>(),
            ),
        ];
        let act = |f: fn(&ActivationLayer) -> (f64, f64)| {
            let k = self.column(|l| l.activations.as_ref().map(|a| f(a).0))?;
            let v = self.column(|l| l.activations.as_ref().map(|a| f(a).1))?;
            Some((k, v))
        };
        if let Some((k, v)) = act(|a| (a.k.whole.fro, a.v.whole.fro)) {
            out.push(Claim::new("act_fro", &k, &v));
        }
        if let Some((k, v)) = act(|a| (a.k.whole.spec, a.v.whole.spec)) {
            out.push(Claim::new("act_spec", &k, &v));
        }
        out
    }

    /// The sensitivity vectors of one kind, or `None` when the report lacks the data (for example activation
    /// kinds after `--weights-only`). `quant_err` is `2^b0 * ||X - Q_b0(X)||_F` and `attn_err` is
    /// `2^b0 * ||O - O_b0||_F / ||O||_F` at `b0 = 4` bits, so that the solver's model `s^2 * 2^(-2b)` reproduces
    /// the measured squared error at 4 bits.
    pub fn sensitivities(&self, kind: &str) -> Option<SensitivityFile> {
        let scale = SENSITIVITY_REF_BITS.exp2();
        let at_ref =
            |a: &ActivationLayer| a.quant.iter().find(|q| (q.bits - SENSITIVITY_REF_BITS).abs() < 1e-9).cloned();
        let (k, v, note): (Vec<f64>, Vec<f64>, &str) = match kind {
            "weight_fro" => (
                self.layers.iter().map(|l| l.weights.w_k.whole.fro).collect(),
                self.layers.iter().map(|l| l.weights.w_v.whole.fro).collect(),
                "Frobenius norms of W_K and W_V",
            ),
            "weight_spec" => (
                self.layers.iter().map(|l| l.weights.w_k.whole.spec).collect(),
                self.layers.iter().map(|l| l.weights.w_v.whole.spec).collect(),
                "spectral norms of W_K and W_V",
            ),
            "act_fro" => (
                self.column(|l| l.activations.as_ref().map(|a| a.k.whole.fro))?,
                self.column(|l| l.activations.as_ref().map(|a| a.v.whole.fro))?,
                "Frobenius norms of the K and V caches over the calibration tokens",
            ),
            "act_spec" => (
                self.column(|l| l.activations.as_ref().map(|a| a.k.whole.spec))?,
                self.column(|l| l.activations.as_ref().map(|a| a.v.whole.spec))?,
                "spectral norms of the K and V caches over the calibration tokens",
            ),
            "quant_err" => (
                self.column(|l| l.activations.as_ref().and_then(at_ref).map(|q| scale * q.k_rel * l.act_k_fro()))?,
                self.column(|l| l.activations.as_ref().and_then(at_ref).map(|q| scale * q.v_rel * l.act_v_fro()))?,
                "2^4 x ||X - Q4(X)||_F of the K and V caches (per-token groups)",
            ),
            "attn_err" => (
                self.column(|l| l.activations.as_ref().and_then(at_ref).and_then(|q| q.k_attn_rel).map(|e| scale * e))?,
                self.column(|l| l.activations.as_ref().and_then(at_ref).and_then(|q| q.v_attn_rel).map(|e| scale * e))?,
                "2^4 x relative attention-output error when only K (or V) of the layer is quantized to 4 bits",
            ),
            _ => return None,
        };
        Some(SensitivityFile { kind: kind.into(), k, v, note: note.into() })
    }

    /// Summary lines comparing sliding-window (local) and global layers, for models that have both: medians of the
    /// K/V norm ratios and of the 4-bit attention-output errors of K alone and V alone. Empty otherwise.
    pub fn local_global_markdown(&self) -> String {
        let mut s = String::new();
        if !self.windows.iter().any(Option::is_some) || self.windows.iter().all(Option::is_some) {
            return s;
        }
        fn median(mut x: Vec<f64>) -> Option<f64> {
            x.retain(|v| v.is_finite());
            if x.is_empty() {
                return None;
            }
            x.sort_by(f64::total_cmp);
            let n = x.len();
            Some(if n % 2 == 1 { x[n / 2] } else { 0.5 * (x[n / 2 - 1] + x[n / 2]) })
        }
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        for (name, local) in [("local (sliding-window)", true), ("global", false)] {
            let ls: Vec<&LayerReport> = self
                .layers
                .iter()
                .filter(|l| self.windows.get(l.layer).copied().flatten().is_some() == local)
                .collect();
            let idx: Vec<String> = ls.iter().map(|l| l.layer.to_string()).collect();
            let w_ratio = median(ls.iter().map(|l| l.weights.w_k.whole.spec / l.weights.w_v.whole.spec).collect());
            let acts: Vec<&ActivationLayer> = ls.iter().filter_map(|l| l.activations.as_ref()).collect();
            let a_ratio = median(acts.iter().map(|a| a.k.whole.fro / a.v.whole.fro).collect());
            let at4 = |a: &&ActivationLayer| a.quant.iter().find(|q| (q.bits - 4.0).abs() < 1e-9).cloned();
            let q4: Vec<QuantError> = acts.iter().filter_map(at4).collect();
            let k4 = median(q4.iter().filter_map(|q| q.k_attn_rel).collect());
            let v4 = median(q4.iter().filter_map(|q| q.v_attn_rel).collect());
            let k_worse =
                q4.iter().filter(|q| matches!((q.k_attn_rel, q.v_attn_rel), (Some(k), Some(v)) if k > v)).count();
            let _ = writeln!(
                s,
                "- {name} layers ({}): median ||W_K||_2/||W_V||_2 {}, median ||K||_F/||V||_F {}; at 4 bits the median \
                 attention-output error is {} with K alone and {} with V alone (K worse in {k_worse} of {}).",
                idx.join(", "),
                fmt(w_ratio),
                fmt(a_ratio),
                fmt(k4),
                fmt(v4),
                q4.len()
            );
        }
        s
    }

    /// Writes `report.json`, `report.md`, `sensitivities-<kind>.json` and the plots into `dir`; returns the files
    /// written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = self.write_data(dir)?;
        files.extend(self.plots(&dir.join("plots"))?);
        Ok(files)
    }

    /// Writes `report.json`, `report.md` and `sensitivities-<kind>.json` (no plots) into `dir`.
    pub fn write_data(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|source| AnalysisError::Io { path: dir.into(), source })?;
        let mut files = Vec::new();
        let json = dir.join("report.json");
        write_json(&json, self)?;
        files.push(json);
        for kind in SENSITIVITY_KINDS {
            if let Some(s) = self.sensitivities(kind) {
                let p = dir.join(format!("sensitivities-{kind}.json"));
                write_json(&p, &s)?;
                files.push(p);
            }
        }
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown()).map_err(|source| AnalysisError::Io { path: md.clone(), source })?;
        files.push(md);
        Ok(files)
    }

    /// The subtitle of the plots: the model, and for activation plots the calibration text and its length.
    pub fn plot_subtitle(&self, activations: bool) -> String {
        let name = |p: &Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into());
        let model = name(&self.model);
        match (&self.calibration, activations) {
            (Some(c), true) => format!("{model}, first {} tokens of {}", c.tokens, name(&c.text)),
            _ => format!("{model}, weights"),
        }
    }

    /// Draws every plot into `dir` (SVG and PNG each).
    pub fn plots(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let (sub_w, sub_a) = (self.plot_subtitle(false), self.plot_subtitle(true));
        let n = self.layers.len();
        let layers: Vec<String> = (0..n).map(|i| i.to_string()).collect();

        // K/V norm ratios per layer with the y = 1 line.
        let groups: Vec<BarGroup> = self
            .claims
            .iter()
            .map(|c| BarGroup { label: claim_label(&c.norm).into(), values: c.ratio.clone() })
            .collect();
        out.extend(plot::bar_chart(
            &BarChart {
                title: "||K|| / ||V|| per layer (above 1: keys larger)".into(),
                subtitle: if self.calibration.is_some() { sub_a.clone() } else { sub_w.clone() },
                x_label: "layer".into(),
                y_label: "ratio".into(),
                categories: layers.clone(),
                groups,
                log_y: true,
                hline: Some(1.0),
                ..BarChart::default()
            },
            &dir.join("kv_norm_ratio"),
        )?);

        // Norms per layer.
        let mut series = vec![
            Series::new("||W_K||_F", idx(n), self.layers.iter().map(|l| l.weights.w_k.whole.fro).collect()),
            Series::new("||W_V||_F", idx(n), self.layers.iter().map(|l| l.weights.w_v.whole.fro).collect()),
            Series::new("||W_K||_2", idx(n), self.layers.iter().map(|l| l.weights.w_k.whole.spec).collect()),
            Series::new("||W_V||_2", idx(n), self.layers.iter().map(|l| l.weights.w_v.whole.spec).collect()),
        ];
        out.extend(plot::line_chart(
            &LineChart {
                title: "Weight norms per layer".into(),
                subtitle: sub_w.clone(),
                x_label: "layer".into(),
                y_label: "norm".into(),
                series: std::mem::take(&mut series),
                ..LineChart::default()
            },
            &dir.join("weight_norms"),
        )?);

        // Spectra: one chart per layer and matrix kind, mean over heads with the min-max band.
        let nh = self.dims.n_kv_heads;
        for kind in ["w", "act"] {
            for l in &self.layers {
                let Some(spectra) = layer_spectra(l, kind) else { continue };
                let (kh, vh) = spectra.split_at(nh);
                for (skip, suffix) in [(4usize, ""), (0, "_full")] {
                    let mut s = Vec::new();
                    for (name, heads) in [("K", kh), ("V", vh)] {
                        let (mean, lo, hi) = mean_min_max(heads);
                        if mean.len() <= skip || mean[skip..].iter().chain(&lo[skip..]).any(|&x| x <= 0.0) {
                            continue;
                        }
                        let x: Vec<f64> = (skip + 1..=mean.len()).map(|i| i as f64).collect();
                        s.push(
                            Series::new(format!("{name} (mean over {} heads)", heads.len()), x, mean[skip..].to_vec())
                                .with_band(lo[skip..].to_vec(), hi[skip..].to_vec()),
                        );
                    }
                    if s.is_empty() {
                        continue;
                    }
                    let what = if kind == "w" { "W_K and W_V" } else { "K and V caches" };
                    let from =
                        if skip > 0 { format!(" from the {}th singular value", skip + 1) } else { String::new() };
                    out.extend(plot::line_chart(
                        &LineChart {
                            title: format!("Layer {}: singular values of {what}{from}", l.layer),
                            subtitle: if kind == "w" { sub_w.clone() } else { sub_a.clone() },
                            x_label: "index".into(),
                            y_label: "singular value".into(),
                            series: s,
                            log_y: true,
                            ..LineChart::default()
                        },
                        &dir.join(format!("spectrum_{kind}_layer{:02}{suffix}", l.layer)),
                    )?);
                }
            }
        }

        // Per-channel key magnitudes: layers x channels (all heads side by side), colour on a log scale.
        if self.layers.iter().all(|l| l.activations.is_some()) && n > 0 {
            let values: Vec<Vec<f64>> = self
                .layers
                .iter()
                .map(|l| {
                    let a = l.activations.as_ref().expect("checked above");
                    a.k_channels.iter().flat_map(|c| c.max_abs.iter().map(|&x| x.max(1e-6))).collect()
                })
                .collect();
            let cols = values[0].len();
            let hd = self.dims.head_dim;
            let col_names =
                (0..cols).map(|c| if c % hd == 0 { format!("h{}", c / hd) } else { String::new() }).collect();
            out.extend(plot::heatmap(
                &Heatmap {
                    title: format!(
                        "max |K| per channel ({} RoPE), by layer",
                        if self.calibration.as_ref().is_some_and(|c| c.pre_rope) { "before" } else { "after" }
                    ),
                    subtitle: sub_a.clone(),
                    x_label: "channel (KV heads side by side)".into(),
                    y_label: "layer".into(),
                    col_names,
                    row_names: layers.clone(),
                    values,
                    cell_labels: false,
                    log_color: true,
                    color_label: "max |k|".into(),
                    size: (1400, 800),
                    ..Heatmap::default()
                },
                &dir.join("key_channel_magnitude"),
            )?);
        }

        // Quantization errors per layer at each width.
        if let Some(first) = self.layers.first().and_then(|l| l.activations.as_ref()) {
            let widths: Vec<f64> = first.quant.iter().map(|q| q.bits).collect();
            if !widths.is_empty() {
                let rows = |f: fn(&crate::study::QuantError) -> f64| -> Vec<Vec<f64>> {
                    self.layers
                        .iter()
                        .map(|l| l.activations.as_ref().map(|a| a.quant.iter().map(f).collect()).unwrap_or_default())
                        .collect()
                };
                let names: Vec<String> = widths.iter().map(|b| bits_label(*b)).collect();
                let k_rel: fn(&crate::study::QuantError) -> f64 = |q| q.k_rel;
                let v_rel: fn(&crate::study::QuantError) -> f64 = |q| q.v_rel;
                for (name, f) in [("k", k_rel), ("v", v_rel)] {
                    let values = rows(f);
                    if values.iter().any(|r| r.len() != widths.len() || r.iter().any(|&x| x <= 0.0)) {
                        continue;
                    }
                    out.extend(plot::heatmap(
                        &Heatmap {
                            title: format!("Relative error ||X - Q(X)||_F / ||X||_F of {}", name.to_uppercase()),
                            subtitle: sub_a.clone(),
                            x_label: "bits".into(),
                            y_label: "layer".into(),
                            col_names: names.clone(),
                            row_names: layers.clone(),
                            values,
                            cell_labels: true,
                            log_color: true,
                            color_label: "relative error".into(),
                            size: (900, 1000),
                            ..Heatmap::default()
                        },
                        &dir.join(format!("quant_error_{name}")),
                    )?);
                }
            }
        }
        Ok(out)
    }

    /// The Markdown report: summary in plain words, then tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let d = &self.dims;
        let _ = writeln!(s, "# Norm and spectrum analysis\n");
        let _ = writeln!(
            s,
            "Model: `{}` ({} layers, {} query heads, {} KV heads, head_dim {}, hidden {}).",
            self.model.display(),
            d.n_layers,
            d.n_q_heads,
            d.n_kv_heads,
            d.head_dim,
            d.hidden
        );
        match &self.calibration {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "Activations: the first {} tokens of `{}`, keys {} RoPE; quantization errors with per-token groups of {} (min-max, f16 metadata), attention-output errors over {} query positions.",
                    c.tokens,
                    c.text.display(),
                    if c.pre_rope { "before" } else { "after" },
                    c.group,
                    c.attn_queries
                );
            }
            None => {
                let _ = writeln!(s, "Weights only (no activations).");
            }
        }
        let _ = writeln!(s, "\n## Summary\n");
        for c in &self.claims {
            let _ = writeln!(s, "- ||K|| > ||V|| in {} ({}): {}.", claim_label(&c.norm), c.norm, c.sentence());
        }
        if let Some(c) = self.claims.iter().find(|c| c.norm == "weight_fro") {
            if !c.fails.is_empty() {
                let worst = c.fails.iter().copied().min_by(|&a, &b| c.ratio[a].total_cmp(&c.ratio[b]));
                if let Some(w) = worst {
                    let _ = writeln!(
                        s,
                        "- The weight Frobenius claim reverses in {} layer(s); the smallest ratio ||W_K||_F / ||W_V||_F is {:.3} (layer {w}).",
                        c.fails.len(),
                        c.ratio[w]
                    );
                }
            }
        }
        let quant: Vec<(usize, &ActivationLayer)> =
            self.layers.iter().filter_map(|l| l.activations.as_ref().map(|a| (l.layer, a))).collect();
        if !quant.is_empty() {
            let at = |a: &ActivationLayer| a.quant.iter().find(|q| (q.bits - 4.0).abs() < 1e-9).cloned();
            let pairs: Vec<_> = quant.iter().filter_map(|(i, a)| at(a).map(|q| (*i, q))).collect();
            let k_worse = pairs
                .iter()
                .filter(|(_, q)| matches!((q.k_attn_rel, q.v_attn_rel), (Some(k), Some(v)) if k > v))
                .count();
            if pairs.iter().all(|(_, q)| q.k_attn_rel.is_some()) && !pairs.is_empty() {
                let _ = writeln!(
                    s,
                    "- At 4 bits, quantizing K alone disturbs the layer's attention output more than quantizing V alone in {k_worse} of {} layers.",
                    pairs.len()
                );
            }
        }
        s.push_str(&self.local_global_markdown());
        let _ = writeln!(
            s,
            "\nThe paper (arXiv 2502.15075) argues that keys carry larger norms than values, so quantization error hurts keys more and keys deserve more bits. The lines above state where that holds on this model and where it does not.\n"
        );

        let _ = writeln!(s, "## Weights\n");
        let _ = writeln!(
            s,
            "| layer | ‖W_K‖_F | ‖W_V‖_F | K/V (F) | ‖W_K‖_2 | ‖W_V‖_2 | K/V (2) | ‖W_Q‖_F | ‖W_O‖_F | erank W_K | erank W_V |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for l in &self.layers {
            let w = &l.weights;
            let _ = writeln!(
                s,
                "| {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {:.1} | {:.1} |",
                l.layer,
                w.w_k.whole.fro,
                w.w_v.whole.fro,
                mark(w.w_k.whole.fro / w.w_v.whole.fro),
                w.w_k.whole.spec,
                w.w_v.whole.spec,
                mark(w.w_k.whole.spec / w.w_v.whole.spec),
                w.w_q.fro,
                w.w_o.fro,
                w.w_k.whole.effective_rank,
                w.w_v.whole.effective_rank
            );
        }
        if !quant.is_empty() {
            let _ = writeln!(s, "\n## Activations\n");
            let _ = writeln!(
                s,
                "| layer | ‖K‖_F | ‖V‖_F | K/V (F) | ‖K‖_2 | ‖V‖_2 | K/V (2) | gap K | gap V | erank K | erank V | max \\|K\\| channel | max \\|V\\| channel |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for (i, a) in &quant {
                let top = |c: &[crate::linalg::ChannelStats]| {
                    c.iter()
                        .enumerate()
                        .flat_map(|(h, cs)| cs.max_abs.iter().enumerate().map(move |(ch, &x)| (h, ch, x)))
                        .max_by(|a, b| a.2.total_cmp(&b.2))
                        .map(|(h, ch, x)| format!("{x:.1} (h{h} c{ch})"))
                        .unwrap_or_default()
                };
                let gap = |g: Option<f64>| g.map(|x| format!("{x:.2}")).unwrap_or_else(|| "n/a".into());
                let _ = writeln!(
                    s,
                    "| {i} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
                    a.k.whole.fro,
                    a.v.whole.fro,
                    mark(a.k.whole.fro / a.v.whole.fro),
                    a.k.whole.spec,
                    a.v.whole.spec,
                    mark(a.k.whole.spec / a.v.whole.spec),
                    gap(a.k.whole.spectral_gap),
                    gap(a.v.whole.spectral_gap),
                    a.k.whole.effective_rank,
                    a.v.whole.effective_rank,
                    top(&a.k_channels),
                    top(&a.v_channels)
                );
            }
            if let Some((_, first)) = quant.first() {
                let _ = writeln!(s, "\n## Quantization error\n");
                let _ = writeln!(
                    s,
                    "Relative error of quantizing one layer's K (or V) alone, ||X - Q(X)||_F / ||X||_F, and in brackets the relative error it causes in that layer's attention output.\n"
                );
                let head: Vec<String> = first.quant.iter().map(|q| bits_label(q.bits)).collect();
                let _ = writeln!(
                    s,
                    "| layer | {} |",
                    head.iter().flat_map(|b| [format!("K {b}b"), format!("V {b}b")]).collect::<Vec<_>>().join(" | ")
                );
                let _ = writeln!(s, "|---:|{}", "---:|".repeat(2 * head.len()));
                for (i, a) in &quant {
                    let cell = |rel: f64, attn: Option<f64>| match attn {
                        Some(x) => format!("{rel:.4} ({x:.4})"),
                        None => format!("{rel:.4}"),
                    };
                    let cells: Vec<String> = a
                        .quant
                        .iter()
                        .flat_map(|q| [cell(q.k_rel, q.k_attn_rel), cell(q.v_rel, q.v_attn_rel)])
                        .collect();
                    let _ = writeln!(s, "| {i} | {} |", cells.join(" | "));
                }
            }
        }
        let t = &self.timings;
        let _ = writeln!(
            s,
            "\n## Time\n\nload {:.1} s, weights {:.1} s, forward {:.1} s, activations {:.1} s, total {:.1} s.",
            t.load_s, t.weights_s, t.forward_s, t.activations_s, t.total_s
        );
        let _ = writeln!(
            s,
            "\nFiles: `report.json` (every number above plus full spectra and per-head arrays), `sensitivities-<kind>.json` (input of the budget solver), `plots/` (SVG and PNG)."
        );
        s
    }
}

impl LayerReport {
    /// Keeps only the per-head entries of the KV heads in `ids`.
    pub fn keep_heads(&mut self, ids: &[usize]) {
        self.weights.w_k.keep_heads(ids);
        self.weights.w_v.keep_heads(ids);
        if let Some(a) = &mut self.activations {
            a.k.keep_heads(ids);
            a.v.keep_heads(ids);
            a.k_channels = ids.iter().filter_map(|&i| a.k_channels.get(i).cloned()).collect();
            a.v_channels = ids.iter().filter_map(|&i| a.v_channels.get(i).cloned()).collect();
        }
    }

    fn act_k_fro(&self) -> f64 {
        self.activations.as_ref().map_or(0.0, |a| a.k.whole.fro)
    }
    fn act_v_fro(&self) -> f64 {
        self.activations.as_ref().map_or(0.0, |a| a.v.whole.fro)
    }
}

/// Per-head spectra of K then V: of the weights (`kind == "w"`) or of the caches.
fn layer_spectra<'a>(l: &'a LayerReport, kind: &str) -> Option<Vec<&'a [f64]>> {
    if kind == "w" {
        Some([k_heads(&l.weights.w_k), k_heads(&l.weights.w_v)].concat())
    } else {
        l.activations.as_ref().map(|a| [k_heads(&a.k), k_heads(&a.v)].concat())
    }
}

fn k_heads(h: &crate::study::HeadedStats) -> Vec<&[f64]> {
    h.heads.iter().map(|s| s.singular_values.as_slice()).collect()
}

/// "4" for 4 bits, "1.58" for ternary.
fn bits_label(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{b:.0}")
    } else {
        format!("{b}")
    }
}

fn idx(n: usize) -> Vec<f64> {
    (0..n).map(|i| i as f64).collect()
}

fn claim_label(norm: &str) -> &'static str {
    match norm {
        "weight_fro" => "weights, Frobenius",
        "weight_spec" => "weights, spectral",
        "act_fro" => "K/V cache, Frobenius",
        "act_spec" => "K/V cache, spectral",
        _ => "other",
    }
}

/// A ratio with a marker when keys are not larger.
fn mark(r: f64) -> String {
    if r > 1.0 {
        format!("{r:.3}")
    } else {
        format!("**{r:.3}** ✗")
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|source| AnalysisError::Json { path: path.into(), source })?;
    std::fs::write(path, text).map_err(|source| AnalysisError::Io { path: path.into(), source })
}
