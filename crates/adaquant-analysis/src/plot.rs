//! Small charts written as SVG and PNG from the same drawing code.
//!
//! Every chart function takes a description (plain data, no plotting types) and a path stem, and writes
//! `<stem>.svg` and `<stem>.png`, returning both paths in that order. The parent folder is created when missing.
//! Four chart kinds cover what adaquant draws:
//!
//! - [`line_chart`]: lines with an optional min-max band per series and an optional logarithmic y axis
//!   (singular-value spectra: mean over heads with the min-max band of the heads).
//! - [`bar_chart`]: grouped bars over categories with an optional horizontal reference line
//!   (the K/V norm ratio per layer with the `y = 1` line).
//! - [`heatmap`]: a grid of values with a colour bar, optional cell labels and an optional marked diagonal
//!   (K-bits by V-bits perplexity grids, per-channel key magnitudes).
//! - [`scatter_pareto`]: points with their Pareto front drawn as a line (accuracy against bits per element).
//!
//! ```no_run
//! use adaquant_analysis::plot::{line_chart, LineChart, Series};
//! let chart = LineChart {
//!     title: "spectrum".into(),
//!     x_label: "index".into(),
//!     y_label: "singular value".into(),
//!     log_y: true,
//!     series: vec![Series::new("K", vec![1.0, 2.0, 3.0], vec![10.0, 3.0, 1.0])],
//!     ..LineChart::default()
//! };
//! let [svg, png] = line_chart(&chart, std::path::Path::new("results/spectrum")).unwrap();
//! # let _ = (svg, png);
//! ```

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// What can go wrong while drawing a chart.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// The chart has nothing to draw.
    #[error("chart `{title}` has no data to draw: {what}")]
    Empty { title: String, what: String },
    /// Two arrays that must have equal lengths do not.
    #[error("chart `{title}`: {what} has {got} entries but {expected} were expected")]
    LengthMismatch { title: String, what: String, expected: usize, got: usize },
    /// A value that must be finite is not.
    #[error("chart `{title}`: {what} holds a non-finite value ({value}); remove or replace it before plotting")]
    NonFinite { title: String, what: String, value: f64 },
    /// A value that must be positive (log axis) is not.
    #[error(
        "chart `{title}`: {what} holds {value}, which a logarithmic axis cannot show; use a linear axis or drop it"
    )]
    NonPositiveOnLog { title: String, what: String, value: f64 },
    /// Creating the output folder failed.
    #[error("cannot create the folder {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The drawing backend failed (font lookup, file writing, encoding).
    #[error("drawing {path} failed: {message}")]
    Backend { path: PathBuf, message: String },
}

/// Result of a chart function.
pub type Result<T> = std::result::Result<T, PlotError>;

/// Default image size in pixels (width, height).
pub const DEFAULT_SIZE: (u32, u32) = (960, 600);

const FONT: &str = "sans-serif";

/// Colours given to series, groups and points in order (a colour-blind-friendly palette).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

fn palette(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One line of a [`LineChart`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub label: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    /// Optional shaded band `(low, high)`, one pair of values per x (for example the min and max over heads).
    pub band: Option<(Vec<f64>, Vec<f64>)>,
}

impl Series {
    /// A series without a band.
    pub fn new(label: impl Into<String>, x: Vec<f64>, y: Vec<f64>) -> Series {
        Series { label: label.into(), x, y, band: None }
    }

    /// The same series with a shaded `(low, high)` band.
    pub fn with_band(mut self, low: Vec<f64>, high: Vec<f64>) -> Series {
        self.band = Some((low, high));
        self
    }
}

/// A line chart: several series, optional bands, optional logarithmic y axis and horizontal reference line.
#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    pub title: String,
    /// A smaller second line under the title (for example the model, the text and the settings shown).
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
    /// A dashed horizontal line at this y (for example 1 for ratios).
    pub hline: Option<f64>,
    pub size: (u32, u32),
}

impl Default for LineChart {
    fn default() -> Self {
        LineChart {
            title: String::new(),
            subtitle: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: Vec::new(),
            log_y: false,
            hline: None,
            size: DEFAULT_SIZE,
        }
    }
}

/// One group of bars in a [`BarChart`] (one bar per category).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
}

/// Grouped bars: for each category, one bar per group side by side.
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub title: String,
    /// A smaller second line under the title (for example the model, the text and the settings shown).
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub groups: Vec<BarGroup>,
    /// Logarithmic y axis; bars then start at the bottom of the axis.
    pub log_y: bool,
    /// A dashed horizontal reference line at this y (for example 1 for a K/V ratio).
    pub hline: Option<f64>,
    pub size: (u32, u32),
}

