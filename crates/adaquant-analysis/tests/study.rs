//! The per-layer studies and the report on synthetic weights and activations.

use adaquant_analysis::error::AnalysisError;
use adaquant_analysis::report::{Report, Timings, SENSITIVITY_KINDS};
use adaquant_analysis::study::{
    activation_layer, attention, attention_errors, attention_ref, head_slice, quantize_heads, query_positions,
    relative_error, weight_layer, ActivationOptions, Dims, GroupQuantizer, LayerActivations, LayerWeights, Quantizer,
};
use adaquant_analysis::{report::LayerReport, Result};
use adaquant_kernels::Bits;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.sample::<f32, _>(StandardNormal)).collect()
}

/// Awkward sizes: 6 query heads over 2 KV heads, head_dim 24, hidden 40.
fn dims(n_layers: usize) -> Dims {
    Dims { n_layers, n_q_heads: 6, n_kv_heads: 2, head_dim: 24, hidden: 40 }
}

fn activations(seed: u64, d: &Dims, tokens: usize, k_scale: f32, v_scale: f32) -> LayerActivations {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    LayerActivations {
        tokens,
        q: randn(&mut rng, tokens * d.q_dim(), 1.0),
        k: randn(&mut rng, tokens * d.kv_dim(), k_scale),
        k_pre_rope: randn(&mut rng, tokens * d.kv_dim(), k_scale),
        v: randn(&mut rng, tokens * d.kv_dim(), v_scale),
    }
}

fn opts(bits: Vec<Bits>, attn_queries: usize) -> ActivationOptions {
    ActivationOptions { pre_rope: false, bits, attn_queries, softmax_scale: 1.0 / 24f32.sqrt(), window: None }
}

/// Multiplies every value by `1 + e`, so the relative error is exactly `e`.
fn scaling(e: f32) -> impl Fn(&[f32], usize, usize, Bits) -> Result<Vec<f32>> + Sync {
    move |x: &[f32], _, _, _| Ok(x.iter().map(|v| v * (1.0 + e)).collect())
}

#[test]
fn parallel_attention_matches_reference() {
    let d = dims(1);
    for &tokens in &[1usize, 2, 37, 97] {
        let a = activations(tokens as u64, &d, tokens, 2.0, 1.0);
        let pos: Vec<usize> = (0..tokens).collect();
        let fast = attention(&a.q, &a.k, &a.v, &pos, None, &d, 0.3);
        let slow = attention_ref(&a.q, &a.k, &a.v, &pos, None, &d, 0.3);
        assert_eq!(fast.len(), tokens * d.q_dim());
        let err = fast.iter().zip(&slow).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "tokens={tokens}: max |fast - ref| = {err}");
    }
    // The first position attends only to itself: its output is its own value vector.
    let a = activations(1, &d, 5, 1.0, 1.0);
    let o = attention(&a.q, &a.k, &a.v, &[0], None, &d, 0.3);
    for h in 0..d.n_q_heads {
        let kv = h / 3;
        assert_eq!(&o[h * 24..(h + 1) * 24], &a.v[kv * 24..(kv + 1) * 24]);
    }
}

