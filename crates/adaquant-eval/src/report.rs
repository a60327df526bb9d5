//! Result tables (Markdown, sorted by KL divergence) and plots (SVG and PNG) of sweep records.
//!
//! Records are grouped by evaluation settings (model, window, number of windows, reference top-k): only numbers
//! measured the same way share a table or a plot. Plots per settings group:
//! - `heatmap-ppl-<layout>` and `heatmap-kl-<layout>`: fixed-split points on the K-bits by V-bits grid, one pair
//!   per quantization layout, axes over the union of the widths so the marked diagonal is K = V;
//! - `ppl-vs-bits`, `kl-vs-bits`, `top1-vs-bits` and `<task>-vs-bits`: every point against its measured bits per
//!   element, with the Pareto front;
//! - `kl-vs-packed-bits`: every quantized point's mean KL against the packed bits per element of its history
//!   (codes and metadata, exact window left out), one colour per quantizer family (per-channel keys count as their
//!   own family), with one Pareto front over all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use adaquant_analysis::plot::{heatmap, scatter_pareto, Heatmap, ParetoGoal, Scatter, ScatterPoint};

use crate::error::{EvalError, Result};
use crate::results::PointResult;

/// Identity of the evaluation settings of a record.
fn settings(r: &PointResult) -> (String, usize, usize, usize) {
    (r.model.clone(), r.ctx, r.windows, r.ref_topk)
}