impl Default for BarChart {
    fn default() -> Self {
        BarChart {
            title: String::new(),
            subtitle: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            categories: Vec::new(),
            groups: Vec::new(),
            log_y: false,
            hline: None,
            size: DEFAULT_SIZE,
        }
    }
}

/// A heatmap of `values[row][col]`; rows are drawn bottom to top, so row 0 is at the bottom.
///
/// Non-finite cells are drawn grey and labelled `n/a` (for example configurations that were not run).
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    pub title: String,
    /// A smaller second line under the title.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    /// Names of the columns (x axis).
    pub col_names: Vec<String>,
    /// Names of the rows (y axis).
    pub row_names: Vec<String>,
    pub values: Vec<Vec<f64>>,
    /// Write each cell's value in the cell.
    pub cell_labels: bool,
    /// Outline the cells with equal row and column index.
    pub mark_diagonal: bool,
    /// What the outlined diagonal means (for example `K = V`), written as a key beside the colour bar.
    pub diagonal_label: String,
    /// Colour by log10 of the value (values must then be positive).
    pub log_color: bool,
    /// Label of the colour bar.
    pub color_label: String,
    pub size: (u32, u32),
}

impl Default for Heatmap {
    fn default() -> Self {
        Heatmap {
            title: String::new(),
            subtitle: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            col_names: Vec::new(),
            row_names: Vec::new(),
            values: Vec::new(),
            cell_labels: true,
            mark_diagonal: false,
            diagonal_label: String::new(),
            log_color: false,
            color_label: String::new(),
            size: DEFAULT_SIZE,
        }
    }
}

/// Which way is better on the y axis of a [`Scatter`]; on the x axis fewer is always better (bits, bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParetoGoal {
    /// Higher y is better (accuracy, agreement).
    #[default]
    MaximizeY,
    /// Lower y is better (perplexity, KL divergence).
    MinimizeY,
}

/// One point of a [`Scatter`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScatterPoint {
    pub x: f64,
    pub y: f64,
    /// Optional text written next to the point (for example `K4V2`).
    pub label: Option<String>,
    /// Index of the point's group, which picks its colour and legend entry.
    pub group: usize,
}

/// Points with their Pareto front.
#[derive(Clone, Debug, PartialEq)]
pub struct Scatter {
    pub title: String,
    /// A smaller second line under the title (for example the model, the text and the settings shown).
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<ScatterPoint>,
    /// Legend names of the point groups (may be empty).
    pub group_names: Vec<String>,
    /// Draw the Pareto front for this goal; `None` draws no front.
    pub pareto: Option<ParetoGoal>,
    /// A dashed horizontal reference line at this y with its legend label (for example the full-precision
    /// perplexity, so the quantized points keep the whole x axis).
    pub reference: Option<(f64, String)>,
    pub log_y: bool,
    pub size: (u32, u32),
}

impl Default for Scatter {
    fn default() -> Self {
        Scatter {
            title: String::new(),
            subtitle: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            points: Vec::new(),
            group_names: Vec::new(),
            pareto: Some(ParetoGoal::MaximizeY),
            reference: None,
            log_y: false,
            size: DEFAULT_SIZE,
        }
    }
}

/// Indices of the Pareto-optimal points, sorted by increasing x.
///
/// A point is on the front when no other point has x at most its x and y at least as good, with one of the two
/// strictly better. Exact duplicates are all kept. Non-finite points are ignored. This is the O(n log n) sweep;
/// [`pareto_front_ref`] is the quadratic reference it is tested against.
pub fn pareto_front(points: &[(f64, f64)], goal: ParetoGoal) -> Vec<usize> {
    let sign = match goal {
        ParetoGoal::MaximizeY => 1.0,
        ParetoGoal::MinimizeY => -1.0,
    };
    let mut idx: Vec<usize> =
        (0..points.len()).filter(|&i| points[i].0.is_finite() && points[i].1.is_finite()).collect();
    // Sort by x ascending, then by goodness descending so the best point at each x comes first.
    idx.sort_by(|&a, &b| {
        let (xa, ya) = points[a];
        let (xb, yb) = points[b];
        xa.total_cmp(&xb).then((sign * yb).total_cmp(&(sign * ya))).then(a.cmp(&b))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    let mut i = 0;
    while i < idx.len() {
        let x = points[idx[i]].0;
        let top = sign * points[idx[i]].1;
        // Points sharing this x and the top goodness are mutual duplicates; the rest at this x are dominated.
        let mut j = i;
        while j < idx.len() && points[idx[j]].0 == x {
            let g = sign * points[idx[j]].1;
            if g == top && top > best {
                front.push(idx[j]);
            }
            j += 1;
        }
        best = best.max(top);
        i = j;
    }
    front
}

/// Quadratic reference for [`pareto_front`]: checks every pair for dominance.
pub fn pareto_front_ref(points: &[(f64, f64)], goal: ParetoGoal) -> Vec<usize> {
    let better = |a: f64, b: f64| match goal {
        ParetoGoal::MaximizeY => a > b,
        ParetoGoal::MinimizeY => a < b,
    };
    let finite = |p: (f64, f64)| p.0.is_finite() && p.1.is_finite();
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| finite(points[i]))
        .filter(|&i| {
            let (xi, yi) = points[i];
            !(0..points.len()).any(|j| {
                let (xj, yj) = points[j];
                finite(points[j]) && xj <= xi && (better(yj, yi) || yj == yi) && (xj < xi || better(yj, yi))
            })
        })
        .collect();
    front.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(a.cmp(&b)));
    front
}