#[test]
fn fused_attention_errors_match_reference() {
    let d = dims(1);
    let q = GroupQuantizer { group: 8 };
    for (tokens, window) in [(3usize, None), (29, None), (70, None), (70, Some(9)), (29, Some(40))] {
        let a = activations(100 + tokens as u64, &d, tokens, 2.0, 1.0);
        let widths = [Bits::B1_58, Bits::B3, Bits::B6];
        let kq: Vec<Vec<f32>> = widths.iter().map(|&b| quantize_heads(&q, &a.k, tokens, 2, 24, b).unwrap()).collect();
        let vq: Vec<Vec<f32>> = widths.iter().map(|&b| quantize_heads(&q, &a.v, tokens, 2, 24, b).unwrap()).collect();
        let pos = query_positions(tokens, 5);
        let (ke, ve) = attention_errors(&a.q, &a.k, &a.v, &kq, &vq, &pos, window, &d, 0.2);
        let exact = attention_ref(&a.q, &a.k, &a.v, &pos, window, &d, 0.2);
        let fast = attention(&a.q, &a.k, &a.v, &pos, window, &d, 0.2);
        let worst = fast.iter().zip(&exact).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "tokens {tokens} window {window:?}: max |fast - ref| = {worst}");
        if window == Some(9) {
            // A window of 9 is the plain causal attention of the same query over the last 9 positions.
            let (p, qr, row) = (*pos.last().unwrap(), d.q_dim(), d.kv_dim());
            let lo = p + 1 - 9;
            let mut qs = vec![0.0; 9 * qr];
            qs[8 * qr..].copy_from_slice(&a.q[p * qr..(p + 1) * qr]);
            let (ks, vs) = (&a.k[lo * row..(p + 1) * row], &a.v[lo * row..(p + 1) * row]);
            let cut = attention_ref(&qs, ks, vs, &[8], None, &d, 0.2);
            assert_eq!(&exact[(pos.len() - 1) * qr..], &cut[..], "the window is plain attention over its positions");
            let plain = attention_ref(&a.q, &a.k, &a.v, &pos, None, &d, 0.2);
            assert_ne!(plain, exact, "a window of 9 over 70 tokens must change the outputs");
        }
        for j in 0..widths.len() {
            let rk = relative_error(&exact, &attention_ref(&a.q, &kq[j], &a.v, &pos, window, &d, 0.2));
            let rv = relative_error(&exact, &attention_ref(&a.q, &a.k, &vq[j], &pos, window, &d, 0.2));
            assert!((ke[j] - rk).abs() <= 1e-4 * rk.max(1e-3), "K width {j}: {} vs {rk}", ke[j]);
            assert!((ve[j] - rv).abs() <= 1e-4 * rv.max(1e-3), "V width {j}: {} vs {rv}", ve[j]);
        }
    }
}

#[test]
fn query_positions_cover_the_second_half() {
    assert_eq!(query_positions(10, 5), vec![5, 6, 7, 8, 9]);
    assert_eq!(query_positions(10, 100), vec![5, 6, 7, 8, 9]);
    let p = query_positions(2048, 64);
    assert_eq!(p.len(), 64);
    assert_eq!(*p.last().unwrap(), 2047);
    assert!(p[0] >= 1024 && p.windows(2).all(|w| w[0] < w[1]));
    assert!(query_positions(0, 4).is_empty() && query_positions(7, 0).is_empty());
    assert_eq!(query_positions(1, 3), vec![0]);
}

#[test]
fn activation_errors_follow_the_quantizer() {
    let d = dims(1);
    let a = activations(3, &d, 61, 4.0, 0.5);
    let exact = activation_layer(0, &a, &d, &opts(vec![Bits::B4], 9), &scaling(0.0)).unwrap();
    let q = &exact.quant[0];
    assert_eq!((q.bits, q.k_rel, q.v_rel, q.k_attn_rel, q.v_attn_rel), (4.0, 0.0, 0.0, Some(0.0), Some(0.0)));

    let e = 0.01f32;
    let r = activation_layer(0, &a, &d, &opts(vec![Bits::B2, Bits::B8], 9), &scaling(e)).unwrap();
    assert_eq!(r.quant.len(), 2);
    for q in &r.quant {
        assert!((q.k_rel - e as f64).abs() < 1e-6 && (q.v_rel - e as f64).abs() < 1e-6, "{q:?}");
        // Scaling V scales the attention output by the same factor; scaling K changes the softmax instead.
        assert!((q.v_attn_rel.unwrap() - e as f64).abs() < 1e-5, "{q:?}");
        let k_attn = q.k_attn_rel.unwrap();
        assert!(k_attn > 0.0 && k_attn < 1.0, "{q:?}");
    }
    // Norms: K was drawn 8x larger than V.
    assert!(r.k.whole.fro > 4.0 * r.v.whole.fro);
    assert_eq!(r.k.heads.len(), 2);
    let sum_sq: f64 = r.k.head_fro.iter().map(|x| x * x).sum();
    assert!((sum_sq.sqrt() - r.k.whole.fro).abs() < 1e-9 * r.k.whole.fro);
    assert_eq!(r.k_channels.len(), 2);
    assert_eq!(r.k_channels[0].max_abs.len(), 24);

    // Without queries there is no attention error.
    let no_q = LayerActivations { q: Vec::new(), ..a.clone() };
    let r = activation_layer(0, &no_q, &d, &opts(vec![Bits::B4], 9), &scaling(e)).unwrap();
    assert_eq!((r.quant[0].k_attn_rel, r.quant[0].v_attn_rel), (None, None));

    // Pre-RoPE keys change the key statistics but not the quantization error (measured on post-RoPE keys).
    let pre =
        activation_layer(0, &a, &d, &ActivationOptions { pre_rope: true, ..opts(vec![Bits::B4], 0) }, &scaling(e))
            .unwrap();
    assert_ne!(pre.k.whole.fro, exact.k.whole.fro);
}

