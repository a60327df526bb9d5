//! The chart functions write real SVG and PNG files: decode them and check size and drawn colours.

use std::path::{Path, PathBuf};

use adaquant_analysis::plot::{
    bar_chart, format_value, heatmap, line_chart, pareto_front, pareto_front_ref, scatter_pareto, viridis, BarChart,
    BarGroup, Heatmap, LineChart, ParetoGoal, PlotError, Scatter, ScatterPoint, Series, PALETTE,
};
use plotters::style::RGBColor;
use rand::{Rng, SeedableRng};

fn out_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("adaquant-plot-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Decodes the PNG, checks its size and returns its RGB pixels.
fn decode_png(path: &Path, size: (u32, u32)) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    // The IHDR chunk follows the signature: length, type, then width and height big-endian.
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), size);
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), size);
    img
}

/// Counts pixels within a small distance of `c`.
fn count_color(img: &image::RgbImage, c: RGBColor) -> usize {
    img.pixels()
        .filter(|p| {
            let d = |a: u8, b: u8| (a as i32 - b as i32).abs();
            d(p[0], c.0) + d(p[1], c.1) + d(p[2], c.2) <= 6
        })
        .count()
}

fn read_svg(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap();
    assert!(s.contains("<svg"), "{} is not an SVG", path.display());
    s
}

#[test]
fn line_chart_log_band_writes_svg_and_png() {
    let dir = out_dir("line");
    let x: Vec<f64> = (5..64).map(|i| i as f64).collect();
    let y: Vec<f64> = x.iter().map(|i| 100.0 * (-0.08 * i).exp()).collect();
    let lo: Vec<f64> = y.iter().map(|v| v * 0.5).collect();
    let hi: Vec<f64> = y.iter().map(|v| v * 2.0).collect();
    let chart = LineChart {
        title: "Spectrum test".into(),
        x_label: "index".into(),
        y_label: "sigma".into(),
        log_y: true,
        series: vec![
            Series::new("keys", x.clone(), y.clone()).with_band(lo, hi),
            Series::new("values", x.clone(), y.iter().map(|v| v / 10.0).collect()),
        ],
        size: (640, 400),
        ..LineChart::default()
    };
    let [svg, png] = line_chart(&chart, &dir.join("spectrum")).unwrap();
    assert_eq!(svg, dir.join("spectrum.svg"));
    assert_eq!(png, dir.join("spectrum.png"));
    let s = read_svg(&svg);
    assert!(s.contains("Spectrum test") && s.contains("keys") && s.contains("values"));
    let img = decode_png(&png, (640, 400));
    assert!(count_color(&img, PALETTE[0]) > 100, "the first series' line is missing");
    assert!(count_color(&img, PALETTE[1]) > 100, "the second series' line is missing");
}

#[test]
fn bar_chart_with_reference_line() {
    let dir = out_dir("bar");
    let chart = BarChart {
        title: "ratio".into(),
        categories: (0..30).map(|i| i.to_string()).collect(),
        groups: vec![
            BarGroup { label: "fro".into(), values: (0..30).map(|i| 0.5 + i as f64 * 0.05).collect() },
            BarGroup { label: "spec".into(), values: (0..30).map(|i| 2.0 - i as f64 * 0.03).collect() },
        ],
        hline: Some(1.0),
        size: (800, 500),
        ..BarChart::default()
    };
    let [svg, png] = bar_chart(&chart, &dir.join("nested/ratio")).unwrap();
    assert!(read_svg(&svg).contains("spec"));
    let img = decode_png(&png, (800, 500));
    assert!(count_color(&img, PALETTE[0]) > 500);
    assert!(count_color(&img, PALETTE[1]) > 500);
    // The same chart on a log axis.
    let log = BarChart { log_y: true, ..chart };
    let [_, png] = bar_chart(&log, &dir.join("ratio-log")).unwrap();
    assert!(count_color(&decode_png(&png, (800, 500)), PALETTE[1]) > 500);
}

