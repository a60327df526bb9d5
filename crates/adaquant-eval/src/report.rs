//! Result tables (Markdown, sorted by KL divergence) and plots (SVG and PNG) of sweep records.
//!
//! Records are grouped by evaluation settings (model, text, window, number of windows, reference top-k): only
//! numbers measured the same way share a table or a plot. Every table heading and plot subtitle names the model, the
//! text and the window settings, and every plot file name starts with the same settings (see [`Settings::slug`]),
//! so files from runs with other settings sit side by side and a rerun rewrites exactly its own files.
//! `table.md`, `plots.md` and every plot are written to a temporary file in the same folder and renamed into place,
//! so a reader never sees a half-written file.
//! `plots.md` lists each group's files under its heading. Plots per settings group:
//! - `<slug>-heatmap-ppl-<layout>` and `<slug>-heatmap-kl-<layout>`: fixed-split points on the K-bits by V-bits
//!   grid, one pair per quantization layout, axes over the union of the widths so the outlined diagonal is K = V;
//! - `<slug>-ppl-vs-bits`, `-kl-vs-bits`, `-top1-vs-bits` and `-<task>-vs-bits`: every point against its measured
//!   bits per element, with the Pareto front;
//! - `<slug>-kl-vs-packed-bits`: every quantized point's mean KL against the packed bits per element of its history
//!   (codes and metadata, exact window left out), one colour per quantizer family (per-channel keys count as their
//!   own family), with one Pareto front over all of them.
//!
//! Rows whose exact window and sinks covered every scored position quantized nothing: they are marked ‡ (their
//! numbers equal the full-precision cache's by construction), as task accuracies that never reached the quantized
//! cache are marked †.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use adaquant_analysis::plot::{heatmap, scatter_pareto, Heatmap, ParetoGoal, Scatter, ScatterPoint};
use adaquant_kernels::GroupAxis;

use crate::error::{EvalError, Result};
use crate::metrics::{first_quantized_len, TextEvalSpec};
use crate::results::PointResult;

/// The tracked manifest of data files, used to name the text of records written before the text was recorded.
const MANIFEST: &str = include_str!("../../../data/manifest.json");

/// The name of the text a record was measured on: the recorded file name, else the manifest's file whose sha256
/// matches, else `text <sha256 prefix>`.
pub fn text_name(r: &PointResult) -> String {
    if !r.text.is_empty() {
        return r.text.clone();
    }
    let known = serde_json::from_str::<serde_json::Value>(MANIFEST).ok().and_then(|m| {
        m["files"].as_array()?.iter().find(|f| f["sha256"].as_str() == Some(r.data_sha256.as_str())).and_then(|f| {
            let path = f["path"].as_str()?;
            Some(path.rsplit('/').next().unwrap_or(path).to_string())
        })
    });
    known.unwrap_or_else(|| {
        if r.data_sha256.is_empty() {
            "unknown text".into()
        } else {
            format!("text {}", r.data_sha256.chars().take(8).collect::<String>())
        }
    })
}

/// The evaluation settings a record was measured with; records share a table and plots only when these agree.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Settings {
    pub model: String,
    pub text: String,
    pub ctx: usize,
    pub windows: usize,
    pub ref_topk: usize,
    /// Everything else that changes a number (model and text contents, tasks), as recorded with each result.
    pub content: String,
}

impl Settings {
    /// The settings of a record.
    pub fn of(r: &PointResult) -> Settings {
        Settings {
            model: r.model.clone(),
            text: text_name(r),
            ctx: r.ctx,
            windows: r.windows,
            ref_topk: r.ref_topk,
            content: r.settings.clone(),
        }
    }

    fn spec(&self) -> TextEvalSpec {
        TextEvalSpec { ctx: self.ctx, windows: self.windows, topk: self.ref_topk }
    }

    /// Scored tokens over all windows.
    pub fn scored(&self) -> usize {
        self.windows * self.spec().scored_per_window()
    }

    /// `SmolLM2-135M-Instruct.Q4_1.gguf on wiki.test.raw, 8 windows of 512 tokens (2040 scored tokens), KL over
    /// reference top-256`: the heading of a table.
    pub fn title(&self) -> String {
        format!("{} on {}, {}", self.model, self.text, self.windows_text())
    }

    fn windows_text(&self) -> String {
        let topk = if self.ref_topk == 0 {
            "exact KL".to_string()
        } else {
            format!("KL over reference top-{}", self.ref_topk)
        };
        format!(
            "{} of {} tokens ({} scored tokens), {topk}",
            crate::cli::plural(self.windows, "window"),
            self.ctx,
            self.scored()
        )
    }

    /// The short subtitle of a plot: model, text and windows.
    pub fn subtitle(&self) -> String {
        format!(
            "{} on {}, {} of {} tokens{}",
            self.model,
            self.text,
            crate::cli::plural(self.windows, "window"),
            self.ctx,
            if self.ref_topk == 0 { ", exact KL".to_string() } else { format!(", KL top-{}", self.ref_topk) }
        )
    }