#[test]
fn kernel_quantizer_error_shrinks_with_bits() {
    let d = dims(1);
    let a = activations(9, &d, 50, 3.0, 1.0);
    let q = GroupQuantizer { group: 8 };
    let widths = [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4, Bits::B5, Bits::B6, Bits::B8];
    let r = activation_layer(0, &a, &d, &opts(widths.to_vec(), 16), &q).unwrap();
    for w in r.quant.windows(2) {
        assert!(w[1].k_rel < w[0].k_rel && w[1].v_rel < w[0].v_rel, "{:?}", w);
    }
    let last = r.quant.last().unwrap();
    assert!(last.k_rel < 0.01 && last.k_attn_rel.unwrap() < 0.01, "{last:?}");
    // Heads are quantized separately and put back in place.
    let rec = quantize_heads(&q, &a.k, 50, 2, 24, Bits::B8).unwrap();
    for h in 0..2 {
        let dense = head_slice(&a.k, 50, 2, 24, h);
        let alone = q.round_trip(&dense, 50, 24, Bits::B8).unwrap();
        assert_eq!(head_slice(&rec, 50, 2, 24, h), alone);
    }
    // A group that does not divide head_dim is a typed error.
    let bad = GroupQuantizer { group: 7 };
    let e = activation_layer(0, &a, &d, &opts(vec![Bits::B4], 0), &bad).unwrap_err();
    assert!(matches!(e, AnalysisError::Quant(_)), "{e}");
}

