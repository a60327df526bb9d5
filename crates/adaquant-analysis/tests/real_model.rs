//! Checks on the real SmolLM2 checkpoint; each test prints SKIPPED and passes when the files are absent.

use adaquant_analysis::error::AnalysisError;
use adaquant_analysis::run::{calibration_tokens, run_typed};
use adaquant_analysis::study::{weight_stats, Dims, HeadedStats};
use adaquant_analysis::AnalyzeArgs;
use adaquant_model::{paths, Model};

/// W_K / W_V norms computed independently with numpy from the dequantized GGUF tensors:
///
/// ```text
/// python3 -m venv /tmp/ggufenv && /tmp/ggufenv/bin/pip install numpy gguf
/// /tmp/ggufenv/bin/python crates/adaquant-analysis/tests/gguf_norms.py data/models/SmolLM2-135M-Instruct.Q4_1.gguf
/// ```
///
/// Columns: layer, ||W_K||_F, ||W_K||_2, ||W_V||_F, ||W_V||_2, ||W_K head 0||_F, ||W_K head 1||_2 (numpy 2.4.6,
/// gguf 0.17, f64 SVD). Head slices are blocks of 64 rows; the GGUF row permutation for RoPE stays inside a head,
/// so head norms do not depend on it.
const NUMPY: [(usize, f64, f64, f64, f64, f64, f64); 4] = [
    (
        0,
        132.28590757867119,
        62.030680870151706,
        15.565707833391706,
        3.4431235537123728,
        64.29022274928644,
        54.75729333473269,
    ),
    (
        1,
        92.79124929218911,
        17.612923431437068,
        41.31209023302704,
        4.646972192535336,
        51.443745052519695,
        13.944499624672927,
    ),
    (
        15,
        66.25065876747858,
        13.698692860386178,
        58.87770155953016,
        7.019384897610001,
        35.63291948515689,
        11.681104591489348,
    ),
    (
        29,
        43.62122820423858,
        10.287522085517615,
        95.8540669617124,
        10.145453907129308,
        25.27427045670612,
        6.706797386932582,
    ),
];

struct WeightLayerKv {
    w_k: HeadedStats,
    w_v: HeadedStats,
}

fn dims(m: &Model) -> Dims {
    let c = &m.config;
    Dims {
        n_layers: c.n_layers,
        n_q_heads: c.n_q_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        hidden: c.hidden,
    }
}

