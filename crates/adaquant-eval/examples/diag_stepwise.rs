//! Diagnostic: parallel vs stepwise log-probabilities on the real model for a few caches.
use adaquant_cache::CacheSpec;
use adaquant_eval::lm::LanguageModel;
use adaquant_eval::metrics::{window_logprobs, window_logprobs_stepwise};
use adaquant_model::{paths, Model};

fn main() {
    let model = Model::load(&paths::default_model()).unwrap();
    let text = std::fs::read_to_string(paths::wikitext2_test()).unwrap();
    let tokens = model.encode(&text[..4000], false).unwrap();
    let window = &tokens[100..132];
    let first = 16;
    let mut fp = CacheSpec::FullF32.build(model.cache_shape(64)).unwrap();
    let full = window_logprobs(&model, fp.as_mut(), window, first).unwrap();
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    for spec in std::env::args().skip(1) {
        let spec: CacheSpec = spec.parse().unwrap();
        let mut a = spec.build(model.cache_shape(64)).unwrap();
        let mut b = spec.build(model.cache_shape(64)).unwrap();
        let par = window_logprobs(&model, a.as_mut(), window, first).unwrap();
        let step = window_logprobs_stepwise(&model, b.as_mut(), window, first).unwrap();
        let v = model.vocab();
        for r in 0..window.len() - first {
            let d = par[r * v..(r + 1) * v].iter().zip(&step[r * v..(r + 1) * v]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            print!("{d:.1e} ");
        }
        println!(" <- {}: parallel vs f32 {:.2e}, stepwise vs f32 {:.2e}", a.describe(), dist(&par, &full), dist(&step, &full));
    }
}