#[test]
fn bad_activation_shapes_are_errors() {
    let d = dims(1);
    let mut a = activations(4, &d, 20, 1.0, 1.0);
    a.v.pop();
    let e = activation_layer(0, &a, &d, &opts(vec![Bits::B4], 4), &scaling(0.0)).unwrap_err();
    assert!(matches!(e, AnalysisError::Shape { .. }), "{e}");
    a.v.push(f32::NAN);
    let e = activation_layer(0, &a, &d, &opts(vec![Bits::B4], 4), &scaling(0.0)).unwrap_err();
    assert!(matches!(e, AnalysisError::NonFinite { .. }), "{e}");
    assert_eq!(relative_error(&[], &[]), 0.0);
    assert!((relative_error(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-12);
}

/// Weights of `n` layers where W_K is larger than W_V in the first half and smaller in the second.
fn synthetic_layers(d: &Dims, with_activations: bool) -> Vec<LayerReport> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    (0..d.n_layers)
        .map(|l| {
            let (ks, vs) = if l < d.n_layers / 2 { (2.0, 1.0) } else { (1.0, 2.0) };
            let wq = randn(&mut rng, d.q_dim() * d.hidden, 1.0);
            let wk = randn(&mut rng, d.kv_dim() * d.hidden, ks);
            let wv = randn(&mut rng, d.kv_dim() * d.hidden, vs);
            let wo = randn(&mut rng, d.hidden * d.q_dim(), 1.0);
            let weights = weight_layer(l, &LayerWeights { wq: &wq, wk: &wk, wv: &wv, wo: &wo }, d).unwrap();
            let activations = with_activations.then(|| {
                let a = activations(l as u64, d, 40, 3.0, 1.0);
                activation_layer(l, &a, d, &opts(vec![Bits::B2, Bits::B4], 8), &GroupQuantizer { group: 8 }).unwrap()
            });
            LayerReport { layer: l, weights, activations }
        })
        .collect()
}

/// A model with local and global layers gets one summary line per kind, over the right layers; a model where
/// every layer is global (or local) gets none.
#[test]
fn local_and_global_layers_are_summarised_apart() {
    let d = dims(4);
    let layers = synthetic_layers(&d, true);
    let mut report = Report::new("gemma.gguf".into(), d.clone(), None, layers, Timings::default());
    assert_eq!(report.local_global_markdown(), "");
    report.windows = vec![Some(512), Some(512), Some(512), None];
    let md = report.local_global_markdown();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 2, "{md}");
    assert!(lines[0].starts_with("- local (sliding-window) layers (0, 1, 2):"), "{md}");
    assert!(lines[1].starts_with("- global layers (3):"), "{md}");
    // Layer 3 has W_V twice W_K, so the global line's weight ratio is below 1 and the local median above it.
    let ratio = |l: &LayerReport| l.weights.w_k.whole.spec / l.weights.w_v.whole.spec;
    assert!(lines[1].contains(&format!("median ||W_K||_2/||W_V||_2 {:.3}", ratio(&report.layers[3]))), "{md}");
    assert!(ratio(&report.layers[3]) < 1.0 && ratio(&report.layers[0]) > 1.0);
    assert!(report.markdown().contains(lines[1]));
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.windows, report.windows);
    report.windows = vec![Some(512); 4];
    assert_eq!(report.local_global_markdown(), "");
}

#[test]
fn weight_study_is_per_head() {
    let d = dims(1);
    let layers = synthetic_layers(&d, false);
    let w = &layers[0].weights;
    assert_eq!((w.w_k.whole.rows, w.w_k.whole.cols), (48, 40));
    assert_eq!(w.w_k.heads.len(), 2);
    assert_eq!((w.w_k.heads[1].rows, w.w_k.heads[1].cols), (24, 40));
    let sum_sq: f64 = w.w_v.head_fro.iter().map(|x| x * x).sum();
    assert!((sum_sq.sqrt() - w.w_v.whole.fro).abs() < 1e-9 * w.w_v.whole.fro);
    // The spectral norm of a block of rows never exceeds that of the whole matrix.
    assert!(w.w_k.head_spec.iter().all(|&s| s <= w.w_k.whole.spec * (1.0 + 1e-12)));
    assert!(w.w_q.spec > 0.0 && w.w_o.fro > w.w_o.spec);
}

