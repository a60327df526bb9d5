//! The sweep runner on the toy model: one line per point, reruns skip finished points, a kill mid-line loses
//! nothing written and never duplicates a point, shards merged give the unsharded results, a rerun with another
//! text or model never reuses old numbers, old results files are refused, and one results file has one writer.

use std::io::Write;
use std::path::PathBuf;

use adaquant_eval::data::SplitMix;
use adaquant_eval::lm::ToyLm;
use adaquant_eval::metrics::TextEvalSpec;
use adaquant_eval::report::write_report;
use adaquant_eval::results::{merge_dirs, read_records, ResultsFile, RESULTS_VERSION};
use adaquant_eval::sweep::{run_sweep, PointSpec, PolicySpec, SensSource, Shard, SweepPlan, TaskSelection};
use adaquant_eval::EvalError;
use adaquant_kernels::{Bits, GroupAxis};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("adaquant-sweep-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn plan(out: PathBuf, shard: Option<Shard>) -> SweepPlan {
    let point = |policy| PointSpec {
        policy,
        group: 16,
        k_axis: GroupAxis::PerToken,
        v_axis: GroupAxis::PerToken,
        residual: 4,
        sinks: 0,
        quantizer: Default::default(),
    };
    SweepPlan {
        points: vec![
            point(PolicySpec::Full),
            point(PolicySpec::Fixed { k: Some(Bits::B4), v: Some(Bits::B2) }),
            point(PolicySpec::Fixed { k: Some(Bits::B2), v: Some(Bits::B4) }),
            point(PolicySpec::Fixed { k: None, v: Some(Bits::B1_58) }),
            point(PolicySpec::Budget { avg_bits: 3.0, sensitivity: SensSource::WeightFro, pinned: vec![] }),
        ],
        text: TextEvalSpec { ctx: 32, windows: 3, topk: 8 },
        tasks: TaskSelection::default(),
        out,
        shard,
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
    }
}

fn tokens() -> Vec<u32> {
    let mut r = SplitMix(3);
    (0..200).map(|_| r.range(0, 64) as u32).collect()
}

#[test]
fn resume_skips_finished_points_and_survives_a_torn_line() {
    let lm = ToyLm::small(4);
    let dir = tmpdir("resume");
    let p = plan(dir.clone(), None);
    // The returned file holds the results file's lock until it is dropped, here at once.
    let path = run_sweep(&lm, &tokens(), &p).unwrap().path().to_path_buf();
    let (first, _) = read_records(&path).unwrap();
    assert_eq!(first.len(), 5);
    let full = first.iter().find(|r| r.policy == "full").unwrap();
    assert_eq!((full.kl_mean, full.top1), (0.0, 1.0));
    let k4v2 = first.iter().find(|r| r.name == "K4V2").unwrap();
    assert!(k4v2.kl_mean > 0.0 && k4v2.bits_per_element < 16.0 && k4v2.scored_tokens == 3 * 15);
    let budget = first.iter().find(|r| r.policy == "budget").unwrap();
    assert_eq!(budget.layer_k_bits.len(), 2);
    assert!(budget.k_bits + budget.v_bits <= 6.0 + 1e-9, "{budget:?}");

    // A rerun changes nothing.
    let before = std::fs::read(&path).unwrap();
    run_sweep(&lm, &tokens(), &p).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // Kill in the middle of the last line: cut it in half.
    let text = String::from_utf8(before.clone()).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    let cut = last_start + (text.len() - last_start) / 2;
    std::fs::write(&path, &before[..cut]).unwrap();
    run_sweep(&lm, &tokens(), &p).unwrap();
    let (again, _) = read_records(&path).unwrap();
    assert_eq!(again.len(), 5);
    let mut keys: Vec<&str> = again.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5, "no point recorded twice");
    // The rerun point reproduces the lost numbers exactly (deterministic evaluation).
    let lost = &first[4];
    let redone = again.iter().find(|r| r.key == lost.key).unwrap();
    assert_eq!((redone.ppl, redone.kl_mean, redone.top1), (lost.ppl, lost.kl_mean, lost.top1));

    // A stray partial line without newline in an otherwise complete file is also dropped.
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"key\":").unwrap();
    drop(f);
    run_sweep(&lm, &tokens(), &p).unwrap();
    assert_eq!(read_records(&path).unwrap().0.len(), 5);

    let files = write_report(&again, &dir).unwrap();
    let table = std::fs::read_to_string(files.table).unwrap();
    assert!(table.contains("K2V4") && table.contains("budget3 weight_fro"));
}

