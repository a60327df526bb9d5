//! What a new user meets first: grids are checked before any work, and rows where nothing was quantized say so.

use std::path::PathBuf;

use adaquant_eval::data::SplitMix;
use adaquant_eval::lm::{LanguageModel, ToyLm};
use adaquant_eval::metrics::TextEvalSpec;
use adaquant_eval::report::{markdown_table, quantized_scored};
use adaquant_eval::results::read_records;
use adaquant_eval::sweep::{run_sweep, validate_points, PointSpec, PolicySpec, SensSource, SweepPlan, TaskSelection};
use adaquant_kernels::{Bits, GroupAxis};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("adaquant-first-hour-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn point(policy: PolicySpec, group: usize, k_axis: GroupAxis, residual: usize) -> PointSpec {
    PointSpec { policy, group, k_axis, v_axis: GroupAxis::PerToken, residual, sinks: 0, quantizer: Default::default() }
}

fn k4v2() -> PolicySpec {
    PolicySpec::Fixed { k: Some(Bits::B4), v: Some(Bits::B2) }
}

fn plan(out: PathBuf, points: Vec<PointSpec>, ctx: usize) -> SweepPlan {
    SweepPlan {
        points,
        text: TextEvalSpec { ctx, windows: 2, topk: 0 },
        tasks: TaskSelection::default(),
        out,
        shard: None,
        model_name: "toy".into(),
        model_sha256: "0".into(),
        data_sha256: "0".into(),
        text_name: "toy.txt".into(),
        git_rev: "test".into(),
        weights: "f32".into(),
        attention: "exact".into(),
        hellaswag_path: PathBuf::new(),
        arc_path: PathBuf::new(),
        lambada_path: PathBuf::new(),
    }
}

fn tokens() -> Vec<u32> {
    let mut r = SplitMix(5);
    (0..200).map(|_| r.range(0, 64) as u32).collect()
}

#[test]
fn a_grid_with_invalid_points_is_refused_whole_before_any_work() {
    let lm = ToyLm::small(2);
    assert_eq!(lm.cache_shape(32).head_dim, 16);
    let dir = tmpdir("invalid");
    let points = vec![
        point(PolicySpec::Full, 16, GroupAxis::PerToken, 8),
        point(k4v2(), 16, GroupAxis::PerToken, 8),
        // 12 channels do not divide head_dim 16 (the g48 on head_dim 64).
        point(k4v2(), 12, GroupAxis::PerToken, 8),
        // Per-channel groups of 8 tokens do not divide an exact window of 12 (the kivi r100).
        point(k4v2(), 8, GroupAxis::PerChannel, 12),
        point(
            PolicySpec::Budget {
                avg_bits: 3.0,
                sensitivity: SensSource::File("/nonexistent/sens.json".into()),
                pinned: vec![],
            },
            16,
            GroupAxis::PerToken,
            8,
        ),
    ];
    let p = plan(dir.clone(), points.clone(), 32);
    let err = run_sweep(&lm, &tokens(), &p).unwrap_err().to_string();
    assert!(err.starts_with("3 of 5 points cannot run on this model (head_dim 16, 2 layers"), "{err}");
    assert!(err.contains("point 2 K4V2 (g12 tok/tok r8)") && err.contains("does not divide head_dim"), "{err}");
    assert!(err.contains("point 3 K4V2 (g8 chan/tok r12)") && err.contains("residual window of 12"), "{err}");
    assert!(err.contains("point 4 budget3 file:nonexistent/sens") && err.contains("not found"), "{err}");
    assert!(!err.contains("point 0") && !err.contains("point 1 "), "{err}");
    // Nothing was computed: not even the valid points or the reference reached the results file.
    assert!(read_records(&p.results_path()).unwrap().0.is_empty());
    // The same check needs only the shape, so `--dry-run` runs it without loading weights.
    assert!(validate_points(&points[..2], &lm.cache_shape(32)).is_ok());
    assert!(validate_points(&points, &lm.cache_shape(32)).is_err());
}

#[test]
fn rows_whose_window_covers_the_text_are_marked_as_unquantized() {
    let lm = ToyLm::small(2);
    let dir = tmpdir("unquantized");
    // ctx 32: positions 16..=30 are scored. An exact window of 128 (the default) covers them all, as
    // `sweep --ctx 100 --residual 128` did; a window of 20 leaves positions 20..=30 seeing quantized tokens.
    let points = vec![
        point(PolicySpec::Full, 16, GroupAxis::PerToken, 0),
        point(k4v2(), 16, GroupAxis::PerToken, 128),
        point(k4v2(), 16, GroupAxis::PerToken, 20),
    ];
    let p = plan(dir, points.clone(), 32);
    assert_eq!(points[1].quantized_scored_per_window(&p.text, 2), 0);
    assert_eq!(points[2].quantized_scored_per_window(&p.text, 2), 11);
    run_sweep(&lm, &tokens(), &p).unwrap();
    let (records, _) = read_records(&p.results_path()).unwrap();
    let full = records.iter().find(|r| r.policy == "full").unwrap();
    let covered = records.iter().find(|r| r.residual == 128).unwrap();
    let measured = records.iter().find(|r| r.residual == 20).unwrap();
    // Nothing was quantized, and the numbers show it: identical to full precision.
    assert_eq!((covered.ppl, covered.kl_mean, covered.top1), (full.ppl, 0.0, 1.0));
    assert!(measured.kl_mean > 0.0);
    assert_eq!(quantized_scored(covered), Some(0));
    assert_eq!(quantized_scored(measured), Some(2 * 11));
    assert_eq!(covered.text, "toy.txt");
    let t = markdown_table(&records);
    let row = |r: usize| t.lines().find(|l| l.starts_with("| K4V2 ") && l.contains(&format!(" r{r} |"))).unwrap();
    assert!(row(128).contains("| 0% ‡ |"), "{t}");
    assert!(row(20).contains("| 73% |"), "{t}");
    assert!(t.contains("### toy on toy.txt, 2 windows of 32 tokens"), "{t}");
}
