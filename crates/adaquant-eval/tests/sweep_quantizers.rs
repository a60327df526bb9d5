//! The quantizer dimension of a sweep on the toy model: every family runs, is named in keys, names, records,
//! tables and the comparison plot, and packed bits follow the byte formula.

use std::path::PathBuf;

use adaquant_cache::Quantizer;
use adaquant_eval::data::SplitMix;
use adaquant_eval::lm::ToyLm;
use adaquant_eval::metrics::TextEvalSpec;
use adaquant_eval::report::write_report;
use adaquant_eval::sweep::{run_sweep, PointSpec, PolicySpec, SweepPlan, TaskSelection};
use adaquant_kernels::{Bits, GroupAxis};

#[test]
fn every_quantizer_family_runs_and_is_named() {
    let dir = std::env::temp_dir().join(format!("adaquant-sweep-quantizers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let point = |quantizer, k_axis, k, v| PointSpec {
        policy: PolicySpec::Fixed { k: Some(k), v: Some(v) },
        group: 16,
        k_axis,
        v_axis: GroupAxis::PerToken,
        residual: 0,
        sinks: 0,
        quantizer,
    };
    let mut points = vec![PointSpec {
        policy: PolicySpec::Full,
        ..point(Quantizer::MinMax, GroupAxis::PerToken, Bits::B4, Bits::B4)
    }];
    for q in Quantizer::ALL {
        points.push(point(q, GroupAxis::PerToken, Bits::B2, Bits::B2));
    }
    points.push(point(Quantizer::MinMax, GroupAxis::PerChannel, Bits::B2, Bits::B2));
    points.push(point(Quantizer::RotLloyd, GroupAxis::PerChannel, Bits::B1_58, Bits::B3));
    let plan = SweepPlan {
        points: points.clone(),
        text: TextEvalSpec { ctx: 32, windows: 2, topk: 0 },
        tasks: TaskSelection::default(),
        out: dir.clone(),
        shard: None,
        model_name: "toy".into(),
        model_sha256: "0".into(),
        data_sha256: "0".into(),
        text_name: "toy text".into(),
        git_rev: "test".into(),
        weights: "f32".into(),
        attention: "exact".into(),
        hellaswag_path: PathBuf::new(),
        arc_path: PathBuf::new(),
        lambada_path: PathBuf::new(),
    };
    let mut r = SplitMix(5);
    let tokens: Vec<u32> = (0..100).map(|_| r.range(0, 64) as u32).collect();
    let lm = ToyLm::small(6);
    let file = run_sweep(&lm, &tokens, &plan).unwrap();
    let records = file.records();
    assert_eq!(records.len(), points.len());
    let keys: std::collections::BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), points.len(), "every family has its own key");
    for q in Quantizer::ALL {
        let rec = records
            .iter()
            .find(|r| r.quantizer == q.name() && r.k_axis == "per_token")
            .unwrap_or_else(|| panic!("no record for {q}"));
        assert!(rec.kl_mean > 0.0, "{q}: quantized KL must be positive");
        let want =
            if matches!(q, Quantizer::Lloyd | Quantizer::RotLloyd) { 2.0 + 16.0 / 16.0 } else { 2.0 + 32.0 / 16.0 };
        assert!((rec.packed_bits - want).abs() < 1e-12, "{q}: packed bits {} vs {want}", rec.packed_bits);
        if q != Quantizer::MinMax {
            assert!(rec.name.ends_with(q.name()) && rec.key.contains(&format!("|q{q}|")), "{rec:?}");
        }
    }
    let full = records.iter().find(|r| r.policy == "full").unwrap();
    assert!(full.quantizer.is_empty());
    let files = write_report(records, &dir).unwrap();
    let table = std::fs::read_to_string(&files.table).unwrap();
    assert!(table.contains("packed bits") && table.contains("rot-lloyd") && table.contains("K2V2 hqq"), "{table}");
    // Plot files start with their settings (model, text, window); the family plot ends in kl-vs-packed-bits.
    let svg_path = files
        .plots
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-kl-vs-packed-bits.svg"))
        .unwrap_or_else(|| panic!("{:?}", files.plots));
    let svg = std::fs::read_to_string(svg_path).unwrap();
    for family in ["minmax", "hqq", "rot-minmax", "rot-lloyd", "minmax (per-channel K)"] {
        assert!(svg.contains(family), "legend lacks {family}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