    /// The start of every plot file name of this group: model and text stems, window, windows, reference top-k,
    /// e.g. `SmolLM2-135M-Instruct.Q4_1-wiki.test-ctx512-w8-top256`. It depends on nothing but the settings, so it
    /// never goes stale when another run with other settings writes into the same folder.
    pub fn slug(&self) -> String {
        let stem = |s: &str| {
            let s = s.rsplit('/').next().unwrap_or(s);
            let s = s.strip_suffix(".gguf").or_else(|| s.strip_suffix(".raw")).or_else(|| s.strip_suffix(".txt"));
            s.unwrap_or_default().to_string()
        };
        let (model, text) = (stem(&self.model), stem(&self.text));
        let model = if model.is_empty() { self.model.clone() } else { model };
        let text = if text.is_empty() { self.text.clone() } else { text };
        let raw = format!("{model}-{text}-ctx{}-w{}-top{}", self.ctx, self.windows, self.ref_topk);
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect()
    }
}

/// A group of records measured the same way: its settings, table heading, plot-file prefix and records.
struct Group<'a> {
    settings: Settings,
    title: String,
    slug: String,
    records: Vec<&'a PointResult>,
}

/// Records grouped by settings, each with its title and file prefix; groups whose titles would read the same
/// (another model file with the same name, other task items, say) get the short hash of their recorded settings
/// appended to both.
fn groups(records: &[PointResult]) -> Vec<Group<'_>> {
    let mut groups: BTreeMap<Settings, Vec<&PointResult>> = BTreeMap::new();
    for r in records {
        groups.entry(Settings::of(r)).or_default().push(r);
    }
    let mut titles: BTreeMap<String, usize> = BTreeMap::new();
    for s in groups.keys() {
        *titles.entry(s.title()).or_default() += 1;
    }
    groups
        .into_iter()
        .map(|(s, records)| {
            let (mut title, mut slug) = (s.title(), s.slug());
            if titles[&title] > 1 {
                let h = crate::sweep::short_sha(s.content.as_bytes());
                title.push_str(&format!(", settings {h}"));
                slug.push_str(&format!("-{h}"));
            }
            Group { settings: s, title, slug, records }
        })
        .collect()
}

fn layout(r: &PointResult) -> String {
    if r.policy == "full" {
        return "-".into();
    }
    let mut s = format!("g{} {}/{} r{}", r.group_size, short_axis(&r.k_axis), short_axis(&r.v_axis), r.residual);
    if r.sinks > 0 {
        let _ = write!(s, " s{}", r.sinks);
    }
    if !r.quantizer.is_empty() && r.quantizer != "minmax" {
        let _ = write!(s, " {}", r.quantizer);
    }
    s
}

/// The quantizer family of a record for the comparison plot: the quantizer, with per-channel keys marked.
fn family(r: &PointResult) -> String {
    let q = if r.quantizer.is_empty() { "minmax" } else { r.quantizer.as_str() };
    if r.k_axis == "per_channel" {
        format!("{q} (per-channel K)")
    } else {
        q.to_string()
    }
}

fn layout_slug(r: &PointResult) -> String {
    layout(r).replace(['/', ' '], "-")
}

fn short_axis(a: &str) -> &str {
    match a {
        "per_token" => "tok",
        "per_channel" => "chan",
        other => other,
    }
}

fn axis_of(a: &str) -> GroupAxis {
    if a == "per_channel" {
        GroupAxis::PerChannel
    } else {
        GroupAxis::PerToken
    }
}

fn bits_label(b: f64) -> String {
    if (b - b.round()).abs() < 1e-9 {
        format!("{}", b as i64)
    } else {
        format!("{b:.2}")
    }
}

/// A side's width in a table: `f32` for the full-precision point (its cache holds f32), the width otherwise.
fn side_label(r: &PointResult, bits: f64) -> String {
    if r.policy == "full" {
        "f32".into()
    } else {
        bits_label(bits)
    }
}

/// Scored tokens of a record whose history held a quantized key or value (`None` for the full-precision point),
/// from its layout and window settings.
pub fn quantized_scored(r: &PointResult) -> Option<usize> {
    if r.policy == "full" {
        return None;
    }
    let quantized = |avg: f64, layers: &[f64]| avg < 16.0 - 1e-9 || layers.iter().any(|&b| b < 16.0 - 1e-9);
    let first = [(quantized(r.k_bits, &r.layer_k_bits), &r.k_axis), (quantized(r.v_bits, &r.layer_v_bits), &r.v_axis)]
        .into_iter()
        .filter(|(q, _)| *q)
        .map(|(_, axis)| first_quantized_len(axis_of(axis), r.group_size, r.residual, r.sinks))
        .min();
    let spec = TextEvalSpec { ctx: r.ctx, windows: r.windows, topk: r.ref_topk };
    Some(r.windows * spec.scored_with_quantized_history(first))
}

