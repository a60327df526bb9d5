//! Checks on the real SmolLM2 model and WikiText-2 (skipped with a message when they are absent).

use adaquant_cache::{CacheSpec, LayerPrecision, Precision, QuantCacheConfig, Quantizer};
use adaquant_eval::lm::{LanguageModel, WeightNorm};
use adaquant_eval::metrics::{window_logprobs, window_logprobs_stepwise};
use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use adaquant_model::{paths, ForwardOptions, LayerHook, LayerTaps, LogitsRange, Model};

fn prec(bits: Bits, group: usize, axis: GroupAxis) -> Precision {
    Precision::Quant(QuantSpec::new(bits, group, axis))
}

/// Captures each layer's queries, keys and values of one forward.
struct Capture(Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>);

impl LayerHook for Capture {
    fn on_layer(&mut self, layer: usize, taps: &LayerTaps<'_>) {
        let e = &mut self.0[layer];
        e.0.extend_from_slice(taps.q);
        e.1.extend_from_slice(taps.k);
        e.2.extend_from_slice(taps.v);
    }
}

/// `prec` with a quantizer family.
fn fam(q: Quantizer, bits: Bits, group: usize, axis: GroupAxis) -> Precision {
    Precision::Quant(q.apply(QuantSpec::new(bits, group, axis)))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// End to end, one forward over a window gives the same log-probabilities as decoding it token by token, with the
/// f32 cache and with quantized caches of every layout (the forward is batch-invariant, see `adaquant_model::gemm`,
/// so a token's keys and values, and hence its codes, are the same either way); and at the cache level, one append
/// of the real model's activations equals appending them token by token.
#[test]
fn parallel_equals_stepwise_on_the_real_model() {
    let name = "parallel_equals_stepwise_on_the_real_model";
    let (Some(model_path), Some(text_path)) =
        (paths::require(paths::default_model(), name), paths::require(paths::wikitext2_test(), name))
    else {
        return;
    };
    let model = Model::load(&model_path).unwrap();
    let text = std::fs::read_to_string(text_path).unwrap();
    let tokens = model.encode(&text[..4000], false).unwrap();
    let window = &tokens[100..148];
    let first = 24;
    let mut a = CacheSpec::FullF32.build(model.cache_shape(64)).unwrap();
    let mut b = CacheSpec::FullF32.build(model.cache_shape(64)).unwrap();
    let par = window_logprobs(&model, a.as_mut(), window, first).unwrap();
    let step = window_logprobs_stepwise(&model, b.as_mut(), window, first).unwrap();
    let d = max_abs_diff(&par, &step);
    assert!(d == 0.0, "f32 cache: parallel and stepwise differ by {d}");

    // The quantized cache on the real model's activations (shapes 9/3/64, real outlier channels): one append of the
    // whole window equals appending token by token, on every layout, to 1e-5 in the attention outputs.
    let n_layers = model.config.n_layers;
    let mut cap = Capture(vec![Default::default(); n_layers]);
    let mut fp = CacheSpec::FullF32.build(model.cache_shape(64)).unwrap();
    model.forward(window, fp.as_mut(), &mut ForwardOptions::with_hook(LogitsRange::None, &mut cap)).unwrap();
    let shape = model.cache_shape(64);
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let (tok, chan) = (GroupAxis::PerToken, GroupAxis::PerChannel);
    let layouts = [
        (prec(Bits::B4, 64, tok), prec(Bits::B2, 64, tok), 8, 2),
        (prec(Bits::B2, 64, tok), prec(Bits::B4, 64, tok), 0, 0),
        (prec(Bits::B2, 16, chan), prec(Bits::B4, 32, tok), 16, 0),
        (prec(Bits::B3, 32, tok), prec(Bits::B1_58, 16, chan), 0, 1),
        (prec(Bits::B8, 16, chan), prec(Bits::B5, 16, chan), 0, 4),
        (Precision::Full, prec(Bits::B6, 16, chan), 0, 0),
        (prec(Bits::B1, 32, tok), Precision::Full, 0, 0),
        // Every quantizer family: HQQ, rotations (keys after RoPE, queries and outputs once per step), Lloyd-Max.
        (fam(Quantizer::Hqq, Bits::B4, 64, tok), fam(Quantizer::Hqq, Bits::B2, 64, tok), 8, 2),
        (fam(Quantizer::RotMinMax, Bits::B3, 16, chan), fam(Quantizer::RotHqq, Bits::B2, 32, tok), 16, 0),
        (fam(Quantizer::RotLloyd, Bits::B2, 64, tok), fam(Quantizer::RotLloyd, Bits::B1_58, 16, chan), 0, 1),
        (fam(Quantizer::Lloyd, Bits::B4, 16, chan), fam(Quantizer::RotLloyd, Bits::B3, 64, tok), 0, 0),
    ];
    for (k, v, residual, sinks) in layouts {
        let spec =
            CacheSpec::Quant(QuantCacheConfig { layers: vec![LayerPrecision::new(k, v); n_layers], residual, sinks });
        let mut a = spec.build(model.cache_shape(64)).unwrap();
        let mut b = spec.build(model.cache_shape(64)).unwrap();
        let par = window_logprobs(&model, a.as_mut(), window, first).unwrap();
        let step = window_logprobs_stepwise(&model, b.as_mut(), window, first).unwrap();
        let d = max_abs_diff(&par, &step);
        // The bound is 1e-4; a batch-invariant forward gives the same bits.
        assert!(d == 0.0, "{}: parallel and stepwise log-probabilities differ by {d}", a.describe());
        assert_eq!(a.memory(), b.memory());
        let mut one = spec.build(shape.clone()).unwrap();
        let mut many = spec.build(shape.clone()).unwrap();
        for (layer, (q, kk, vv)) in cap.0.iter().enumerate() {
            let mut out_one = vec![0.0f32; q.len()];
            one.append_attend(layer, q, kk, vv, &mut out_one).unwrap();
            let mut out_many = vec![0.0f32; q.len()];
            for t in 0..window.len() {
                many.append_attend(
                    layer,
                    &q[t * qr..(t + 1) * qr],
                    &kk[t * kr..(t + 1) * kr],
                    &vv[t * kr..(t + 1) * kr],
                    &mut out_many[t * qr..(t + 1) * qr],
                )
                .unwrap();
            }
            let scale = out_one.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
            let d = max_abs_diff(&out_one, &out_many) / scale;
            assert!(
                d < 1e-5,
                "{} layer {layer}: one append vs token by token differ by {d} (relative)",
                one.describe()
            );
        }
        assert_eq!(one.memory(), many.memory());
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
