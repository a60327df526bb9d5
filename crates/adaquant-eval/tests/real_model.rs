//! Checks on the real SmolLM2 model and WikiText-2 (skipped with a message when they are absent).

use adaquant_cache::{CacheSpec, LayerPrecision, Precision, QuantCacheConfig};
use adaquant_eval::lm::{LanguageModel, WeightNorm};
use adaquant_eval::metrics::{window_logprobs, window_logprobs_stepwise};
use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use adaquant_model::{paths, Model};

fn prec(bits: Bits, group: usize, axis: GroupAxis) -> Precision {
    Precision::Quant(QuantSpec::new(bits, group, axis))
}

#[test]
fn parallel_equals_stepwise_on_the_real_model() {
    let Some(model_path) = paths::require(paths::default_model(), "parallel_equals_stepwise_on_the_real_model") else {
        return;
    };
    let Some(text_path) = paths::require(paths::wikitext2_test(), "parallel_equals_stepwise_on_the_real_model") else {
        return;
    };
    let model = Model::load(&model_path).unwrap();
    let text = std::fs::read_to_string(text_path).unwrap();
    let tokens = model.encode(&text[..4000], false).unwrap();
    let window = &tokens[100..148];
    let first = 24;
    let n = model.config.n_layers;
    let (tok, chan) = (GroupAxis::PerToken, GroupAxis::PerChannel);
    let configs = [
        QuantCacheConfig { layers: vec![LayerPrecision::new(prec(Bits::B4, 64, tok), prec(Bits::B2, 64, tok)); n], residual: 8, sinks: 2 },
        QuantCacheConfig { layers: vec![LayerPrecision::new(prec(Bits::B2, 16, chan), prec(Bits::B4, 32, tok)); n], residual: 16, sinks: 0 },
        QuantCacheConfig { layers: vec![LayerPrecision::new(prec(Bits::B3, 32, tok), prec(Bits::B1_58, 16, chan)); n], residual: 0, sinks: 1 },
    ];
    let mut fp = CacheSpec::FullF32.build(model.cache_shape(64)).unwrap();
    let full = window_logprobs(&model, fp.as_mut(), window, first).unwrap();
    for config in configs {
        let spec = CacheSpec::Quant(config);
        let mut a = spec.build(model.cache_shape(64)).unwrap();
        let mut b = spec.build(model.cache_shape(64)).unwrap();
        let par = window_logprobs(&model, a.as_mut(), window, first).unwrap();
        let step = window_logprobs_stepwise(&model, b.as_mut(), window, first).unwrap();
        let worst = par.iter().zip(&step).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let vs_full = par.iter().zip(&full).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        eprintln!("{}: parallel vs stepwise {worst:.2e}, vs f32 cache {vs_full:.2e}", a.describe());
        assert!(worst < 1e-4, "{}: parallel and stepwise differ by {worst}", a.describe());
        assert!(vs_full > 1e-3, "{}: quantization had no effect", a.describe());
    }
}

#[test]
fn weight_norms_come_from_the_model() {
    let Some(model_path) = paths::require(paths::default_model(), "weight_norms_come_from_the_model") else {
        return;
    };
    let model = Model::load(&model_path).unwrap();
    let (fk, fv) = model.kv_weight_norms(WeightNorm::Frobenius).unwrap().unwrap();
    let (sk, sv) = model.kv_weight_norms(WeightNorm::Spectral).unwrap().unwrap();
    assert_eq!(fk.len(), model.config.n_layers);
    for l in 0..fk.len() {
        let w = model.layer_weights(l);
        let direct = w.wk.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((fk[l] - direct).abs() < 1e-9 * direct);
        assert!(sk[l] > 0.0 && sk[l] <= fk[l] * (1.0 + 1e-9) && sv[l] <= fv[l] * (1.0 + 1e-9));
    }
}