/// The Markdown table of `records`, one section per settings group, rows sorted by mean KL.
pub fn markdown_table(records: &[PointResult]) -> String {
    let mut out = String::new();
    for Group { settings: s, title, records: mut rs, .. } in groups(records) {
        rs.sort_by(|a, b| a.kl_mean.total_cmp(&b.kl_mean).then(a.bits_per_element.total_cmp(&b.bits_per_element)));
        let base = rs.iter().find(|r| r.policy == "full").map(|r| r.ppl);
        let task_names: BTreeSet<&str> = rs.iter().flat_map(|r| r.tasks.keys().map(String::as_str)).collect();
        let _ = writeln!(out, "### {title}\n");
        let mut head = "| config | policy | K bits | V bits | layout | packed bits | bits/elt | KV KiB | quantized | PPL | dPPL | KL mean | KL p99 | top-1 |".to_string();
        let mut rule =
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
                .to_string();
        for t in &task_names {
            let _ = write!(head, " {t} |");
            rule.push_str(" ---: |");
        }
        head.push_str(" tok/s |");
        rule.push_str(" ---: |");
        let _ = writeln!(out, "{head}\n{rule}");
        let mut footnote = false;
        let mut unquantized_rows = false;
        for r in &rs {
            let dppl = base.map_or("-".into(), |b| format!("{:+.3}", r.ppl - b));
            let quantized = match quantized_scored(r) {
                None => "-".to_string(),
                Some(0) => {
                    unquantized_rows = true;
                    "0% ‡".to_string()
                }
                Some(q) => format!("{:.0}%", 100.0 * q as f64 / s.scored().max(1) as f64),
            };
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1} | {} | {:.3} ± {:.3} | {} | {:.5} | {:.4} | {:.4} |",
                r.name,
                r.policy,
                side_label(r, r.k_bits),
                side_label(r, r.v_bits),
                layout(r),
                if r.packed_bits > 0.0 && r.policy != "full" { format!("{:.3}", r.packed_bits) } else { "-".into() },
                r.bits_per_element,
                r.kv_bytes as f64 / 1024.0,
                quantized,
                r.ppl,
                r.ppl_stderr,
                dppl,
                r.kl_mean,
                r.kl_p99,
                r.top1
            );
            for t in &task_names {
                match r.tasks.get(*t) {
                    Some(tr) => {
                        let unquantized = r.policy != "full" && tr.quantized == Some(0);
                        footnote |= unquantized;
                        let _ =
                            write!(out, " {:.3} ({}){} |", tr.accuracy, tr.total, if unquantized { " †" } else { "" });
                    }
                    None => out.push_str(" - |"),
                }
            }
            let _ = writeln!(out, " {:.0} |", r.tokens_per_s);
        }
        out.push_str(
            "\n`quantized`: the share of scored tokens whose history held quantized keys or values (the rest saw \
             only the exact window and sinks). The f32 row is the full-precision reference; its bits per element \
             count f32 keys and values.\n",
        );
        if unquantized_rows {
            out.push_str(
                "\n‡ Nothing was quantized for any scored token: the exact window (`r`) and sinks cover the whole \
                 text window, so this row equals the full-precision cache by construction. Rerun with a `--residual` \
                 below half the window (`--ctx`) to measure it.\n",
            );
        }
        if footnote {
            out.push_str(
                "\n† No prompt of this task reached the quantized part of the cache (all shorter than the exact window \
                 and sinks): the accuracy equals the full-precision cache's by construction. Rerun with `--residual 0`.\n",
            );
        }
        out.push_str(&summaries(&rs));
        out.push('\n');
    }
    out
}

/// Packed-bits budgets of the "lowest KL within a budget" summary.
const BUDGETS: [f64; 5] = [2.5, 3.0, 3.5, 4.0, 4.5];

