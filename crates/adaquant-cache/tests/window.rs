//! Sliding-window layers (Gemma 3's local layers): a query sees only the last `w` positions, every cache holds at
//! most the window (or its exact window) plus one drop block, and appends stay decode-faithful.

use adaquant_cache::full::causal_attention_ref;
use adaquant_cache::{
    CacheShape, FullDtype, FullPrecisionCache, Kv, KvCache, LayerPrecision, Precision, QuantCacheConfig,
    QuantizedCache, Quantizer,
};
use adaquant_kernels::format::Bits;
use rand::{Rng, SeedableRng};

/// Three layers: the first and last slide over 37 and 5 tokens, the middle one is global.
fn shape() -> CacheShape {
    let mut s = CacheShape::new(3, 4, 2, 16, 400);
    s.windows = vec![Some(37), None, Some(5)];
    s
}

fn rows(n: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n * width).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Appends `n` tokens in the given chunk sizes and returns every attention output.
fn run(cache: &mut dyn KvCache, layer: usize, q: &[f32], k: &[f32], v: &[f32], chunks: &[usize]) -> Vec<f32> {
    let s = cache.shape().clone();
    let (qr, kr) = (s.q_row(), s.kv_row());
    let mut out = vec![0.0; q.len()];
    let mut t = 0;
    for &c in chunks {
        cache
            .append_attend(
                layer,
                &q[t * qr..(t + c) * qr],
                &k[t * kr..(t + c) * kr],
                &v[t * kr..(t + c) * kr],
                &mut out[t * qr..(t + c) * qr],
            )
            .unwrap();
        t += c;
    }
    out
}

/// Queries see positions `p + 1 - w ..= p`: the plain causal reference over each query's own window.
fn windowed_reference(shape: &CacheShape, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let mut plain = shape.clone();
    plain.windows.clear();
    let n = q.len() / qr;
    let mut out = vec![0.0; q.len()];
    for p in 0..n {
        let lo = shape.window_start(layer, p);
        let (ks, vs) = (&k[lo * kr..(p + 1) * kr], &v[lo * kr..(p + 1) * kr]);
        causal_attention_ref(&plain, ks, vs, p - lo, &q[p * qr..(p + 1) * qr], &mut out[p * qr..(p + 1) * qr]);
    }
    out
}

#[test]
fn full_precision_caches_slide_faithfully_with_bounded_memory() {
    let shape = shape();
    let n = 300;
    for dtype in [FullDtype::F32, FullDtype::F16] {
        for layer in 0..3 {
            let seed = 10 * layer as u64;
            let (q, k, v) =
                (rows(n, shape.q_row(), seed), rows(n, shape.kv_row(), seed + 1), rows(n, shape.kv_row(), seed + 2));
            let mut one = FullPrecisionCache::with_dtype(shape.clone(), dtype).unwrap();
            let a = run(&mut one, layer, &q, &k, &v, &[n]);
            let mut steps = FullPrecisionCache::with_dtype(shape.clone(), dtype).unwrap();
            let b = run(&mut steps, layer, &q, &k, &v, &vec![1; n]);
            let mut mixed = FullPrecisionCache::with_dtype(shape.clone(), dtype).unwrap();
            let c = run(&mut mixed, layer, &q, &k, &v, &[3, 70, 1, 1, 100, 64, 61]);
            assert_eq!(a, b, "{dtype:?} layer {layer}: one call and token-by-token differ");
            assert_eq!(a, c, "{dtype:?} layer {layer}: chunked appends differ");
            if dtype == FullDtype::F32 {
                let r = windowed_reference(&shape, layer, &q, &k, &v);
                let worst = a.iter().zip(&r).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(worst < 1e-5, "layer {layer}: max error {worst} against the windowed reference");
            }
            // The middle layer keeps everything; a sliding layer holds less than its window plus one drop block.
            let held = steps.memory().layers[layer].tokens;
            match shape.window(layer) {
                Some(w) => assert!(held >= w && held < w + 64, "layer {layer} holds {held} tokens"),
                None => assert_eq!(held, n),
            }
            assert_eq!(steps.seq_len(layer), n);
        }
    }
}