fn check_finite(title: &str, what: &str, values: &[f64], log: bool) -> Result<()> {
    for &v in values {
        if !v.is_finite() {
            return Err(PlotError::NonFinite { title: title.into(), what: what.into(), value: v });
        }
        if log && v <= 0.0 {
            return Err(PlotError::NonPositiveOnLog { title: title.into(), what: what.into(), value: v });
        }
    }
    Ok(())
}

fn check_len(title: &str, what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(PlotError::LengthMismatch { title: title.into(), what: what.into(), expected, got });
    }
    Ok(())
}

/// Min and max over finite values, widened when equal (so a range is never empty).
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if lo == hi {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        return Some((lo - d, hi + d));
    }
    Some((lo, hi))
}

/// Pads a linear range by 5% on both sides.
fn pad_linear((lo, hi): (f64, f64)) -> (f64, f64) {
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

/// Pads a positive range by a factor on both sides (a margin that looks the same on a log axis).
fn pad_log((lo, hi): (f64, f64)) -> (f64, f64) {
    let lo = lo.max(f64::MIN_POSITIVE);
    let hi = hi.max(lo * 1.0001);
    let f = (hi / lo).powf(0.04).max(1.05);
    (lo / f, hi * f)
}

/// A compact label for a number: 3 significant digits, scientific notation outside 1e-3..1e5.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        // Three significant digits below 1 too: 0.00817, not 0.008.
        let decimals = (2 - a.log10().floor() as i32).max(3) as usize;
        format!("{v:.decimals$}")
    }
}

/// An axis tick label: integers without a decimal point (`10`, not `10.0`), other values with at most three
/// significant digits and no trailing zeros (`0.3`, not `0.30000000000000004`), scientific notation outside
/// 1e-3..1e5.
pub fn tick_label(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}").replace(".0e", "e");
    }
    if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        return format!("{}", v.round() as i64);
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Tick positions of a logarithmic axis over `[lo, hi]` (positive): powers of ten over many decades, 1-2-5 steps
/// over a few, and finer mantissas (or evenly spaced round values) within one decade, where an automatic log axis
/// would show no tick at all.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > lo && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let decades = (hi / lo).log10();
    let sets: [&[f64]; 4] = [&[1.0], &[1.0, 2.0, 5.0], &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], &[]];
    let start = if decades > 4.0 {
        0
    } else if decades > 1.0 {
        1
    } else {
        2
    };
    for mantissas in &sets[start..3] {
        let mut ticks = Vec::new();
        let (e0, e1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        for e in e0..=e1 {
            for &m in mantissas.iter() {
                let v = m * 10f64.powi(e);
                if v >= lo * (1.0 - 1e-12) && v <= hi * (1.0 + 1e-12) {
                    ticks.push(v);
                }
            }
        }
        if ticks.len() >= 3 {
            // Thin out crowded axes: at most about ten labels.
            let step = ticks.len().div_ceil(10);
            return ticks.into_iter().step_by(step).collect();
        }
    }
    // Narrower than the finest mantissas: the widest round step that still gives three ticks.
    let mag = 10f64.powi((hi - lo).log10().floor() as i32);
    for step in [5.0, 2.5, 2.0, 1.0, 0.5, 0.25, 0.2, 0.1].map(|m| m * mag) {
        let first = (lo / step).ceil();
        let ticks: Vec<f64> =
            (0..).map(|i| (first + i as f64) * step).take_while(|v| *v <= hi * (1.0 + 1e-12)).collect();
        if ticks.len() >= 3 {
            return ticks;
        }
    }
    vec![lo, hi]
}