fn settings_title(s: &(String, usize, usize, usize)) -> String {
    let topk = if s.3 == 0 { "exact KL".to_string() } else { format!("KL over reference top-{}", s.3) };
    format!("{}, {} windows of {} tokens ({} scored tokens), {}", s.0, s.2, s.1, s.2 * (s.1 / 2 - 1), topk)
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

fn bits_label(b: f64) -> String {
    if (b - b.round()).abs() < 1e-9 {
        format!("{}", b as i64)
    } else {
        format!("{b:.2}")
    }
}

/// The Markdown table of `records`, one section per settings group, rows sorted by mean KL.
pub fn markdown_table(records: &[PointResult]) -> String {
    let mut groups: BTreeMap<(String, usize, usize, usize), Vec<&PointResult>> = BTreeMap::new();
    for r in records {
        groups.entry(settings(r)).or_default().push(r);
    }
    let mut out = String::new();
    for (s, mut rs) in groups {
        rs.sort_by(|a, b| a.kl_mean.total_cmp(&b.kl_mean).then(a.bits_per_element.total_cmp(&b.bits_per_element)));
        let base = rs.iter().find(|r| r.policy == "full").map(|r| r.ppl);
        let task_names: BTreeSet<&str> = rs.iter().flat_map(|r| r.tasks.keys().map(String::as_str)).collect();
        let _ = writeln!(out, "### {}\n", settings_title(&s));
        let mut head = "| config | policy | K bits | V bits | layout | packed bits | bits/elt | KV KiB | PPL | dPPL | KL mean | KL p99 | top-1 |".to_string();
        let mut rule =
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".to_string();
        for t in &task_names {
            let _ = write!(head, " {t} |");
            rule.push_str(" ---: |");
        }
        head.push_str(" tok/s |");
        rule.push_str(" ---: |");
        let _ = writeln!(out, "{head}\n{rule}");
        let mut footnote = false;
        for r in rs {
            let dppl = base.map_or("-".into(), |b| format!("{:+.3}", r.ppl - b));
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1} | {:.3} ± {:.3} | {} | {:.5} | {:.4} | {:.4} |",
                r.name,
                r.policy,
                bits_label(r.k_bits),
                bits_label(r.v_bits),
                layout(r),
                if r.packed_bits > 0.0 { format!("{:.3}", r.packed_bits) } else { "-".into() },
                r.bits_per_element,
                r.kv_bytes as f64 / 1024.0,
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
        if footnote {
            out.push_str(
                "\n† No prompt of this task reached the quantized part of the cache (all shorter than the exact window \
                 and sinks): the accuracy equals the full-precision cache's by construction. Rerun with `--residual 0`.\n",
            );
        }
        out.push('\n');
    }
    out
}

/// Files written by [`write_report`].
#[derive(Clone, Debug, Default)]
pub struct ReportFiles {
    pub table: PathBuf,
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

/// Writes `table.md` and the plots of `records` into `dir`.
pub fn write_report(records: &[PointResult], dir: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let table = dir.join("table.md");
    std::fs::write(&table, markdown_table(records)).map_err(|e| EvalError::io(&table, e))?;
    let mut files = ReportFiles { table, plots: Vec::new() };
    let mut groups: BTreeMap<(String, usize, usize, usize), Vec<&PointResult>> = BTreeMap::new();
    for r in records {
        groups.entry(settings(r)).or_default().push(r);
    }
    let multi = groups.len() > 1;
    for (gi, (s, rs)) in groups.iter().enumerate() {
        let prefix = if multi { format!("s{gi}-") } else { String::new() };
        let sub = format!("ctx {} x {} windows", s.1, s.2);
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
                    title: format!("{name}, {} ({sub})", layout(lrs[0])),
                    x_label: "key bits".into(),
                    y_label: "value bits".into(),
                    col_names: names.clone(),
                    row_names: names,
                    values: grid,
                    cell_labels: true,
                    mark_diagonal: true,
                    log_color: metric == "kl" && positive,
                    color_label: name.into(),
                    ..Heatmap::default()
                };
                let [svg, png] =
                    heatmap(&chart, &dir.join(format!("{prefix}heatmap-{metric}-{slug}"))).map_err(plot_err)?;
                files.plots.extend([svg, png]);
            }
        }
        // Every quantizer family on one Pareto plot of mean KL against packed bits.
        let quantized: Vec<&&PointResult> =
            rs.iter().filter(|r| r.policy != "full" && r.packed_bits > 0.0 && r.kl_mean > 0.0).collect();
        let families: Vec<String> = quantized.iter().map(|r| family(r)).collect::<BTreeSet<_>>().into_iter().collect();
        if quantized.len() >= 2 {
            let chart = Scatter {
                title: format!("mean KL vs packed bits per element, every quantizer ({sub})"),
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
                scatter_pareto(&chart, &dir.join(format!("{prefix}kl-vs-packed-bits"))).map_err(plot_err)?;
            files.plots.extend([svg, png]);
        }
        // Metrics against bits per element with the Pareto front.
        let policies: Vec<&str> = vec!["full", "fixed", "budget"];
        let mut scatter = |metric: &str,
                           title: &str,
                           goal: ParetoGoal,
                           log_y: bool,
                           f: &dyn Fn(&PointResult) -> Option<f64>|
         -> Result<()> {
            let points: Vec<ScatterPoint> = rs
                .iter()
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
            if points.len() < 2 {
                return Ok(());
            }
            let chart = Scatter {
                title: format!("{title} vs bits per element ({sub})"),
                x_label: "bits per K/V element (measured, metadata and exact window included)".into(),
                y_label: title.into(),
                points,
                group_names: policies.iter().map(|s| s.to_string()).collect(),
                pareto: Some(goal),
                log_y,
                ..Scatter::default()
            };
            let [svg, png] =
                scatter_pareto(&chart, &dir.join(format!("{prefix}{metric}-vs-bits"))).map_err(plot_err)?;
            files.plots.extend([svg, png]);
            Ok(())
        };
        scatter("ppl", "perplexity", ParetoGoal::MinimizeY, false, &|r| Some(r.ppl))?;
        scatter("kl", "mean KL", ParetoGoal::MinimizeY, true, &|r| (r.policy != "full").then_some(r.kl_mean))?;
        scatter("top1", "top-1 agreement", ParetoGoal::MaximizeY, false, &|r| Some(r.top1))?;
        let task_names: BTreeSet<String> = rs.iter().flat_map(|r| r.tasks.keys().cloned()).collect();
        for t in task_names {
            scatter(&t, &format!("{t} accuracy"), ParetoGoal::MaximizeY, false, &|r| {
                r.tasks.get(&t).map(|x| x.accuracy)
            })?;
        }
    }
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
        for want in
            ["heatmap-ppl-g64-tok-tok-r128.png", "heatmap-kl-g64-tok-tok-r128.svg", "ppl-vs-bits.png", "kl-vs-bits.svg"]
        {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        for p in &files.plots {
            assert!(std::fs::metadata(p).unwrap().len() > 100, "{}", p.display());
        }
        let png = std::fs::read(dir.join("ppl-vs-bits.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