#[test]
fn a_window_changes_the_result_once_the_context_passes_it() {
    let shape = shape();
    let n = 60;
    let (q, k, v) = (rows(n, shape.q_row(), 5), rows(n, shape.kv_row(), 6), rows(n, shape.kv_row(), 7));
    let mut plain_shape = shape.clone();
    plain_shape.windows.clear();
    let a = run(&mut FullPrecisionCache::new(shape.clone()).unwrap(), 0, &q, &k, &v, &[n]);
    let b = run(&mut FullPrecisionCache::new(plain_shape).unwrap(), 0, &q, &k, &v, &[n]);
    let qr = shape.q_row();
    assert_eq!(a[..37 * qr], b[..37 * qr], "within the window nothing changes");
    assert_ne!(a[37 * qr..], b[37 * qr..], "past the window the oldest tokens must drop out");
}

/// Quantized layouts that slide differently: per-token groups cut at any token, 1.58-bit codes only every five
/// tokens of 32 channels, per-channel keys only at whole 16-token groups; rotated codebooks; an unquantized side
/// beside a quantized one; sinks; exact windows shorter and longer than the sliding window.
fn sliding_configs() -> Vec<(&'static str, QuantCacheConfig)> {
    let lp = |k: Precision, v: Precision| LayerPrecision::new(k, v);
    let rot = |p: Precision| match p {
        Precision::Quant(s) => Precision::Quant(Quantizer::RotLloyd.apply(s)),
        f => f,
    };
    vec![
        (
            "K4V2 r4",
            QuantCacheConfig::uniform(3, lp(Precision::per_token(Bits::B4, 16), Precision::per_token(Bits::B2, 8)))
                .with_residual(4),
        ),
        (
            "K1.58V3 r3 s2",
            QuantCacheConfig::uniform(3, lp(Precision::per_token(Bits::B1_58, 16), Precision::per_token(Bits::B3, 32)))
                .with_residual(3)
                .with_sinks(2),
        ),
        (
            "kivi K2V4 r2 s3",
            QuantCacheConfig::uniform(3, lp(Precision::per_channel(Bits::B2, 16), Precision::per_token(Bits::B4, 16)))
                .with_residual(16)
                .with_sinks(3),
        ),
        (
            "rot-lloyd K3V2 r8",
            QuantCacheConfig::uniform(
                3,
                lp(rot(Precision::per_token(Bits::B3, 32)), rot(Precision::per_token(Bits::B2, 16))),
            )
            .with_residual(8),
        ),
        (
            "K-full V2 r5 s1",
            QuantCacheConfig::uniform(3, lp(Precision::Full, Precision::per_token(Bits::B2, 16)))
                .with_residual(5)
                .with_sinks(1),
        ),
        (
            "K4V4 r50",
            QuantCacheConfig::uniform(3, lp(Precision::per_token(Bits::B4, 16), Precision::per_token(Bits::B4, 16)))
                .with_residual(50),
        ),
        ("full", QuantCacheConfig::full(3)),
    ]
}