#[test]
fn heatmap_with_labels_colour_bar_and_diagonal() {
    let dir = out_dir("heat");
    let bits = ["2", "3", "4", "8"];
    let values: Vec<Vec<f64>> = (0..4)
        .map(|r| (0..4).map(|c| if r == 0 && c == 3 { f64::NAN } else { 20.0 + 40.0 / (1 + r + c) as f64 }).collect())
        .collect();
    let chart = Heatmap {
        title: "PPL grid".into(),
        x_label: "V bits".into(),
        y_label: "K bits".into(),
        col_names: bits.iter().map(|s| s.to_string()).collect(),
        row_names: bits.iter().map(|s| s.to_string()).collect(),
        values: values.clone(),
        mark_diagonal: true,
        color_label: "perplexity".into(),
        size: (700, 560),
        ..Heatmap::default()
    };
    let [svg, png] = heatmap(&chart, &dir.join("grid")).unwrap();
    let s = read_svg(&svg);
    assert!(s.contains(&format_value(values[1][2])), "cell label missing");
    assert!(s.contains("n/a"), "the missing cell is not marked");
    let img = decode_png(&png, (700, 560));
    assert!(count_color(&img, RGBColor(220, 30, 30)) > 200, "diagonal marks missing");
    // The colour bar spans the whole map, so both ends of viridis appear.
    assert!(count_color(&img, viridis(0.0)) > 50);
    assert!(count_color(&img, viridis(1.0)) > 50);
    // A single cell is a valid heatmap too.
    let one = Heatmap {
        col_names: vec!["a".into()],
        row_names: vec!["b".into()],
        values: vec![vec![3.0]],
        size: (300, 200),
        ..Heatmap::default()
    };
    let [_, png] = heatmap(&one, &dir.join("one")).unwrap();
    decode_png(&png, (300, 200));
}

#[test]
fn scatter_with_pareto_front() {
    let dir = out_dir("scatter");
    let points: Vec<ScatterPoint> = [(2.0, 0.5), (3.0, 0.7), (4.0, 0.68), (5.0, 0.8), (8.0, 0.81), (6.0, 0.6)]
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| ScatterPoint { x, y, label: Some(format!("cfg{i}")), group: i % 2 })
        .collect();
    let chart = Scatter {
        title: "accuracy vs bits".into(),
        points,
        group_names: vec!["a".into(), "b".into()],
        size: (640, 480),
        ..Scatter::default()
    };
    let [svg, png] = scatter_pareto(&chart, &dir.join("pareto")).unwrap();
    let s = read_svg(&svg);
    assert!(s.contains("Pareto front") && s.contains("cfg3"));
    let img = decode_png(&png, (640, 480));
    assert!(count_color(&img, PALETTE[0]) > 50 && count_color(&img, PALETTE[1]) > 50);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = out_dir("errors");
    let nan = LineChart { series: vec![Series::new("a", vec![1.0, 2.0], vec![1.0, f64::NAN])], ..LineChart::default() };
    assert!(matches!(line_chart(&nan, &dir.join("a")), Err(PlotError::NonFinite { .. })));
    let zero = LineChart {
        log_y: true,
        series: vec![Series::new("a", vec![1.0, 2.0], vec![1.0, 0.0])],
        ..LineChart::default()
    };
    assert!(matches!(line_chart(&zero, &dir.join("b")), Err(PlotError::NonPositiveOnLog { .. })));
    let short = LineChart { series: vec![Series::new("a", vec![1.0, 2.0], vec![1.0])], ..LineChart::default() };
    assert!(matches!(line_chart(&short, &dir.join("c")), Err(PlotError::LengthMismatch { expected: 2, got: 1, .. })));
    assert!(matches!(line_chart(&LineChart::default(), &dir.join("d")), Err(PlotError::Empty { .. })));
    let ragged = Heatmap {
        col_names: vec!["a".into(), "b".into()],
        row_names: vec!["x".into(), "y".into()],
        values: vec![vec![1.0, 2.0], vec![3.0]],
        ..Heatmap::default()
    };
    assert!(matches!(heatmap(&ragged, &dir.join("e")), Err(PlotError::LengthMismatch { .. })));
    let bars = BarChart {
        categories: vec!["a".into()],
        groups: vec![BarGroup { label: "g".into(), values: vec![1.0, 2.0] }],
        ..BarChart::default()
    };
    assert!(matches!(bar_chart(&bars, &dir.join("f")), Err(PlotError::LengthMismatch { .. })));
    assert!(matches!(scatter_pareto(&Scatter::default(), &dir.join("g")), Err(PlotError::Empty { .. })));
    // Nothing was written for the rejected charts.
    assert!(!dir.join("a.svg").exists() && !dir.join("a.png").exists());
}