/// Offsets (from each point, in pixels) of point labels so they overlap neither each other nor the points:
/// `points` are pixel positions, `sizes` the labels' (width, height). Each label takes the first of a few
/// candidate places (up-right first) that is free; a label with no free place keeps the first candidate.
pub fn place_labels(points: &[(i32, i32)], sizes: &[(i32, i32)]) -> Vec<(i32, i32)> {
    let overlaps = |a: (i32, i32, i32, i32), b: (i32, i32, i32, i32)| a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3;
    // Boxes of the points themselves (radius 5 plus a margin).
    let dots: Vec<(i32, i32, i32, i32)> = points.iter().map(|&(x, y)| (x - 6, y - 6, x + 6, y + 6)).collect();
    let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
    let mut out = Vec::with_capacity(points.len());
    for (i, (&(x, y), &(w, h))) in points.iter().zip(sizes).enumerate() {
        let candidates = [
            (6, -h - 4),
            (6, 4),
            (-6 - w, -h - 4),
            (-6 - w, 4),
            (6, -2 * h - 6),
            (6, h + 6),
            (-6 - w, -2 * h - 6),
            (-6 - w, h + 6),
            (-w / 2, -2 * h - 8),
            (-w / 2, h + 8),
        ];
        let free = |&(dx, dy): &(i32, i32)| {
            let b = (x + dx, y + dy, x + dx + w, y + dy + h);
            !placed.iter().any(|&p| overlaps(b, p)) && !dots.iter().enumerate().any(|(j, &d)| j != i && overlaps(b, d))
        };
        let (dx, dy) = candidates.iter().copied().find(free).unwrap_or(candidates[0]);
        placed.push((x + dx, y + dy, x + dx + w, y + dy + h));
        out.push((dx, dy));
    }
    out
}

fn tick(v: &f64) -> String {
    tick_label(*v)
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Mark {
    Line(RGBColor),
    Dot(RGBColor),
    Block(RGBColor),
}

/// Draws the title, and the subtitle under it in grey, across the top of `root`; returns the area below.
fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    subtitle: &str,
) -> std::result::Result<DrawingArea<DB, Shift>, String> {
    let h = if subtitle.is_empty() { 40 } else { 64 };
    let (top, rest) = root.split_vertically(h);
    let (w, _) = top.dim_in_pixel();
    let pos = Pos::new(HPos::Center, VPos::Top);
    top.draw(&Text::new(title.to_string(), ((w / 2) as i32, 10), TextStyle::from((FONT, 22).into_font()).pos(pos)))
        .map_err(backend_err)?;
    if !subtitle.is_empty() {
        let style = TextStyle::from((FONT, 15).into_font()).color(&RGBColor(70, 70, 70)).pos(pos);
        top.draw(&Text::new(subtitle.to_string(), ((w / 2) as i32, 38), style)).map_err(backend_err)?;
    }
    Ok(rest)
}

/// Width of the legend column for these labels (0 without entries).
fn legend_width(entries: &[(String, Mark)]) -> u32 {
    if entries.is_empty() {
        return 0;
    }
    let longest = entries.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0) as u32;
    (44 + 8 * longest).clamp(90, 300)
}

/// Splits a legend column off the right of `area`, draws the entries there (outside the plot, so they never
/// cover data) and returns the area left for the plot.
fn with_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(String, Mark)],
) -> std::result::Result<DrawingArea<DB, Shift>, String> {
    let lw = legend_width(entries);
    if lw == 0 {
        return Ok(area.clone());
    }
    let (w, _) = area.dim_in_pixel();
    let (plot, legend) = area.split_horizontally(w.saturating_sub(lw));
    let style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (label, mark)) in entries.iter().enumerate() {
        let y = 30 + 24 * i as i32;
        match *mark {
            Mark::Line(c) => legend.draw(&PathElement::new(vec![(4, y), (26, y)], c.stroke_width(2))),
            Mark::Dot(c) => legend.draw(&Circle::new((15, y), 5, c.filled())),
            Mark::Block(c) => legend.draw(&Rectangle::new([(8, y - 6), (22, y + 6)], c.filled())),
        }
        .map_err(backend_err)?;
        legend.draw(&Text::new(label.clone(), (34, y), style.clone())).map_err(backend_err)?;
    }
    Ok(plot)
}

/// The viridis colour map at `t` in [0, 1] (matplotlib's default map, 8 control points linearly interpolated).
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 8] = [
        (68, 1, 84),
        (70, 50, 127),
        (54, 92, 141),
        (39, 127, 143),
        (31, 162, 136),
        (74, 194, 110),
        (160, 219, 57),
        (254, 232, 37),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A chart that can draw itself on any plotters backend.
trait Draw {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String>;
}

fn backend_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> String {
    e.to_string()
}

/// Draws `chart` twice, to `<stem>.svg` and `<stem>.png`.
fn render<D: Draw>(chart: &D, stem: &Path) -> Result<[PathBuf; 2]> {
    if let Some(parent) = stem.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| PlotError::Io { path: parent.to_path_buf(), source })?;
    }
    let svg = with_extension(stem, "svg");
    let png = with_extension(stem, "png");
    let size = chart.size();
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        chart.draw(&root).map_err(|message| PlotError::Backend { path: svg.clone(), message })?;
        root.present().map_err(|e| PlotError::Backend { path: svg.clone(), message: e.to_string() })?;
    }
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        chart.draw(&root).map_err(|message| PlotError::Backend { path: png.clone(), message })?;
        root.present().map_err(|e| PlotError::Backend { path: png.clone(), message: e.to_string() })?;
    }
    Ok([svg, png])
}

