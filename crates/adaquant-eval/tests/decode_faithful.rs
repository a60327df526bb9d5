//! The parallel evaluator (one forward per window) equals stepping token by token through the real quantized cache,
//! to 1e-4 in log-probability, on every layout: per-token and per-channel keys and values, several widths, with and
//! without a residual window and attention sinks, uniform and mixed per-layer precision.

use adaquant_cache::{CacheSpec, LayerPrecision, Precision, QuantCacheConfig};
use adaquant_eval::data::SplitMix;
use adaquant_eval::lm::{LanguageModel, ToyLm};
use adaquant_eval::metrics::{window_logprobs, window_logprobs_stepwise};
use adaquant_kernels::{Bits, GroupAxis, QuantSpec};

fn prec(bits: Bits, group: usize, axis: GroupAxis) -> Precision {
    Precision::Quant(QuantSpec::new(bits, group, axis))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn parallel_equals_stepwise_on_every_layout() {
    let lm = ToyLm::small(21);
    let n_layers = lm.n_layers;
    let mut rng = SplitMix(5);
    let window: Vec<u32> = (0..77).map(|_| rng.range(0, lm.vocab as u64) as u32).collect();
    let first = 30;
    let (tok, chan) = (GroupAxis::PerToken, GroupAxis::PerChannel);
    // (K precision, V precision, residual, sinks); per-channel groups of 16 tokens need residual % 16 == 0.
    let cases: Vec<(Precision, Precision, usize, usize)> = vec![
        (prec(Bits::B4, 16, tok), prec(Bits::B2, 16, tok), 0, 0),
        (prec(Bits::B2, 16, tok), prec(Bits::B4, 16, tok), 8, 0),
        (prec(Bits::B4, 8, tok), prec(Bits::B2, 16, tok), 5, 3),
        (prec(Bits::B4, 16, chan), prec(Bits::B2, 16, tok), 16, 0),
        (prec(Bits::B2, 16, chan), prec(Bits::B2, 16, tok), 0, 4),
        (prec(Bits::B3, 16, tok), prec(Bits::B4, 16, chan), 16, 2),
        (prec(Bits::B1_58, 16, chan), prec(Bits::B1_58, 16, chan), 32, 1),
        (prec(Bits::B8, 16, tok), Precision::Full, 0, 0),
        (Precision::Full, prec(Bits::B1, 16, tok), 4, 0),
        (prec(Bits::B5, 16, tok), prec(Bits::B6, 16, chan), 0, 0),
    ];
    let full = {
        let mut c = CacheSpec::FullF32.build(lm.cache_shape(128)).unwrap();
        window_logprobs(&lm, c.as_mut(), &window, first).unwrap()
    };
    for (i, (k, v, residual, sinks)) in cases.iter().enumerate() {
        let mut layers = vec![LayerPrecision::new(*k, *v); n_layers];
        // Mixed precision across layers: the last layer swaps its K and V recipes.
        if i % 2 == 1 {
            layers[n_layers - 1] = LayerPrecision::new(*v, *k);
        }
        let config = QuantCacheConfig { layers, residual: *residual, sinks: *sinks };
        let spec = CacheSpec::Quant(config.clone());
        let mut a = spec.build(lm.cache_shape(128)).unwrap_or_else(|e| panic!("case {i} {config:?}: {e}"));
        let mut b = spec.build(lm.cache_shape(128)).unwrap();
        let par = window_logprobs(&lm, a.as_mut(), &window, first).unwrap();
        let step = window_logprobs_stepwise(&lm, b.as_mut(), &window, first).unwrap();
        let d = max_abs_diff(&par, &step);
        assert!(d < 1e-4, "case {i} ({}): parallel and stepwise differ by {d}", a.describe());
        assert_eq!(a.memory().total_bytes(), b.memory().total_bytes(), "case {i}");
        // The quantized cache must really change the model's predictions, or the comparison proves nothing.
        let vs_full = max_abs_diff(&par, &full);
        assert!(vs_full > 1e-3, "case {i} ({}): no quantization effect ({vs_full})", a.describe());
    }
}

#[test]
fn reusing_a_cache_across_windows_equals_a_fresh_cache() {
    let lm = ToyLm::small(8);
    let layer = LayerPrecision::new(prec(Bits::B3, 16, GroupAxis::PerToken), prec(Bits::B2, 16, GroupAxis::PerToken));
    let spec = CacheSpec::Quant(QuantCacheConfig::uniform(lm.n_layers, layer).with_residual(4).with_sinks(1));
    let mut rng = SplitMix(17);
    let w1: Vec<u32> = (0..40).map(|_| rng.range(0, 64) as u32).collect();
    let w2: Vec<u32> = (0..40).map(|_| rng.range(0, 64) as u32).collect();
    let mut reused = spec.build(lm.cache_shape(64)).unwrap();
    window_logprobs(&lm, reused.as_mut(), &w1, 20).unwrap();
    let second = window_logprobs(&lm, reused.as_mut(), &w2, 20).unwrap();
    let mut fresh = spec.build(lm.cache_shape(64)).unwrap();
    let expect = window_logprobs(&lm, fresh.as_mut(), &w2, 20).unwrap();
    assert_eq!(second, expect);
}