#[test]
fn pareto_front_matches_quadratic_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for &n in &[1usize, 2, 3, 7, 17, 54, 97] {
        for _ in 0..20 {
            // Small integer coordinates make ties in x, in y and exact duplicates common.
            let pts: Vec<(f64, f64)> = (0..n)
                .map(|_| {
                    let x = rng.random_range(0..6) as f64;
                    let y = if rng.random_bool(0.05) { f64::NAN } else { rng.random_range(0..6) as f64 };
                    (x, y)
                })
                .collect();
            for goal in [ParetoGoal::MaximizeY, ParetoGoal::MinimizeY] {
                assert_eq!(pareto_front(&pts, goal), pareto_front_ref(&pts, goal), "n={n} goal={goal:?} {pts:?}");
            }
        }
    }
    let pts = [(2.0, 0.5), (3.0, 0.7), (4.0, 0.68), (5.0, 0.8)];
    assert_eq!(pareto_front(&pts, ParetoGoal::MaximizeY), vec![0, 1, 3]);
    assert_eq!(pareto_front(&pts, ParetoGoal::MinimizeY), vec![0]);
}

#[test]
fn value_format_and_colour_map() {
    assert_eq!(format_value(0.0), "0");
    assert_eq!(format_value(23.456), "23.5");
    assert_eq!(format_value(1.2345), "1.23");
    assert_eq!(format_value(0.012345), "0.0123");
    assert_eq!(format_value(0.0081749), "0.00817");
    assert_eq!(format_value(0.195), "0.195");
    assert_eq!(format_value(123456.0), "1.23e5");
    assert_eq!(format_value(f64::NAN), "n/a");
    assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
    assert_eq!(viridis(1.0), RGBColor(254, 232, 37));
    assert_eq!(viridis(-3.0), viridis(0.0));
    assert_eq!(viridis(2.0), viridis(1.0));
}

/// The `cx` of every `<circle>` in an SVG.
fn circle_xs(svg: &str) -> Vec<f64> {
    svg.split("<circle").skip(1).filter_map(|c| c.split("cx=\"").nth(1)?.split('"').next()?.parse().ok()).collect()
}

/// The text of every `<text>` element in an SVG.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split("</text>").next()?.trim().to_string()))
        .collect()
}

#[test]
fn tick_labels_carry_no_float_noise() {
    use adaquant_analysis::plot::tick_label;
    assert_eq!(tick_label(0.30000000000000004), "0.3");
    assert_eq!(tick_label(10.0), "10");
    assert_eq!(tick_label(64.0), "64");
    assert_eq!(tick_label(0.123456), "0.123");
    assert_eq!(tick_label(12.345), "12.3");
    assert_eq!(tick_label(0.05), "0.05");
    assert_eq!(tick_label(2.5e-5), "2.5e-5");
    assert_eq!(tick_label(1e-4), "1e-4");
    assert_eq!(tick_label(-0.7000000000000001), "-0.7");
    assert_eq!(tick_label(0.0), "0");
}

#[test]
fn log_ticks_label_every_span() {
    use adaquant_analysis::plot::log_ticks;
    assert_eq!(log_ticks(1e-5, 10.0), [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]);
    assert_eq!(log_ticks(0.01, 1.0), [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]);
    let narrow = log_ticks(0.238, 0.47);
    assert!(narrow.len() >= 3 && narrow.iter().all(|&v| (0.238..=0.47).contains(&v)), "{narrow:?}");
    let tiny = log_ticks(23.5, 24.1);
    assert!(tiny.len() >= 3 && tiny.iter().all(|&v| (23.5..=24.1).contains(&v)), "{tiny:?}");
    assert!(log_ticks(0.0, 1.0).is_empty());
}