fn with_extension(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Writes a line chart as `<stem>.svg` and `<stem>.png`.
pub fn line_chart(chart: &LineChart, stem: &Path) -> Result<[PathBuf; 2]> {
    let t = &chart.title;
    if chart.series.iter().all(|s| s.x.is_empty()) {
        return Err(PlotError::Empty { title: t.clone(), what: "every series is empty".into() });
    }
    for s in &chart.series {
        check_len(t, &format!("y of series `{}`", s.label), s.x.len(), s.y.len())?;
        check_finite(t, &format!("x of series `{}`", s.label), &s.x, false)?;
        check_finite(t, &format!("y of series `{}`", s.label), &s.y, chart.log_y)?;
        if let Some((lo, hi)) = &s.band {
            check_len(t, &format!("band low of series `{}`", s.label), s.x.len(), lo.len())?;
            check_len(t, &format!("band high of series `{}`", s.label), s.x.len(), hi.len())?;
            check_finite(t, &format!("band of series `{}`", s.label), lo, chart.log_y)?;
            check_finite(t, &format!("band of series `{}`", s.label), hi, chart.log_y)?;
        }
    }
    if let Some(h) = chart.hline {
        check_finite(t, "reference line", &[h], chart.log_y)?;
    }
    render(chart, stem)
}

impl Draw for LineChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(backend_err)?;
        let xr = pad_linear(extent(self.series.iter().flat_map(|s| s.x.iter().copied())).unwrap_or((0.0, 1.0)));
        let ys = self.series.iter().flat_map(|s| {
            let band = s.band.iter().flat_map(|(lo, hi)| lo.iter().chain(hi.iter()).copied());
            s.y.iter().copied().chain(band)
        });
        let yr = extent(ys.chain(self.hline)).unwrap_or((1.0, 10.0));
        let entries: Vec<(String, Mark)> = self
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.label.is_empty())
            .map(|(i, s)| (s.label.clone(), Mark::Line(palette(i))))
            .collect();
        let area = with_legend(&titled(root, &self.title, &self.subtitle)?, &entries)?;
        let mut builder = ChartBuilder::on(&area);
        builder.margin(14).x_label_area_size(46).y_label_area_size(72);

        macro_rules! body {
            ($chart:ident) => {{
                $chart
                    .configure_mesh()
                    .x_desc(self.x_label.as_str())
                    .y_desc(self.y_label.as_str())
                    .x_label_formatter(&tick)
                    .y_label_formatter(&tick)
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .light_line_style(RGBColor(240, 240, 240))
                    .max_light_lines(2)
                    .draw()
                    .map_err(backend_err)?;
                for (i, s) in self.series.iter().enumerate() {
                    let color = palette(i);
                    if let Some((lo, hi)) = &s.band {
                        let mut poly: Vec<(f64, f64)> = s.x.iter().copied().zip(hi.iter().copied()).collect();
                        poly.extend(s.x.iter().copied().zip(lo.iter().copied()).rev());
                        $chart
                            .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                            .map_err(backend_err)?;
                    }
                    $chart
                        .draw_series(LineSeries::new(
                            s.x.iter().copied().zip(s.y.iter().copied()),
                            color.stroke_width(2),
                        ))
                        .map_err(backend_err)?;
                }
                if let Some(h) = self.hline {
                    $chart
                        .draw_series(DashedLineSeries::new(vec![(xr.0, h), (xr.1, h)], 8, 5, BLACK.stroke_width(1)))
                        .map_err(backend_err)?;
                }
            }};
        }

        if self.log_y {
            let (lo, hi) = pad_log(yr);
            let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
            let mut chart = builder.build_cartesian_2d(xr.0..xr.1, y).map_err(backend_err)?;
            body!(chart);
        } else {
            let (lo, hi) = pad_linear(yr);
            let mut chart = builder.build_cartesian_2d(xr.0..xr.1, lo..hi).map_err(backend_err)?;
            body!(chart);
        }
        Ok(())
    }
}

