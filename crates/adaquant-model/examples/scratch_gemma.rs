use adaquant_cache::FullPrecisionCache;
use adaquant_model::{ForwardOptions, LogitsRange, Model};
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let t = std::time::Instant::now();
    let m = Model::load(std::path::Path::new(&path)).unwrap();
    eprintln!("loaded in {:?}: {:?}", t.elapsed(), m.config);
    let tok = m.tokenizer();
    let ids = tok.encode("The capital of France is", tok.add_bos()).unwrap();
    eprintln!("ids {ids:?}");
    let mut cache = FullPrecisionCache::new(m.cache_shape(128)).unwrap();
    let mut out = ids.clone();
    let mut logits = m.forward(&ids, &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
    for _ in 0..30 {
        let next = logits.argmax(0);
        out.push(next);
        logits = m.forward(&[next], &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
    }
    println!("{}", tok.decode(&out).unwrap());
}
