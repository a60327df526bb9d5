//! Loads the default model and reports load time, prefill and decode throughput with a full-precision cache.
//!
//! `cargo run --release -p adaquant-model --example speed [-- <model> <tokens> <window>]`

use std::time::Instant;

use adaquant_cache::FullPrecisionCache;
use adaquant_model::{ForwardOptions, LogitsRange, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(Into::into).unwrap_or_else(adaquant_model::paths::default_model);
    let total: usize = args.get(2).map_or(Ok(4096), |s| s.parse())?;
    let window: usize = args.get(3).map_or(Ok(512), |s| s.parse())?;
    let t = Instant::now();
    let model = Model::load(&path)?;
    println!("load: {:.2} s ({} parameters)", t.elapsed().as_secs_f64(), model.config.n_params());
    let text = std::fs::read_to_string(adaquant_model::paths::wikitext2_test())?;
    let tokens = model.tokenizer().encode(&text[..200_000.min(text.len())], false)?;
    let windows = total / window;
    let mut cache = FullPrecisionCache::new(model.cache_shape(window.max(1024)))?;
    let t = Instant::now();
    for w in 0..windows {
        cache.clear_all();
        model.forward(&tokens[w * window..(w + 1) * window], &mut cache, &mut ForwardOptions::new(LogitsRange::All))?;
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "prefill: {} tokens in {window}-token windows, all logits: {dt:.2} s = {:.0} tokens/s",
        windows * window,
        (windows * window) as f64 / dt
    );
    cache.clear_all();
    model.forward(&tokens[..16], &mut cache, &mut ForwardOptions::new(LogitsRange::Last))?;
    let steps = 128;
    let t = Instant::now();
    for i in 0..steps {
        model.forward(&tokens[16 + i..17 + i], &mut cache, &mut ForwardOptions::new(LogitsRange::Last))?;
    }
    let dt = t.elapsed().as_secs_f64();
    println!("decode: {steps} tokens at depth 16..{}: {:.1} tokens/s", 16 + steps, steps as f64 / dt);
    Ok(())
}

trait ClearAll {
    fn clear_all(&mut self);
}

impl ClearAll for FullPrecisionCache {
    fn clear_all(&mut self) {
        adaquant_cache::KvCache::clear(self);
    }
}