#[test]
fn shards_merge_to_the_unsharded_sweep() {
    let lm = ToyLm::small(4);
    let whole = tmpdir("whole");
    run_sweep(&lm, &tokens(), &plan(whole.clone(), None)).unwrap();
    let (s0, s1) = (tmpdir("shard0"), tmpdir("shard1"));
    run_sweep(&lm, &tokens(), &plan(s0.clone(), Some(Shard { index: 0, count: 2 }))).unwrap();
    run_sweep(&lm, &tokens(), &plan(s1.clone(), Some(Shard { index: 1, count: 2 }))).unwrap();
    assert_eq!(read_records(&s0.join("results.shard-0-of-2.jsonl")).unwrap().0.len(), 3);
    assert_eq!(read_records(&s1.join("results.shard-1-of-2.jsonl")).unwrap().0.len(), 2);
    let mut merged = merge_dirs(&[s0, s1]).unwrap();
    let mut single = merge_dirs(&[whole]).unwrap();
    merged.sort_by(|a, b| a.key.cmp(&b.key));
    single.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(merged.len(), single.len());
    for (m, s) in merged.iter().zip(&single) {
        assert_eq!(m.key, s.key);
        assert_eq!((m.ppl, m.kl_mean, m.kl_p99, m.top1, m.kv_bytes), (s.ppl, s.kl_mean, s.kl_p99, s.top1, s.kv_bytes));
    }
}

#[test]
fn another_text_or_model_runs_every_point_again() {
    let lm = ToyLm::small(4);
    let dir = tmpdir("identity");
    let base = plan(dir.clone(), None);
    let path = run_sweep(&lm, &tokens(), &base).unwrap().path().to_path_buf();
    let (first, _) = read_records(&path).unwrap();
    assert_eq!(first.len(), 5);
    assert!(first.iter().all(|r| r.results_version == RESULTS_VERSION && r.settings.contains("text sha256 0")));

    // Another text under the same --out: every point runs again, on the new tokens.
    let mut other_text = plan(dir.clone(), None);
    other_text.data_sha256 = "1".into();
    let mut r = adaquant_eval::data::SplitMix(11);
    let tokens2: Vec<u32> = (0..200).map(|_| r.range(0, 64) as u32).collect();
    run_sweep(&lm, &tokens2, &other_text).unwrap();
    let (all, _) = read_records(&path).unwrap();
    assert_eq!(all.len(), 10, "no point of the first text is reused");
    let k4v2: Vec<_> = all.iter().filter(|r| r.name == "K4V2").collect();
    assert_eq!(k4v2.len(), 2);
    assert_ne!(k4v2[0].key, k4v2[1].key);
    assert_ne!(k4v2[0].ppl, k4v2[1].ppl, "the second text's numbers are its own");

    // A re-quantized model under the same file name.
    let mut other_model = plan(dir.clone(), None);
    other_model.model_sha256 = "1".into();
    run_sweep(&lm, &tokens(), &other_model).unwrap();
    assert_eq!(read_records(&path).unwrap().0.len(), 15);
    // Each rerun of one identity skips its points.
    run_sweep(&lm, &tokens2, &other_text).unwrap();
    assert_eq!(read_records(&path).unwrap().0.len(), 15);

    // The table keeps the three evaluations apart.
    let files = write_report(&read_records(&path).unwrap().0, &dir).unwrap();
    let table = std::fs::read_to_string(files.table).unwrap();
    assert_eq!(table.matches("### ").count(), 3, "{table}");
    assert_eq!(table.matches("| K4V2 |").count(), 3, "{table}");
}

#[test]
fn results_files_of_older_versions_are_refused() {
    let lm = ToyLm::small(4);
    let dir = tmpdir("old-version");
    let p = plan(dir.clone(), None);
    run_sweep(&lm, &tokens(), &p).unwrap();
    let path = dir.join("results.jsonl");
    // The same lines as the old code wrote them: no version, keys without the contents.
    let old: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("results_version");
            m.remove("settings");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&path, &old).unwrap();
    let err = run_sweep(&lm, &tokens(), &p).unwrap_err();
    assert!(matches!(err, EvalError::OldResults { found: 0, lines: 5, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("another --out") && msg.contains("mv "), "{msg}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), old, "nothing appended to the old file");
    assert!(merge_dirs(std::slice::from_ref(&dir)).is_err());
}

#[test]
fn one_writer_per_results_file() {
    let lm = ToyLm::small(4);
    let dir = tmpdir("lock");
    let p = plan(dir.clone(), None);
    let held = ResultsFile::open(&p.results_path()).unwrap();
    let err = run_sweep(&lm, &tokens(), &p).unwrap_err();
    assert!(matches!(&err, EvalError::ResultsLocked { .. }), "{err}");
    assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
    // Shards write their own files and run beside it.
    run_sweep(&lm, &tokens(), &plan(dir.clone(), Some(Shard { index: 1, count: 2 }))).unwrap();
    drop(held);
    run_sweep(&lm, &tokens(), &p).unwrap();
    assert_eq!(read_records(&p.results_path()).unwrap().0.len(), 5);
    // Shard 1 measured the same points as the whole run: the merge agrees with itself.
    assert_eq!(merge_dirs(&[dir]).unwrap().len(), 5);
}
