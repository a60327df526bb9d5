//! Sliding-window layers (Gemma 3's local layers): a query sees only the last `w` positions, the full-precision
//! caches hold at most the window plus one drop block, appends stay decode-faithful, and the quantized cache
//! refuses to pass a window it cannot slide.

use adaquant_cache::full::causal_attention_ref;
use adaquant_cache::{
    CacheError, CacheShape, FullDtype, FullPrecisionCache, KvCache, QuantCacheConfig, QuantizedCache,
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

#[test]
fn quantized_cache_refuses_to_pass_a_window() {
    let mut shape = shape();
    shape.head_dim = 64;
    let config = QuantCacheConfig::split(3, Bits::B4, Bits::B2).with_residual(16);
    let mut cache = QuantizedCache::new(shape.clone(), config).unwrap();
    let (q, k, v) = (rows(6, shape.q_row(), 1), rows(6, shape.kv_row(), 2), rows(6, shape.kv_row(), 3));
    let mut out = vec![0.0; q.len()];
    // Five tokens fit layer 2's window; the sixth does not.
    let five = 5 * shape.kv_row();
    cache.append_attend(2, &q[..5 * shape.q_row()], &k[..five], &v[..five], &mut out[..5 * shape.q_row()]).unwrap();
    let e = cache
        .append_attend(2, &q[5 * shape.q_row()..], &k[five..], &v[five..], &mut out[5 * shape.q_row()..])
        .unwrap_err();
    assert!(matches!(e, CacheError::WindowNotSupported { layer: 2, window: 5, .. }), "{e}");
    let mut bad = shape.clone();
    bad.windows = vec![Some(4)];
    assert!(FullPrecisionCache::new(bad).is_err());
}