/// Writes grouped bars as `<stem>.svg` and `<stem>.png`.
pub fn bar_chart(chart: &BarChart, stem: &Path) -> Result<[PathBuf; 2]> {
    let t = &chart.title;
    if chart.categories.is_empty() || chart.groups.is_empty() {
        return Err(PlotError::Empty { title: t.clone(), what: "no categories or no groups".into() });
    }
    for g in &chart.groups {
        check_len(t, &format!("group `{}`", g.label), chart.categories.len(), g.values.len())?;
        check_finite(t, &format!("group `{}`", g.label), &g.values, chart.log_y)?;
    }
    if let Some(h) = chart.hline {
        check_finite(t, "reference line", &[h], chart.log_y)?;
    }
    render(chart, stem)
}

impl Draw for BarChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(backend_err)?;
        let n = self.categories.len();
        let values = self.groups.iter().flat_map(|g| g.values.iter().copied());
        let yr = extent(values.chain(self.hline)).unwrap_or((0.0, 1.0));
        let ng = self.groups.len() as f64;
        let width = 0.8 / ng;
        let cats = &self.categories;
        let x_fmt = move |v: &f64| {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < cats.len() {
                cats[r as usize].clone()
            } else {
                String::new()
            }
        };
        let entries: Vec<(String, Mark)> = self
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.label.is_empty())
            .map(|(i, g)| (g.label.clone(), Mark::Block(palette(i))))
            .collect();
        let area = with_legend(&titled(root, &self.title, &self.subtitle)?, &entries)?;
        let mut builder = ChartBuilder::on(&area);
        builder.margin(14).x_label_area_size(46).y_label_area_size(72);

        macro_rules! body {
            ($chart:ident, $base:expr) => {{
                $chart
                    .configure_mesh()
                    .x_desc(self.x_label.as_str())
                    .y_desc(self.y_label.as_str())
                    .x_labels(n.min(40))
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&tick)
                    .disable_x_mesh()
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .light_line_style(RGBColor(240, 240, 240))
                    .max_light_lines(2)
                    .draw()
                    .map_err(backend_err)?;
                for (gi, g) in self.groups.iter().enumerate() {
                    let color = palette(gi);
                    let base = $base;
                    $chart
                        .draw_series(g.values.iter().enumerate().map(|(ci, &v)| {
                            let x0 = ci as f64 - 0.4 + gi as f64 * width;
                            Rectangle::new([(x0, base), (x0 + width * 0.92, v)], color.filled())
                        }))
                        .map_err(backend_err)?;
                }
                if let Some(h) = self.hline {
                    $chart
                        .draw_series(DashedLineSeries::new(
                            vec![(-0.6, h), (n as f64 - 0.4, h)],
                            8,
                            5,
                            BLACK.stroke_width(2),
                        ))
                        .map_err(backend_err)?;
                }
            }};
        }

        let xr = -0.6..(n as f64 - 0.4);
        if self.log_y {
            let (lo, hi) = pad_log(yr);
            let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
            let mut chart = builder.build_cartesian_2d(xr, y).map_err(backend_err)?;
            body!(chart, lo);
        } else {
            let (lo, hi) = pad_linear((yr.0.min(0.0), yr.1.max(0.0)));
            let mut chart = builder.build_cartesian_2d(xr, lo..hi).map_err(backend_err)?;
            body!(chart, 0.0);
        }
        Ok(())
    }
}

/// Writes a heatmap with a colour bar as `<stem>.svg` and `<stem>.png`.
pub fn heatmap(chart: &Heatmap, stem: &Path) -> Result<[PathBuf; 2]> {
    let t = &chart.title;
    if chart.values.is_empty() || chart.values[0].is_empty() {
        return Err(PlotError::Empty { title: t.clone(), what: "no cells".into() });
    }
    check_len(t, "row names", chart.values.len(), chart.row_names.len())?;
    check_len(t, "column names", chart.values[0].len(), chart.col_names.len())?;
    for (r, row) in chart.values.iter().enumerate() {
        check_len(t, &format!("row {r}"), chart.col_names.len(), row.len())?;
        if chart.log_color {
            if let Some(&v) = row.iter().find(|v| v.is_finite() && **v <= 0.0) {
                return Err(PlotError::NonPositiveOnLog { title: t.clone(), what: format!("row {r}"), value: v });
            }
        }
    }
    if extent(chart.values.iter().flatten().copied()).is_none() {
        return Err(PlotError::Empty { title: t.clone(), what: "every cell is non-finite".into() });
    }
    render(chart, stem)
}

impl Heatmap {
    fn color_value(&self, v: f64) -> f64 {
        if self.log_color {
            v.log10()
        } else {
            v
        }
    }
}