#[test]
fn weight_norms_match_numpy_on_the_gguf_tensors() {
    let Some(path) = paths::require(paths::default_model(), "weight_norms_match_numpy_on_the_gguf_tensors") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let d = dims(&model);
    assert_eq!((d.n_layers, d.n_kv_heads, d.head_dim, d.hidden), (30, 3, 64, 576));
    let close = |got: f64, want: f64, what: &str| {
        assert!((got - want).abs() <= 1e-6 * want, "{what}: got {got}, numpy {want}");
    };
    for (layer, kf, ks, vf, vs, k0f, k1s) in NUMPY {
        let w = model.layer_weights(layer);
        let kv = d.n_kv_heads * d.head_dim;
        let r = WeightLayerKv {
            w_k: weight_stats(w.wk, kv, d.hidden, d.head_dim, "W_K").unwrap(),
            w_v: weight_stats(w.wv, kv, d.hidden, d.head_dim, "W_V").unwrap(),
        };
        close(r.w_k.whole.fro, kf, &format!("layer {layer} ||W_K||_F"));
        close(r.w_k.whole.spec, ks, &format!("layer {layer} ||W_K||_2"));
        close(r.w_v.whole.fro, vf, &format!("layer {layer} ||W_V||_F"));
        close(r.w_v.whole.spec, vs, &format!("layer {layer} ||W_V||_2"));
        close(r.w_k.head_fro[0], k0f, &format!("layer {layer} ||W_K head 0||_F"));
        close(r.w_k.head_spec[1], k1s, &format!("layer {layer} ||W_K head 1||_2"));
    }
    // The reversal the report must show: in the last layer ||W_K||_F < ||W_V||_F while ||W_K||_2 > ||W_V||_2.
    assert!(NUMPY[3].1 < NUMPY[3].3 && NUMPY[3].2 > NUMPY[3].4);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let missing = AnalyzeArgs { model: Some("/nonexistent/model.gguf".into()), ..AnalyzeArgs::default() };
    let e = run_typed(&missing).unwrap_err();
    assert!(matches!(e, AnalysisError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"));

    let dir = std::env::temp_dir().join(format!("adaquant-analysis-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF but not really a model").unwrap();
    let e = run_typed(&AnalyzeArgs {
        model: Some(corrupt.clone()),
        weights_only: true,
        out: Some(dir.join("out")),
        ..AnalyzeArgs::default()
    })
    .unwrap_err();
    assert!(matches!(e, AnalysisError::Model(_)), "{e}");
    // A missing calibration text is reported before the model is loaded (here it would fail to load).
    let e = run_typed(&AnalyzeArgs {
        model: Some(corrupt.clone()),
        text: Some(dir.join("absent.txt")),
        out: Some(dir.join("out")),
        ..AnalyzeArgs::default()
    })
    .unwrap_err();
    assert!(matches!(&e, AnalysisError::Missing { what, .. } if what == "calibration text"), "{e}");

    let Some(path) = paths::require(paths::default_model(), "bad_inputs_give_clear_errors") else {
        return;
    };
    let model = Model::load(&path).unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "Only a few words here.").unwrap();
    let e = calibration_tokens(&model, &short, 100).unwrap_err();
    assert!(matches!(e, AnalysisError::TextTooShort { wanted: 100, .. }), "{e}");
    let e = calibration_tokens(&model, &dir.join("absent.txt"), 100).unwrap_err();
    assert!(matches!(e, AnalysisError::Missing { .. }), "{e}");
    let ids = calibration_tokens(&model, &short, 3).unwrap();
    assert_eq!(ids.len(), 3);
    let e = run_typed(&AnalyzeArgs { model: Some(path), heads: Some(vec![3]), ..AnalyzeArgs::default() }).unwrap_err();
    assert!(matches!(e, AnalysisError::InvalidArgument(_)), "{e}");
}

/// The whole pipeline on 96 tokens. Unoptimised builds instantiate faer's SVD at opt-level 0 and take minutes, so
/// this runs with `cargo test --release -p adaquant-analysis --test real_model`.
#[test]
#[cfg_attr(debug_assertions, ignore = "slow without optimisation; run with --release")]
fn short_end_to_end_run_on_the_real_model() {
    let test = "short_end_to_end_run_on_the_real_model";
    let (Some(model), Some(text)) =
        (paths::require(paths::default_model(), test), paths::require(paths::wikitext2_test(), test))
    else {
        return;
    };
    let out = std::env::temp_dir().join(format!("adaquant-analysis-e2e-{}", std::process::id()));
    let args = AnalyzeArgs {
        model: Some(model),
        text: Some(text),
        tokens: 96,
        out: Some(out.clone()),
        heads: Some(vec![0, 2]),
        attn_queries: 4,
        no_plots: true,
        ..AnalyzeArgs::default()
    };
    assert_eq!(run_typed(&args).unwrap(), out);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    for l in layers {
        assert_eq!(l["k"]["head_ids"], serde_json::json!([0, 2]));
        assert_eq!(l["k"]["rows"], 96);
        assert_eq!(l["quant"].as_array().unwrap().len(), 8);
        assert!(l["k"]["fro"].as_f64().unwrap() > 0.0 && l["v"]["spec"].as_f64().unwrap() > 0.0);
    }
    // The Frobenius weight claim reverses in the late layers of SmolLM2, and the report says so.
    let fro = v["claims"].as_array().unwrap().iter().find(|c| c["norm"] == "weight_fro").unwrap();
    assert!(fro["fails"].as_array().unwrap().contains(&serde_json::json!(29)));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("fails in layers"), "{md}");
    for kind in ["weight_fro", "weight_spec", "act_fro", "act_spec", "quant_err", "attn_err"] {
        assert!(out.join(format!("sensitivities-{kind}.json")).is_file(), "{kind}");
    }
}