/// Two summaries under a group's table, when its points allow them:
/// - per quantizer family, whether the key-favoured split of each unequal fixed pair (`KaVb` against `KbVa`, `a > b`)
///   has the lower KL, and the median ratio of the two KLs;
/// - the lowest-KL point within each packed-bits budget (packed bits: codes and metadata of the quantized history;
///   bits/elt: the whole cache, exact window included).
pub fn summaries(rs: &[&PointResult]) -> String {
    let mut out = String::new();
    let fixed: Vec<&&PointResult> = rs.iter().filter(|r| r.policy == "fixed").collect();
    // Splits are compared within one family and one layout (group size, axes, exact window, sinks); the layout is
    // named only when a family comes in several.
    let mut keys: Vec<(String, String)> = fixed.iter().map(|r| (family(r), layout(r))).collect();
    keys.sort();
    keys.dedup();
    let mut lines = Vec::new();
    for (f, l) in &keys {
        let of: Vec<&&&PointResult> = fixed.iter().filter(|r| family(r) == *f && layout(r) == *l).collect();
        let name = if keys.iter().filter(|(g, _)| g == f).count() > 1 { format!("{f}, {l}") } else { f.clone() };
        let find = |k: f64, v: f64| of.iter().find(|r| r.k_bits == k && r.v_bits == v);
        let (mut wins, mut ratios) = (0usize, Vec::new());
        for a in &of {
            if a.k_bits <= a.v_bits {
                continue;
            }
            if let Some(b) = find(a.v_bits, a.k_bits) {
                wins += usize::from(a.kl_mean < b.kl_mean);
                ratios.push(b.kl_mean / a.kl_mean.max(1e-12));
            }
        }
        if ratios.is_empty() {
            continue;
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        lines.push(format!(
            "| {name} | {wins} of {} | {median:.1}x | {:.1}x to {:.1}x |",
            ratios.len(),
            ratios[0],
            ratios[ratios.len() - 1]
        ));
    }
    if !lines.is_empty() {
        out.push_str(
            "\nKey- against value-favoured splits (`KaVb` against `KbVa`, `a > b`, same family and layout): how often \
             the key-favoured split has the lower KL, and the KL of the value-favoured split over the key-favoured \
             one.\n\n| family | key-favoured lower | median KL ratio | range |\n| --- | ---: | ---: | ---: |\n",
        );
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    let quantized: Vec<&&PointResult> =
        rs.iter().filter(|r| r.policy != "full" && r.packed_bits > 0.0 && r.packed_bits < 16.0).collect();
    let mut rows = Vec::new();
    for b in BUDGETS {
        let best = quantized
            .iter()
            .filter(|r| r.packed_bits <= b + 1e-9)
            .min_by(|x, y| x.kl_mean.total_cmp(&y.kl_mean).then(x.packed_bits.total_cmp(&y.packed_bits)));
        if let Some(r) = best {
            rows.push(format!(
                "| {b} | {} | {} | {:.3} | {:.3} | {:.5} | {:.3} |",
                r.name,
                family(r),
                r.packed_bits,
                r.bits_per_element,
                r.kl_mean,
                r.ppl
            ));
        }
    }
    if quantized.len() > 1 && !rows.is_empty() {
        out.push_str(
            "\nLowest KL within a budget of packed bits per element (codes and metadata of the quantized history; \
             bits/elt counts the whole cache, exact window included).\n\n| packed bits at most | config | family | \
             packed bits | bits/elt | KL mean | PPL |\n| ---: | --- | --- | ---: | ---: | ---: | ---: |\n",
        );
        for l in rows {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Files written by [`write_report`].
#[derive(Clone, Debug, Default)]
pub struct ReportFiles {
    pub table: PathBuf,
    /// `plots.md`: every plot file under the heading of the settings it shows.
    pub index: PathBuf,
    pub plots: Vec<PathBuf>,
}

fn plot_err(e: adaquant_analysis::plot::PlotError) -> EvalError {
    EvalError::Results { path: "plots".into(), msg: e.to_string() }
}

/// The K-by-V grid of one metric over fixed-split records sharing a layout: axes are the union of the widths
/// (ascending), cells without a record are NaN. Returns (axis values, grid[v][k]).
pub fn kv_grid(records: &[&PointResult], metric: impl Fn(&PointResult) -> f64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut axis: Vec<f64> = records.iter().flat_map(|r| [r.k_bits, r.v_bits]).collect();
    axis.sort_by(f64::total_cmp);
    axis.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let idx = |b: f64| axis.iter().position(|&x| (x - b).abs() < 1e-9).unwrap_or(0);
    let mut grid = vec![vec![f64::NAN; axis.len()]; axis.len()];
    for r in records {
        grid[idx(r.v_bits)][idx(r.k_bits)] = metric(r);
    }
    (axis, grid)
}

/// A temporary name in `dir` for the file `name`, unique to this process.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Fsyncs `tmp` and renames it to `path` (same folder), so `path` is always either the old or the new file.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let f = std::fs::File::open(tmp).map_err(|e| EvalError::io(tmp, e))?;
    f.sync_all().map_err(|e| EvalError::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        EvalError::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = temp_name(dir, &name);
    std::fs::write(&tmp, bytes).map_err(|e| EvalError::io(&tmp, e))?;
    commit(&tmp, path)
}

/// Draws a plot through `draw` (which writes `<stem>.svg` and `<stem>.png`) under a temporary stem in `dir`, then
/// renames both files to `<name>.svg` and `<name>.png`.
fn plot_atomic(
    dir: &Path,
    name: &str,
    draw: impl FnOnce(&Path) -> std::result::Result<[PathBuf; 2], adaquant_analysis::plot::PlotError>,
) -> Result<[PathBuf; 2]> {
    let stem = temp_name(dir, name);
    let drawn = draw(&stem).map_err(|e| {
        for ext in ["svg", "png"] {
            let _ = std::fs::remove_file(stem.with_file_name(format!(".{name}.tmp-{}.{ext}", std::process::id())));
        }
        plot_err(e)
    })?;
    let finals = [dir.join(format!("{name}.svg")), dir.join(format!("{name}.png"))];
    for (tmp, path) in drawn.iter().zip(&finals) {
        commit(tmp, path)?;
    }
    Ok(finals)
}

/// Writes `table.md`, the plots of `records` and `plots.md` (which file shows which settings) into `dir`, each
/// atomically.
pub fn write_report(records: &[PointResult], dir: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let table = dir.join("table.md");
    write_atomic(&table, markdown_table(records).as_bytes())?;
    let mut files = ReportFiles { table, index: dir.join("plots.md"), plots: Vec::new() };
    let mut index = String::from(
        "# Plots\n\nEach file name starts with the model, text and window settings it shows; the table of the same \
         settings is in `table.md`.\n",
    );
    for g in groups(records) {
        let (s, rs) = (&g.settings, &g.records);
        let prefix = format!("{}-", g.slug);
        let sub = s.subtitle();
        let first_plot = files.plots.len();
        // Heatmaps per layout of the fixed-split points.
        let mut layouts: BTreeMap<String, Vec<&PointResult>> = BTreeMap::new();
        for r in rs.iter().filter(|r| r.policy == "fixed") {
            layouts.entry(layout_slug(r)).or_default().push(r);
        }
        for (slug, lrs) in &layouts {
            if lrs.len() < 2 {
                continue;
            }
            for (metric, name, f) in [
                ("ppl", "perplexity", (|r: &PointResult| r.ppl) as fn(&PointResult) -> f64),
                ("kl", "mean KL(full || quant)", |r: &PointResult| r.kl_mean),
            ] {
                let (axis, grid) = kv_grid(lrs, f);
                let names: Vec<String> = axis.iter().map(|&b| bits_label(b)).collect();
                let positive = grid.iter().flatten().filter(|v| v.is_finite()).all(|&v| v > 0.0);
                let chart = Heatmap {
                    title: format!("{name} by key and value bits, layout {}", layout(lrs[0])),
                    subtitle: sub.clone(),
                    x_label: "key bits".into(),
                    y_label: "value bits".into(),
                    col_names: names.clone(),
                    row_names: names,
                    values: grid,
                    cell_labels: true,
                    mark_diagonal: true,
                    diagonal_label: "K = V".into(),
                    log_color: metric == "kl" && positive,
                    color_label: name.into(),
                    ..Heatmap::default()
                };
                let [svg, png] =
                    plot_atomic(dir, &format!("{prefix}heatmap-{metric}-{slug}"), |stem| heatmap(&chart, stem))?;
                files.plots.extend([svg, png]);
            }
        }
        // Every quantizer family on one Pareto plot of mean KL against packed bits.
        let quantized: Vec<&&PointResult> =
            rs.iter().filter(|r| r.policy != "full" && r.packed_bits > 0.0 && r.kl_mean > 0.0).collect();
        let families: Vec<String> = quantized.iter().map(|r| family(r)).collect::<BTreeSet<_>>().into_iter().collect();
        if quantized.len() >= 2 {
            let chart = Scatter {
                title: "mean KL vs packed bits per element, every quantizer".into(),
                subtitle: sub.to_string(),
                x_label: "packed bits per K/V element (codes and metadata; exact window left out)".into(),
                y_label: "mean KL".into(),
                points: quantized
                    .iter()
                    .map(|r| ScatterPoint {
                        x: r.packed_bits,
                        y: r.kl_mean,
                        label: Some(r.name.clone()),
                        group: families.iter().position(|f| *f == family(r)).unwrap_or(0),
                    })
                    .collect(),
                group_names: families.clone(),
                pareto: Some(ParetoGoal::MinimizeY),
                log_y: true,
                ..Scatter::default()
            };
            let [svg, png] =
                plot_atomic(dir, &format!("{prefix}kl-vs-packed-bits"), |stem| scatter_pareto(&chart, stem))?;
            files.plots.extend([svg, png]);
        }
        // Metrics against bits per element with the Pareto front.
        let policies: Vec<&str> = vec!["full", "fixed", "budget"];
        // The full-precision point sits at 32 bits per element, far right of every quantized point; it is drawn
        // as a dashed reference line instead, so the quantized points keep the whole x axis.
        let full = rs.iter().find(|r| r.policy == "full");
        let mut scatter = |metric: &str,
                           title: &str,
                           goal: ParetoGoal,
                           log_y: bool,
                           f: &dyn Fn(&PointResult) -> Option<f64>|
         -> Result<()> {
            let reference = full
                .filter(|_| rs.iter().any(|r| r.policy != "full"))
                .and_then(|r| f(r))
                .filter(|y| y.is_finite() && (!log_y || *y > 0.0))
                .map(|y| (y, format!("full precision (f32), {}", adaquant_analysis::plot::format_value(y))));
            let points: Vec<ScatterPoint> = rs
                .iter()
                .filter(|r| r.policy != "full" || reference.is_none())
                .filter_map(|r| {
                    let y = f(r)?;
                    (y.is_finite() && (!log_y || y > 0.0)).then(|| ScatterPoint {
                        x: r.bits_per_element,
                        y,
                        label: Some(r.name.clone()),
                        group: policies.iter().position(|p| *p == r.policy).unwrap_or(0),
                    })
                })
                .collect();
            if points.is_empty() || points.len() + usize::from(reference.is_some()) < 2 {
                return Ok(());
            }
            let chart = Scatter {
                title: format!("{title} vs bits per element"),
                subtitle: sub.clone(),
                x_label: "bits per K/V element (measured, metadata and exact window included)".into(),
                y_label: title.into(),
                points,
                group_names: vec!["full precision (f32)".into(), "fixed K/V split".into(), "budget solver".into()],
                pareto: Some(goal),
                reference,
                log_y,
                ..Scatter::default()
            };
            let [svg, png] =
                plot_atomic(dir, &format!("{prefix}{metric}-vs-bits"), |stem| scatter_pareto(&chart, stem))?;
            files.plots.extend([svg, png]);
            Ok(())
        };
        scatter("ppl", "perplexity", ParetoGoal::MinimizeY, true, &|r| Some(r.ppl))?;
        scatter("kl", "mean KL", ParetoGoal::MinimizeY, true, &|r| (r.policy != "full").then_some(r.kl_mean))?;
        scatter("top1", "top-1 agreement", ParetoGoal::MaximizeY, false, &|r| Some(r.top1))?;
        let task_names: BTreeSet<String> = rs.iter().flat_map(|r| r.tasks.keys().cloned()).collect();
        for t in task_names {
            scatter(&t, &format!("{t} accuracy"), ParetoGoal::MaximizeY, false, &|r| {
                r.tasks.get(&t).map(|x| x.accuracy)
            })?;
        }
        let _ = writeln!(index, "\n## {}\n", g.title);
        for p in files.plots[first_plot..].iter().filter(|p| p.extension().is_some_and(|e| e == "png")) {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = writeln!(index, "- [{name}]({name}) (and `.svg`)");
        }
    }
    write_atomic(&files.index, index.as_bytes())?;
    crate::results::sync_dir(dir)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, policy: &str, k: f64, v: f64, ppl: f64, kl: f64, bpe: f64) -> PointResult {
        PointResult {
            key: name.into(),
            name: name.into(),
            policy: policy.into(),
            k_bits: k,
            v_bits: v,
            group_size: 64,
            k_axis: "per_token".into(),
            v_axis: "per_token".into(),
            residual: 128,
            ppl,
            kl_mean: kl,
            top1: 1.0 - kl,
            bits_per_element: bpe,
            ctx: 512,
            windows: 4,
            model: "m".into(),
            ..Default::default()
        }
    }

    /// The split summary counts each family's unequal pairs apart, and the budget summary picks the lowest KL at
    /// or under each budget, whatever the family.
    #[test]
    fn summaries_compare_splits_per_family_and_pick_the_best_within_a_budget() {
        let point = |name: &str, q: &str, k: f64, v: f64, kl: f64, packed: f64| {
            let mut r = rec(name, "fixed", k, v, 20.0 + kl, kl, packed + 7.0);
            r.quantizer = q.into();
            r.packed_bits = packed;
            r
        };
        let rs = vec![
            rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0),
            point("K4V2", "minmax", 4.0, 2.0, 0.05, 3.5),
            point("K2V4", "minmax", 2.0, 4.0, 1.0, 3.5),
            point("K3V2", "minmax", 3.0, 2.0, 0.1, 3.0),
            point("K2V3", "minmax", 2.0, 3.0, 1.2, 3.0),
            point("K4V2 rot-lloyd", "rot-lloyd", 4.0, 2.0, 0.04, 3.25),
            point("K2V4 rot-lloyd", "rot-lloyd", 2.0, 4.0, 0.02, 3.25),
            point("K2V2 rot-lloyd", "rot-lloyd", 2.0, 2.0, 0.09, 2.25),
        ];
        let refs: Vec<&PointResult> = rs.iter().collect();
        let s = summaries(&refs);
        assert!(s.contains("| minmax | 2 of 2 | 20.0x | 12.0x to 20.0x |"), "{s}");
        assert!(s.contains("| rot-lloyd | 0 of 1 | 0.5x | 0.5x to 0.5x |"), "{s}");
        assert!(s.contains("| 2.5 | K2V2 rot-lloyd | rot-lloyd | 2.250 |"), "{s}");
        assert!(s.contains("| 3 | K2V2 rot-lloyd |"), "{s}");
        assert!(s.contains("| 3.5 | K2V4 rot-lloyd | rot-lloyd | 3.250 |"), "{s}");
        assert!(markdown_table(&rs).contains(&s), "the table carries the summaries");
        // A pair split across two layouts is not compared; each layout is named once a family has two.
        let mut other = point("K2V4", "minmax", 2.0, 4.0, 0.01, 3.5);
        other.group_size = 32;
        let mut two = rs.clone();
        two.push(other);
        let refs2: Vec<&PointResult> = two.iter().collect();
        let s2 = summaries(&refs2);
        assert!(s2.contains("| minmax, g64 tok/tok r128 | 2 of 2 | 20.0x |"), "{s2}");
        assert!(!s2.contains("g32"), "a family-layout with no pair has no row: {s2}");
        // One quantized point and no pairs: nothing to summarise.
        assert_eq!(summaries(&refs[..2]), "");
    }

    #[test]
    fn table_is_sorted_by_kl_with_delta_ppl() {
        let rs = vec![
            rec("K2V2", "fixed", 2.0, 2.0, 30.0, 0.5, 2.5),
            rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0),
            rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5),
        ];
        let t = markdown_table(&rs);
        let order: Vec<usize> = ["| full", "| K4V2", "| K2V2"].iter().map(|n| t.find(n).unwrap()).collect();
        assert!(order[0] < order[1] && order[1] < order[2], "{t}");
        assert!(t.contains("+2.000") && t.contains("+10.000"), "{t}");
        assert!(t.contains("4 windows of 512 tokens (1020 scored tokens)"));
        assert!(!t.contains('†'), "{t}");
    }

    #[test]
    fn tasks_that_never_reached_the_quantized_cache_are_marked() {
        use crate::tasks::TaskResult;
        let task = |quantized| TaskResult { correct: 5, total: 10, accuracy: 0.5, quantized, ..Default::default() };
        let mut full = rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0);
        full.tasks.insert("arc_easy".into(), task(Some(0)));
        let mut a = rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5);
        a.tasks.insert("arc_easy".into(), task(Some(0)));
        let mut b = rec("K2V4", "fixed", 2.0, 4.0, 25.0, 0.3, 3.5);
        b.tasks.insert("arc_easy".into(), task(Some(7)));
        let mut old = rec("K8V8", "fixed", 8.0, 8.0, 20.1, 0.01, 8.5);
        old.tasks.insert("arc_easy".into(), task(None));
        let t = markdown_table(&[full, a, b, old]);
        let marked: Vec<&str> = t.lines().filter(|l| l.starts_with("| ") && l.contains("0.500 (10) †")).collect();
        assert_eq!(marked.len(), 1, "{t}");
        assert!(marked[0].starts_with("| K4V2 "), "{t}");
        assert!(t.contains("† No prompt of this task reached the quantized part"), "{t}");
    }

    #[test]
    fn grid_places_points_and_leaves_holes() {
        let a = rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5);
        let b = rec("K2V4", "fixed", 2.0, 4.0, 25.0, 0.3, 3.5);
        let c = rec("K8V8", "fixed", 8.0, 8.0, 20.1, 0.01, 8.5);
        let (axis, grid) = kv_grid(&[&a, &b, &c], |r| r.ppl);
        assert_eq!(axis, [2.0, 4.0, 8.0]);
        assert_eq!(grid[0][1], 22.0); // V2 row, K4 column.
        assert_eq!(grid[1][0], 25.0);
        assert_eq!(grid[2][2], 20.1);
        assert!(grid[0][0].is_nan());
    }

    #[test]
    fn report_writes_table_and_plots() {
        let dir = std::env::temp_dir().join(format!("adaquant-eval-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rs = vec![
            rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0),
            rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5),
            rec("K2V4", "fixed", 2.0, 4.0, 25.0, 0.3, 3.5),
            rec("K4V4", "fixed", 4.0, 4.0, 21.0, 0.05, 4.5),
        ];
        let files = write_report(&rs, &dir).unwrap();
        assert!(std::fs::read_to_string(&files.table).unwrap().contains("K2V4"));
        let names: Vec<String> =
            files.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in [
            "m-unknown-text-ctx512-w4-top0-heatmap-ppl-g64-tok-tok-r128.png",
            "m-unknown-text-ctx512-w4-top0-heatmap-kl-g64-tok-tok-r128.svg",
            "m-unknown-text-ctx512-w4-top0-ppl-vs-bits.png",
            "m-unknown-text-ctx512-w4-top0-kl-vs-bits.svg",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        for p in &files.plots {
            assert!(std::fs::metadata(p).unwrap().len() > 100, "{}", p.display());
        }
        let png = std::fs::read(dir.join("m-unknown-text-ctx512-w4-top0-ppl-vs-bits.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Every plot names the model and the text; the KL heatmap explains its outline.
        for p in files.plots.iter().filter(|p| p.extension().is_some_and(|e| e == "svg")) {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.contains("m on unknown text, 4 windows of 512 tokens"), "{}", p.display());
        }
        let heat = std::fs::read_to_string(dir.join("m-unknown-text-ctx512-w4-top0-heatmap-kl-g64-tok-tok-r128.svg"));
        assert!(heat.unwrap().contains("K = V"));
    }

    #[test]
    fn runs_with_other_settings_write_their_own_files_and_the_index_says_which() {
        let dir = std::env::temp_dir().join(format!("adaquant-eval-report-two-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let wiki = |mut r: PointResult| {
            r.text = "wiki.test.raw".into();
            r.model = "SmolLM2-135M-Instruct.Q4_1.gguf".into();
            r
        };
        let first = vec![
            wiki(rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0)),
            wiki(rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5)),
            wiki(rec("K2V4", "fixed", 2.0, 4.0, 25.0, 0.3, 3.5)),
        ];
        let one = write_report(&first, &dir).unwrap();
        let before: BTreeSet<PathBuf> = one.plots.iter().cloned().collect();
        // A second run with another window count writes into the same folder; the table then covers both.
        let mut both = first.clone();
        both.extend(first.iter().map(|r| PointResult { windows: 1, key: format!("{}-w1", r.key), ..r.clone() }));
        let two = write_report(&both, &dir).unwrap();
        let after: BTreeSet<PathBuf> = two.plots.iter().cloned().collect();
        assert!(before.is_subset(&after), "the first run's files keep their names: {before:?} vs {after:?}");
        assert_eq!(after.len(), 2 * before.len());
        assert!(after.iter().all(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("SmolLM2-135M-Instruct.Q4_1-wiki.test-ctx512-w")
        }));
        let index = std::fs::read_to_string(&two.index).unwrap();
        assert!(
            index.contains("## SmolLM2-135M-Instruct.Q4_1.gguf on wiki.test.raw, 1 window of 512 tokens (255 scored")
        );
        assert!(index.contains("## SmolLM2-135M-Instruct.Q4_1.gguf on wiki.test.raw, 4 windows of 512 tokens"));
        assert!(index.contains("SmolLM2-135M-Instruct.Q4_1-wiki.test-ctx512-w1-top0-kl-vs-bits.png"), "{index}");
        let table = std::fs::read_to_string(&two.table).unwrap();
        assert!(table.contains("### SmolLM2-135M-Instruct.Q4_1.gguf on wiki.test.raw, 1 window of 512"), "{table}");
        assert!(!table.contains("1 windows"));
    }

    #[test]
    fn rows_that_quantized_nothing_are_marked_and_full_precision_says_f32() {
        let mut full = rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0);
        full.ctx = 100;
        // The issue's `--ctx 100 --residual 128`: the exact window covers every position.
        let mut covered = rec("K4V2", "fixed", 4.0, 2.0, 20.0, 0.0, 32.0);
        covered.ctx = 100;
        // A per-channel layout whose window plus one group just fits: a few positions see quantized keys.
        let mut partly = rec("K2V16", "fixed", 2.0, 16.0, 21.0, 0.2, 20.0);
        partly.ctx = 100;
        partly.residual = 16;
        partly.group_size = 32;
        partly.k_axis = "per_channel".into();
        let t = markdown_table(&[full, covered, partly]);
        let row = |name: &str| t.lines().find(|l| l.starts_with(&format!("| {name} "))).unwrap().to_string();
        assert!(row("K4V2").contains("| 0% ‡ |"), "{t}");
        assert!(t.contains("‡ Nothing was quantized"), "{t}");
        assert!(row("full").contains("| f32 | f32 |") && row("full").contains("| - |"), "{t}");
        // Per window: positions 50..=98 are scored, keys are first quantized at 16 + 32 = 48 tokens, so all 49.
        assert!(row("K2V16").contains("| 100% |"), "{t}");
        let mut late = rec("K2V2", "fixed", 2.0, 2.0, 21.0, 0.2, 20.0);
        late.ctx = 100;
        late.residual = 80;
        // First quantized at 81 tokens: positions 80..=98 of 50..=98, 19 of 49.
        assert_eq!(quantized_scored(&late), Some(4 * 19));
        assert_eq!(quantized_scored(&rec("full", "full", 16.0, 16.0, 1.0, 0.0, 32.0)), None);
    }

    #[test]
    fn old_records_name_their_text_from_the_manifest() {
        let mut r = rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5);
        r.data_sha256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08".into();
        assert_eq!(text_name(&r), "wiki.test.raw");
        r.data_sha256 = "0123456789abcdef".into();
        assert_eq!(text_name(&r), "text 01234567");
        r.text = "mine.txt".into();
        assert_eq!(text_name(&r), "mine.txt");
    }

    /// The table and the plots replace the old files by renaming a complete new file over them: a reader holding
    /// the old file (here: a hard link to it) keeps it whole, and no temporary file is left behind.
    #[test]
    fn report_files_are_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("adaquant-eval-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rs = vec![
            rec("full", "full", 16.0, 16.0, 20.0, 0.0, 32.0),
            rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5),
            rec("K2V4", "fixed", 2.0, 4.0, 25.0, 0.3, 3.5),
        ];
        let slug = groups(&rs)[0].slug.clone();
        let names = [
            "table.md".to_string(),
            format!("{slug}-ppl-vs-bits.png"),
            format!("{slug}-heatmap-kl-g64-tok-tok-r128.svg"),
        ];
        for name in &names {
            std::fs::write(dir.join(name), "old").unwrap();
            std::fs::hard_link(dir.join(name), dir.join(format!("held-{name}"))).unwrap();
        }
        let files = write_report(&rs, &dir).unwrap();
        assert!(files.plots.iter().any(|p| p.ends_with(&names[1])), "{:?}", files.plots);
        for name in &names {
            assert_eq!(std::fs::read_to_string(dir.join(format!("held-{name}"))).unwrap(), "old", "{name}");
            assert!(std::fs::metadata(dir.join(name)).unwrap().len() > 100, "{name}");
        }
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn evaluations_with_equal_titles_get_their_own_sections() {
        let mut a = rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5);
        a.settings = "text sha256 1".into();
        let mut b = a.clone();
        b.settings = "text sha256 2".into();
        b.ppl = 30.0;
        let t = markdown_table(&[a, b]);
        assert_eq!(t.matches("### ").count(), 2, "{t}");
        assert!(t.contains(&format!("settings {}", crate::sweep::short_sha(b"text sha256 1"))), "{t}");
        // One evaluation keeps its plain title.
        let t = markdown_table(&[rec("K4V2", "fixed", 4.0, 2.0, 22.0, 0.1, 3.5)]);
        assert!(!t.contains("settings "), "{t}");
    }
}