#[test]
fn scatter_legend_sits_beside_the_plot_and_lists_only_drawn_groups() {
    let dir = out_dir("legend");
    // A log axis spanning less than a decade (the KL plot) and a point in the upper right corner, where
    // the old legend sat.
    let points: Vec<ScatterPoint> = [(10.0, 0.25, 1), (11.0, 0.3, 1), (12.0, 0.41, 2), (14.4, 0.45, 1)]
        .iter()
        .map(|&(x, y, group)| ScatterPoint { x, y, label: Some(format!("p{x}")), group })
        .collect();
    let chart = Scatter {
        title: "mean KL vs bits per element".into(),
        subtitle: "toy model on toy text".into(),
        points,
        group_names: vec!["full".into(), "fixed".into(), "budget".into()],
        pareto: Some(ParetoGoal::MinimizeY),
        log_y: true,
        ..Scatter::default()
    };
    let [svg, _] = scatter_pareto(&chart, &dir.join("legend")).unwrap();
    let s = read_svg(&svg);
    let t = texts(&s);
    assert!(t.iter().any(|x| x == "toy model on toy text"), "{t:?}");
    assert!(t.iter().any(|x| x == "fixed") && t.iter().any(|x| x == "budget"), "{t:?}");
    assert!(!t.iter().any(|x| x == "full"), "no full-precision point, no legend entry: {t:?}");
    for x in &t {
        assert!(!x.contains("0000000") && !x.contains("9999999"), "float noise in a label: {x}");
    }
    // Less than a decade on a log axis still gets labelled ticks.
    for want in ["0.3", "0.4"] {
        assert!(t.iter().any(|x| x == want), "no {want} tick: {t:?}");
    }
    // Four data points left of the legend column, two legend dots in it (the front is a line).
    let xs = circle_xs(&s);
    assert_eq!(xs.len(), 6, "{xs:?}");
    let legend_left = xs.iter().cloned().fold(f64::MIN, f64::max) - 20.0;
    let data: Vec<f64> = xs.iter().cloned().filter(|&x| x < legend_left).collect();
    assert_eq!(data.len(), 4, "{xs:?}");
    let legend_texts_x: Vec<f64> = s
        .split("<text")
        .filter(|e| e.contains(">fixed<") || e.contains(">Pareto front<"))
        .filter_map(|e| e.split("x=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    let rightmost_point = data.iter().cloned().fold(f64::MIN, f64::max);
    assert!(legend_texts_x.iter().all(|&x| x > rightmost_point + 5.0), "{legend_texts_x:?} vs {rightmost_point}");
    // A reference line (the full-precision value) is drawn and named in the legend; on a log axis it must be
    // positive like the points.
    let with_ref = Scatter { reference: Some((0.2, "full precision".into())), ..chart.clone() };
    let [svg, _] = scatter_pareto(&with_ref, &dir.join("reference")).unwrap();
    assert!(texts(&read_svg(&svg)).iter().any(|x| x == "full precision"));
    let bad = Scatter { reference: Some((0.0, "zero".into())), ..chart };
    assert!(matches!(scatter_pareto(&bad, &dir.join("bad")), Err(PlotError::NonPositiveOnLog { .. })));
}

#[test]
fn heatmap_explains_its_outline_and_line_charts_label_integers() {
    let dir = out_dir("keys");
    let chart = Heatmap {
        title: "KL".into(),
        subtitle: "model on text".into(),
        col_names: vec!["2".into(), "4".into()],
        row_names: vec!["2".into(), "4".into()],
        values: vec![vec![1.0, 0.5], vec![0.9, 0.1]],
        mark_diagonal: true,
        diagonal_label: "K = V".into(),
        ..Heatmap::default()
    };
    let [svg, png] = heatmap(&chart, &dir.join("heat")).unwrap();
    let t = texts(&read_svg(&svg));
    assert!(t.iter().any(|x| x == "K = V") && t.iter().any(|x| x == "model on text"), "{t:?}");
    decode_png(&png, chart.size);
    let x: Vec<f64> = (1..=64).map(f64::from).collect();
    let y: Vec<f64> = x.iter().map(|i| 10.0 / i).collect();
    let line = LineChart { log_y: true, series: vec![Series::new("K", x, y)], ..LineChart::default() };
    let [svg, _] = line_chart(&line, &dir.join("spectrum")).unwrap();
    let t = texts(&read_svg(&svg));
    assert!(t.iter().any(|x| x == "10") && !t.iter().any(|x| x.ends_with(".0")), "{t:?}");
}

#[test]
fn point_labels_avoid_each_other_and_the_points() {
    use adaquant_analysis::plot::place_labels;
    type Box4 = (i32, i32, i32, i32);
    let overlap = |a: Box4, b: Box4| a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3;
    // Points sharing a place (K3V3 and K4V2 at 10.625 bits) in a crowded row, with seeded jitter.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for n in [2usize, 3, 5, 8] {
        let pts: Vec<(i32, i32)> = (0..n)
            .map(|i| (200 + 40 * (i as i32 / 2) + rng.random_range(0..3), 300 + rng.random_range(0..3)))
            .collect();
        let sizes = vec![(35, 12); n];
        let offs = place_labels(&pts, &sizes);
        let b: Vec<Box4> = pts
            .iter()
            .zip(&sizes)
            .zip(&offs)
            .map(|((&(x, y), &(w, h)), &(dx, dy))| (x + dx, y + dy, x + dx + w, y + dy + h))
            .collect();
        for i in 0..n {
            for j in 0..i {
                assert!(!overlap(b[i], b[j]), "n {n}: labels {i} and {j} overlap: {b:?}");
            }
            for (k, &(x, y)) in pts.iter().enumerate() {
                assert!(k == i || !overlap(b[i], (x - 6, y - 6, x + 6, y + 6)), "n {n}: label {i} covers point {k}");
            }
        }
    }
    // A lone point keeps the first place: up and to the right.
    assert_eq!(place_labels(&[(10, 10)], &[(20, 12)]), [(6, -16)]);
}