impl Draw for Heatmap {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(backend_err)?;
        let nr = self.values.len() as i32;
        let nc = self.values[0].len() as i32;
        let (vlo, vhi) = extent(self.values.iter().flatten().map(|&v| self.color_value(v))).unwrap_or((0.0, 1.0));
        let norm = |v: f64| (self.color_value(v) - vlo) / (vhi - vlo);
        let area = titled(root, &self.title, &self.subtitle)?;
        let (w, h) = area.dim_in_pixel();
        let (main, bar) = area.split_horizontally(w.saturating_sub(130));

        let cols = &self.col_names;
        let rows = &self.row_names;
        let x_fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) if *i >= 0 && (*i as usize) < cols.len() => cols[*i as usize].clone(),
            _ => String::new(),
        };
        let y_fmt = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) if *i >= 0 && (*i as usize) < rows.len() => rows[*i as usize].clone(),
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(&main)
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(72)
            // Integer ranges are inclusive in plotters, so `0..n - 1` gives exactly `n` segments.
            .build_cartesian_2d((0..nc - 1).into_segmented(), (0..nr - 1).into_segmented())
            .map_err(backend_err)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(nc as usize)
            .y_labels(nr as usize)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .disable_mesh()
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(backend_err)?;
        let grey = RGBColor(200, 200, 200);
        let cell = |c: i32, r: i32| -> [(SegmentValue<i32>, SegmentValue<i32>); 2] {
            [(SegmentValue::Exact(c), SegmentValue::Exact(r)), (SegmentValue::Exact(c + 1), SegmentValue::Exact(r + 1))]
        };
        let cells: Vec<(i32, i32, f64)> = (0..nr)
            .flat_map(|r| (0..nc).map(move |c| (c, r)))
            .map(|(c, r)| (c, r, self.values[r as usize][c as usize]))
            .collect();
        chart
            .draw_series(cells.iter().map(|&(c, r, v)| {
                let color = if v.is_finite() { viridis(norm(v)) } else { grey };
                Rectangle::new(cell(c, r), color.filled())
            }))
            .map_err(backend_err)?;
        if self.cell_labels {
            // Shrink the text on crowded grids so labels stay inside their cells.
            let font_px = if nc <= 10 && nr <= 12 {
                14
            } else if nc <= 20 {
                11
            } else {
                8
            };
            chart
                .draw_series(cells.iter().map(|&(c, r, v)| {
                    let light = v.is_finite() && norm(v) < 0.55;
                    let color: &'static RGBColor = if light { &WHITE } else { &BLACK };
                    let style = TextStyle::from((FONT, font_px).into_font())
                        .color(color)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    Text::new(format_value(v), (SegmentValue::CenterOf(c), SegmentValue::CenterOf(r)), style)
                }))
                .map_err(backend_err)?;
        }
        if self.mark_diagonal {
            chart
                .draw_series((0..nr.min(nc)).map(|i| Rectangle::new(cell(i, i), RGBColor(220, 30, 30).stroke_width(3))))
                .map_err(backend_err)?;
        }

        // The key of the outlined diagonal, under the colour bar.
        let diagonal_key = self.mark_diagonal && !self.diagonal_label.is_empty();
        if diagonal_key {
            let y = h as i32 - 34;
            bar.draw(&Rectangle::new([(10, y - 8), (26, y + 8)], RGBColor(220, 30, 30).stroke_width(3)))
                .map_err(backend_err)?;
            let style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
            bar.draw(&Text::new(self.diagonal_label.clone(), (34, y), style)).map_err(backend_err)?;
        }
        // The colour bar: a column of thin rectangles spanning the value range, labelled in data units.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(26)
            .margin_bottom(if diagonal_key { 76 } else { 60 })
            .margin_right(10)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..1.0, vlo..vhi)
            .map_err(backend_err)?;
        let log = self.log_color;
        let cb_fmt = move |v: &f64| tick_label(if log { 10f64.powf(*v) } else { *v });
        cb.configure_mesh()
            .disable_x_axis()
            .disable_mesh()
            .y_labels(6)
            .y_label_formatter(&cb_fmt)
            .y_desc(self.color_label.as_str())
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(backend_err)?;
        let steps = 64;
        cb.draw_series((0..steps).map(|i| {
            let a = vlo + (vhi - vlo) * i as f64 / steps as f64;
            let b = vlo + (vhi - vlo) * (i + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], viridis((i as f64 + 0.5) / steps as f64).filled())
        }))
        .map_err(backend_err)?;
        Ok(())
    }
}