#[test]
fn report_checks_claims_and_writes_everything() {
    let d = dims(4);
    let layers = synthetic_layers(&d, true);
    let report = Report::new("synthetic.gguf".into(), d.clone(), None, layers, Timings::default());
    let fro = report.claims.iter().find(|c| c.norm == "weight_fro").unwrap();
    assert_eq!(fro.holds, vec![0, 1]);
    assert_eq!(fro.fails, vec![2, 3]);
    assert_eq!(fro.sentence(), "holds in 2 of 4 layers; fails in layers 2-3");
    let act = report.claims.iter().find(|c| c.norm == "act_fro").unwrap();
    assert_eq!(act.holds.len(), 4, "activations were drawn with K three times larger");
    assert!(report.claims.iter().any(|c| c.norm == "act_spec"));

    let dir = std::env::temp_dir().join(format!("adaquant-report-{}", std::process::id()));
    let files = report.write(&dir).unwrap();
    for name in ["report.json", "report.md", "plots/kv_norm_ratio.png", "plots/key_channel_magnitude.svg"] {
        assert!(files.contains(&dir.join(name)), "{name} missing from {files:?}");
        assert!(dir.join(name).is_file());
    }
    assert!(dir.join("plots/spectrum_act_layer03.png").is_file());
    assert!(dir.join("plots/spectrum_w_layer00_full.svg").is_file());

    // report.json has the documented shape and reads back identically.
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let l0 = &v["layers"][0];
    for m in ["w_k", "w_v", "k", "v"] {
        assert!(l0[m]["fro"].is_f64() && l0[m]["spec"].is_f64(), "{m}");
        assert!(l0[m]["singular_values"].as_array().unwrap().len() >= 24, "{m}");
        assert_eq!(l0[m]["heads"].as_array().unwrap().len(), 2, "{m}");
        assert_eq!(l0[m]["head_fro"].as_array().unwrap().len(), 2, "{m}");
    }
    assert!(l0["w_q"]["fro"].is_f64() && l0["quant"][1]["bits"] == 4.0);
    // It reads back (serde_json's default float parsing may differ from the written value in the last bit).
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back.layers.len(), 4);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 * b.abs();
    for (x, y) in back.layers.iter().zip(&report.layers) {
        assert!(close(x.weights.w_k.whole.spec, y.weights.w_k.whole.spec));
        let (xa, ya) = (x.activations.as_ref().unwrap(), y.activations.as_ref().unwrap());
        assert_eq!(xa.k.whole.singular_values.len(), ya.k.whole.singular_values.len());
        assert!(xa.quant.iter().zip(&ya.quant).all(|(p, q)| p.bits == q.bits && close(p.k_rel, q.k_rel)));
    }
    assert_eq!(
        back.claims.iter().map(|c| &c.fails).collect::<Vec<_>>(),
        report.claims.iter().map(|c| &c.fails).collect::<Vec<_>>()
    );

    // Every sensitivity file is what the cache crate's budget solver reads.
    for kind in SENSITIVITY_KINDS {
        let text = std::fs::read_to_string(dir.join(format!("sensitivities-{kind}.json"))).unwrap();
        let s: adaquant_cache::Sensitivities = serde_json::from_str(&text).unwrap();
        s.validate().unwrap();
        assert_eq!(s.n_layers(), 4, "{kind}");
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(raw["kind"], kind);
    }
    let wf = report.sensitivities("weight_fro").unwrap();
    assert_eq!(wf.k[3], report.layers[3].weights.w_k.whole.fro);
    assert!(report.sensitivities("nonsense").is_none());

    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("fails in layers 2-3"), "{md}");
    assert!(md.contains("| 3 |"));
}

#[test]
fn weights_only_report_has_no_activation_kinds() {
    let d = dims(2);
    let mut layers = synthetic_layers(&d, false);
    let head1 = layers[1].weights.w_k.heads[1].clone();
    let whole = layers[1].weights.w_k.whole.clone();
    layers[1].keep_heads(&[1]);
    assert_eq!(layers[1].weights.w_k.head_ids, vec![1]);
    assert_eq!(layers[1].weights.w_k.heads, vec![head1.clone()]);
    assert_eq!(layers[1].weights.w_k.head_fro, vec![head1.fro]);
    assert_eq!(layers[1].weights.w_k.whole, whole, "the whole-matrix numbers do not depend on the heads kept");
    let report = Report::new("w.gguf".into(), d, None, layers, Timings::default());
    assert_eq!(report.claims.len(), 2);
    assert!(report.sensitivities("act_fro").is_none() && report.sensitivities("quant_err").is_none());
    assert!(report.sensitivities("weight_spec").is_some());
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["layers"][0].get("k").is_none());
    let back: Report = serde_json::from_value(json).unwrap();
    assert!(back.layers.iter().all(|l| l.activations.is_none()));
    assert_eq!(back.claims.len(), 2);
}