/// Token-by-token, each output equals the reference attention over the query's window of the history a cache that
/// does not slide holds at that moment (same tokens quantized at the same time); one call, token-by-token and
/// chunked appends agree bit for bit; memory equals the formula and stays bounded by the window.
#[test]
fn quantized_cache_slides_faithfully_with_bounded_memory() {
    let mut shape = shape();
    shape.head_dim = 32;
    let (d, h) = (shape.head_dim, shape.n_kv_heads);
    let n = 260;
    for (name, config) in sliding_configs() {
        for layer in 0..3 {
            let seed = 100 + layer as u64;
            let (q, k, v) =
                (rows(n, shape.q_row(), seed), rows(n, shape.kv_row(), seed + 1), rows(n, shape.kv_row(), seed + 2));
            let mut steps = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
            let mut plain_shape = shape.clone();
            plain_shape.windows.clear();
            let mut twin = QuantizedCache::new(plain_shape.clone(), config.clone()).unwrap();
            let (qr, kr) = (shape.q_row(), shape.kv_row());
            let mut outs = vec![0.0; q.len()];
            let mut tokens = [0usize; 3];
            let mut most_held = 0;
            for p in 0..n {
                let (qs, ks, vs) = (&q[p * qr..(p + 1) * qr], &k[p * kr..(p + 1) * kr], &v[p * kr..(p + 1) * kr]);
                steps.append_attend(layer, qs, ks, vs, &mut outs[p * qr..(p + 1) * qr]).unwrap();
                twin.append(layer, ks, vs).unwrap();
                // The twin's history, in the model's basis, interleaved back to [t][heads][head_dim].
                let hist = |kv: Kv| -> Vec<f32> {
                    let per: Vec<Vec<f32>> = (0..h).map(|hd| twin.materialize(layer, kv, hd).unwrap()).collect();
                    (0..=p)
                        .flat_map(|t| (0..h).flat_map(|hd| per[hd][t * d..(t + 1) * d].to_vec()).collect::<Vec<_>>())
                        .collect()
                };
                let (hk, hv) = (hist(Kv::K), hist(Kv::V));
                let lo = shape.window_start(layer, p);
                let mut want = vec![0.0; qr];
                causal_attention_ref(&plain_shape, &hk[lo * kr..], &hv[lo * kr..], p - lo, qs, &mut want);
                let got = &outs[p * qr..(p + 1) * qr];
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(
                    worst < 2e-4,
                    "{name} layer {layer} position {p}: max error {worst} against the windowed reference"
                );
                tokens[layer] = p + 1;
                assert_eq!(
                    steps.memory(),
                    adaquant_cache::expected_memory(&config, &shape, &tokens),
                    "{name} layer {layer} after {} tokens",
                    p + 1
                );
                let held = (0..h)
                    .map(|hd| {
                        steps
                            .materialize(layer, Kv::K, hd)
                            .unwrap()
                            .len()
                            .max(steps.materialize(layer, Kv::V, hd).unwrap().len())
                            / d
                    })
                    .max()
                    .unwrap();
                most_held = most_held.max(held);
            }
            match shape.window(layer) {
                Some(w) => {
                    // Sinks, the window or the exact tail (whichever is longer) with a partial per-channel group,
                    // and less than one drop block (at most 80 tokens for 1.58-bit keys of 32 channels).
                    let bound = config.sinks + w.max(config.residual + 16) + 80;
                    assert!(most_held <= bound, "{name} layer {layer} held {most_held} tokens, bound {bound}");
                    assert!(most_held < n, "{name} layer {layer} never dropped anything");
                }
                None => assert_eq!(most_held, n),
            }
            for chunks in [vec![n], vec![3, 70, 1, 1, 100, 64, 21], vec![37, 38, 5, 180]] {
                let mut c = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
                let got = run(&mut c, layer, &q, &k, &v, &chunks);
                assert_eq!(got, outs, "{name} layer {layer}: appends in chunks {chunks:?} differ from token by token");
                assert_eq!(c.memory(), steps.memory(), "{name} layer {layer} chunks {chunks:?}");
            }
        }
    }
}

#[test]
fn a_window_of_zero_is_refused() {
    let mut bad = shape();
    bad.windows = vec![Some(4), None, Some(0)];
    assert!(FullPrecisionCache::new(bad.clone()).is_err());
    assert!(QuantizedCache::new(bad, QuantCacheConfig::split(3, Bits::B4, Bits::B2)).is_err());
    let mut short = shape();
    short.windows = vec![Some(4)];
    assert!(FullPrecisionCache::new(short).is_err());
}