/// Writes a scatter plot with its Pareto front as `<stem>.svg` and `<stem>.png`.
pub fn scatter_pareto(chart: &Scatter, stem: &Path) -> Result<[PathBuf; 2]> {
    let t = &chart.title;
    if chart.points.is_empty() {
        return Err(PlotError::Empty { title: t.clone(), what: "no points".into() });
    }
    let xs: Vec<f64> = chart.points.iter().map(|p| p.x).collect();
    let ys: Vec<f64> = chart.points.iter().map(|p| p.y).collect();
    check_finite(t, "x", &xs, false)?;
    check_finite(t, "y", &ys, chart.log_y)?;
    if let Some((y, _)) = &chart.reference {
        check_finite(t, "reference line", &[*y], chart.log_y)?;
    }
    render(chart, stem)
}

impl Draw for Scatter {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(backend_err)?;
        let xr = pad_linear(extent(self.points.iter().map(|p| p.x)).unwrap_or((0.0, 1.0)));
        let yr =
            extent(self.points.iter().map(|p| p.y).chain(self.reference.as_ref().map(|r| r.0))).unwrap_or((0.0, 1.0));
        let pts: Vec<(f64, f64)> = self.points.iter().map(|p| (p.x, p.y)).collect();
        let front: Vec<(f64, f64)> = match self.pareto {
            Some(goal) => pareto_front(&pts, goal).into_iter().map(|i| pts[i]).collect(),
            None => Vec::new(),
        };
        // Legend entries only for what is drawn: the front when there is one, groups that have points.
        let n_groups = self.points.iter().map(|p| p.group + 1).max().unwrap_or(1);
        let mut entries: Vec<(String, Mark)> = Vec::new();
        if front.len() > 1 {
            entries.push(("Pareto front".into(), Mark::Line(BLACK)));
        }
        let grey = RGBColor(110, 110, 110);
        if let Some((_, label)) = &self.reference {
            entries.push((label.clone(), Mark::Line(grey)));
        }
        for g in 0..n_groups {
            if let Some(name) = self.group_names.get(g).filter(|_| self.points.iter().any(|p| p.group == g)) {
                entries.push((name.clone(), Mark::Dot(palette(g))));
            }
        }
        let area = with_legend(&titled(root, &self.title, &self.subtitle)?, &entries)?;
        let mut builder = ChartBuilder::on(&area);
        builder.margin(14).x_label_area_size(46).y_label_area_size(72);
        let label_style = TextStyle::from((FONT, 12).into_font()).color(&BLACK);

        macro_rules! body {
            ($chart:ident) => {{
                $chart
                    .configure_mesh()
                    .x_desc(self.x_label.as_str())
                    .y_desc(self.y_label.as_str())
                    .x_label_formatter(&tick)
                    .y_label_formatter(&tick)
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .light_line_style(RGBColor(240, 240, 240))
                    .max_light_lines(2)
                    .draw()
                    .map_err(backend_err)?;
                if let Some((y, _)) = &self.reference {
                    $chart
                        .draw_series(DashedLineSeries::new(vec![(xr.0, *y), (xr.1, *y)], 8, 5, grey.stroke_width(2)))
                        .map_err(backend_err)?;
                }
                if front.len() > 1 {
                    $chart
                        .draw_series(LineSeries::new(front.iter().copied(), BLACK.stroke_width(2)))
                        .map_err(backend_err)?;
                }
                for g in 0..n_groups {
                    let color = palette(g);
                    $chart
                        .draw_series(
                            self.points
                                .iter()
                                .filter(|p| p.group == g)
                                .map(|p| Circle::new((p.x, p.y), 5, color.filled())),
                        )
                        .map_err(backend_err)?;
                }
                // Labels beside their points, placed so they cover neither other labels nor points.
                let labelled: Vec<&ScatterPoint> = self.points.iter().filter(|p| p.label.is_some()).collect();
                let pixels: Vec<(i32, i32)> = labelled.iter().map(|p| $chart.backend_coord(&(p.x, p.y))).collect();
                let sizes: Vec<(i32, i32)> = labelled
                    .iter()
                    .map(|p| (7 * p.label.as_ref().map_or(0, |l| l.chars().count()) as i32, 12))
                    .collect();
                let offsets = place_labels(&pixels, &sizes);
                $chart
                    .draw_series(labelled.iter().zip(offsets).map(|(p, off)| {
                        let l = p.label.clone().unwrap_or_default();
                        EmptyElement::at((p.x, p.y)) + Text::new(l, off, label_style.clone())
                    }))
                    .map_err(backend_err)?;
            }};
        }

        if self.log_y {
            let (lo, hi) = pad_log(yr);
            let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
            let mut chart = builder.build_cartesian_2d(xr.0..xr.1, y).map_err(backend_err)?;
            body!(chart);
        } else {
            let (lo, hi) = pad_linear(yr);
            let mut chart = builder.build_cartesian_2d(xr.0..xr.1, lo..hi).map_err(backend_err)?;
            body!(chart);
        }
        Ok(())
    }
}
