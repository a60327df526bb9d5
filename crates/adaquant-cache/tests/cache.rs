//! Cross-path tests of the quantized cache: chunking invariance, quantize-once, attention against the kernels'
//! reference, byte accounting against the formula, and equality with the full-precision cache.

use adaquant_cache::quant::{side_split, EXACT_BYTES};
use adaquant_cache::{
    expected_memory, CacheError, CacheShape, CacheSpec, FullDtype, FullPrecisionCache, Kv, KvCache, LayerPrecision,
    Precision, QuantCacheConfig, QuantizedCache, Quantizer,
};
use adaquant_kernels::attn::{decode_attention_ref, HeadKv};
use adaquant_kernels::quant::quantize;
use adaquant_kernels::{Bits, GroupAxis, MetaDtype, QuantSpec};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

struct Seq {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Random queries, keys and values for `n` tokens of one layer; keys get a per-channel offset like real keys.
fn seq(shape: &CacheShape, n: usize, seed: u64) -> Seq {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let offsets: Vec<f32> = (0..kr).map(|_| 3.0 * normal.sample(&mut rng)).collect();
    let q = (0..n * qr).map(|_| normal.sample(&mut rng)).collect();
    let k = (0..n * kr).map(|i| normal.sample(&mut rng) + offsets[i % kr]).collect();
    let v = (0..n * kr).map(|_| normal.sample(&mut rng)).collect();
    Seq { q, k, v }
}

/// Appends `s` to `layer` in chunks of the given sizes and returns all outputs.
fn run(cache: &mut dyn KvCache, layer: usize, s: &Seq, chunks: &[usize]) -> Vec<f32> {
    let shape = cache.shape().clone();
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let mut out = vec![0.0; s.q.len()];
    let mut t = 0;
    for &c in chunks {
        cache
            .append_attend(
                layer,
                &s.q[t * qr..(t + c) * qr],
                &s.k[t * kr..(t + c) * kr],
                &s.v[t * kr..(t + c) * kr],
                &mut out[t * qr..(t + c) * qr],
            )
            .unwrap();
        t += c;
    }
    assert_eq!(t * kr, s.k.len(), "chunks must cover the sequence");
    out
}

fn random_chunks(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut left = n;
    let mut out = Vec::new();
    while left > 0 {
        let c = rng.random_range(1..=left.min(70));
        out.push(c);
        left -= c;
    }
    out
}

fn shape() -> CacheShape {
    CacheShape::new(3, 6, 2, 64, 512)
}

/// Configurations with awkward windows: per-token and per-channel keys, sinks, ternary, an unquantized side, and
/// layers that differ.
fn configs() -> Vec<QuantCacheConfig> {
    let mut mixed = QuantCacheConfig::split(3, Bits::B4, Bits::B2).with_residual(24).with_sinks(3);
    mixed.layers[0] = LayerPrecision::new(Precision::Full, Precision::per_token(Bits::B3, 16));
    mixed.layers[1] = LayerPrecision::new(Precision::per_channel(Bits::B1_58, 8), Precision::Full);
    mixed.layers[2] = LayerPrecision::new(Precision::per_token(Bits::B6, 8), Precision::per_token(Bits::B1, 32));
    let mut f32_meta = QuantCacheConfig::kivi(3, Bits::B5, Bits::B3).with_residual(16);
    for l in &mut f32_meta.layers {
        l.k =
            Precision::Quant(QuantSpec { meta: MetaDtype::F32, ..QuantSpec::new(Bits::B5, 16, GroupAxis::PerChannel) });
    }
    vec![
        QuantCacheConfig::split(3, Bits::B4, Bits::B2).with_residual(13),
        QuantCacheConfig::kivi(3, Bits::B4, Bits::B2).with_residual(0),
        {
            let mut c = QuantCacheConfig::kivi(3, Bits::B8, Bits::B1_58).with_residual(32).with_sinks(5);
            for l in &mut c.layers {
                l.k = Precision::per_channel(Bits::B8, 16);
                l.v = Precision::per_token(Bits::B1_58, 16);
            }
            c
        },
        mixed,
        f32_meta,
        quantizer_mix(),
    ]
}

/// Every quantizer family on some side of some layer: HQQ, rotated min-max keys with Lloyd-Max values, rotated
/// Lloyd-Max on both sides in per-channel and ternary layouts, rotated values only.
fn quantizer_mix() -> QuantCacheConfig {
    let q = |f: Quantizer, p: Precision| match p {
        Precision::Quant(s) => Precision::Quant(f.apply(s)),
        p => p,
    };
    let mut c = QuantCacheConfig::split(3, Bits::B4, Bits::B2).with_residual(16).with_sinks(2);
    c.layers[0] = LayerPrecision::new(
        q(Quantizer::Hqq, Precision::per_channel(Bits::B3, 16)),
        q(Quantizer::RotLloyd, Precision::per_token(Bits::B2, 32)),
    );
    c.layers[1] = LayerPrecision::new(
        q(Quantizer::RotMinMax, Precision::per_token(Bits::B4, 16)),
        q(Quantizer::Lloyd, Precision::per_channel(Bits::B1_58, 8)),
    );
    c.layers[2] = LayerPrecision::new(
        q(Quantizer::RotLloyd, Precision::per_channel(Bits::B4, 16)),
        q(Quantizer::RotHqq, Precision::per_token(Bits::B3, 64)),
    );
    c
}

#[test]
fn all_unquantized_is_bit_identical_to_the_full_precision_cache() {
    let shape = shape();
    let n = 150;
    let mut full = FullPrecisionCache::new(shape.clone()).unwrap();
    let config = QuantCacheConfig::full(3).with_sinks(4).with_residual(8);
    let mut quant = QuantizedCache::new(shape.clone(), config).unwrap();
    for layer in 0..3 {
        let s = seq(&shape, n, 40 + layer as u64);
        let chunks = random_chunks(n, layer as u64);
        let a = run(&mut full, layer, &s, &chunks);
        let b = run(&mut quant, layer, &s, &random_chunks(n, 99 + layer as u64));
        assert_eq!(a, b, "layer {layer}");
    }
    assert_eq!(full.memory(), quant.memory());
    assert_eq!(quant.describe(), "K16V16 r8 s4");
}

#[test]
fn token_by_token_chunks_and_prefill_agree_exactly() {
    let shape = shape();
    let n = 140;
    for (ci, config) in configs().into_iter().enumerate() {
        let plans = [vec![1; n], random_chunks(n, 7 + ci as u64), random_chunks(n, 100 + ci as u64), vec![n]];
        let mut caches: Vec<QuantizedCache> =
            plans.iter().map(|_| QuantizedCache::new(shape.clone(), config.clone()).unwrap()).collect();
        for layer in 0..shape.n_layers {
            let s = seq(&shape, n, 1000 * ci as u64 + layer as u64);
            let outs: Vec<Vec<f32>> = caches.iter_mut().zip(&plans).map(|(c, p)| run(c, layer, &s, p)).collect();
            for (pi, o) in outs.iter().enumerate().skip(1) {
                let diff = o.iter().zip(&outs[0]).position(|(a, b)| a != b);
                assert!(diff.is_none(), "config {ci} layer {layer} plan {pi}: first difference at {diff:?}");
            }
        }
        for c in &caches[1..] {
            for layer in 0..shape.n_layers {
                for head in 0..shape.n_kv_heads {
                    for kv in [Kv::K, Kv::V] {
                        assert_eq!(c.packed(layer, kv, head), caches[0].packed(layer, kv, head), "config {ci}");
                        assert_eq!(c.exact_parts(layer, kv, head), caches[0].exact_parts(layer, kv, head));
                    }
                }
            }
            assert_eq!(c.memory(), caches[0].memory());
        }
    }
}

/// Rows of one head from a token-major `[t][kv_head][head_dim]` buffer.
fn head_rows(x: &[f32], shape: &CacheShape, head: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let (h, d) = (shape.n_kv_heads, shape.head_dim);
    range.flat_map(|t| x[(t * h + head) * d..(t * h + head + 1) * d].to_vec()).collect()
}

#[test]
fn every_value_is_quantized_once_from_the_original_input() {
    let shape = shape();
    let n = 203;
    for (ci, config) in configs().into_iter().enumerate() {
        let mut cache = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        for layer in 0..shape.n_layers {
            let s = seq(&shape, n, 77 + ci as u64 * 10 + layer as u64);
            run(&mut cache, layer, &s, &random_chunks(n, 5 + layer as u64));
            let prec = config.layers[layer];
            for (kv, p, x) in [(Kv::K, prec.k, &s.k), (Kv::V, prec.v, &s.v)] {
                let (ns, nq, nt) = side_split(&p, n, config.residual, config.sinks);
                for head in 0..shape.n_kv_heads {
                    // A rotated side holds every token rotated by its head's rotation (the fast transform).
                    let head_rows = |x: &[f32], shape: &CacheShape, head: usize, range: std::ops::Range<usize>| {
                        let mut rows = head_rows(x, shape, head, range);
                        if let Some(r) = cache.rotation(layer, kv, head) {
                            r.rotate(&mut rows);
                        }
                        rows
                    };
                    assert_eq!(
                        cache.rotation(layer, kv, head).is_some(),
                        p.spec().is_some_and(|s| s.rotation.is_some())
                    );
                    let (sink, tail) = cache.exact_parts(layer, kv, head).unwrap();
                    match p.spec() {
                        None => {
                            assert!(cache.packed(layer, kv, head).is_none());
                            let mut all = sink;
                            all.extend(tail);
                            assert_eq!(all, head_rows(x, &shape, head, 0..n));
                        }
                        Some(spec) => {
                            assert_eq!(sink, head_rows(x, &shape, head, 0..ns));
                            assert_eq!(tail, head_rows(x, &shape, head, ns + nq..n));
                            assert_eq!(tail.len(), nt * shape.head_dim);
                            let direct =
                                quantize(spec, shape.head_dim, &head_rows(x, &shape, head, ns..ns + nq)).unwrap();
                            assert_eq!(cache.packed(layer, kv, head).unwrap(), direct.view(), "config {ci} {kv:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn window_lengths_follow_the_group_layout() {
    let shape = CacheShape::new(1, 2, 1, 32, 1024);
    let config = QuantCacheConfig {
        layers: vec![LayerPrecision::new(Precision::per_channel(Bits::B4, 16), Precision::per_token(Bits::B2, 32))],
        residual: 32,
        sinks: 2,
    };
    let mut cache = QuantizedCache::new(shape.clone(), config).unwrap();
    let s = seq(&shape, 200, 3);
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let mut out = vec![0.0; qr];
    for t in 0..200 {
        cache
            .append_attend(
                0,
                &s.q[t * qr..(t + 1) * qr],
                &s.k[t * kr..(t + 1) * kr],
                &s.v[t * kr..(t + 1) * kr],
                &mut out,
            )
            .unwrap();
        let held = t + 1;
        let (_, k_tail) = cache.exact_parts(0, Kv::K, 0).unwrap();
        let (_, v_tail) = cache.exact_parts(0, Kv::V, 0).unwrap();
        let (k_tail, v_tail) = (k_tail.len() / 32, v_tail.len() / 32);
        if held > 2 + 32 {
            assert_eq!(v_tail, 32, "per-token values keep exactly the window at {held}");
            assert!((32..32 + 16).contains(&k_tail), "per-channel keys keep 32..47 exact, got {k_tail} at {held}");
        } else {
            assert_eq!(v_tail, held.saturating_sub(2));
        }
    }
}

#[test]
fn attention_matches_the_kernels_reference_over_the_dequantized_cache() {
    let shape = shape();
    let n = 120;
    for (ci, config) in configs().into_iter().enumerate() {
        // Cache A takes one prefill; cache B decodes token by token, and after every token the reference runs over
        // B's materialized history, which is what query t must have seen in A.
        let mut a = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        let mut b = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        let layer = 2;
        let s = seq(&shape, n, 500 + ci as u64);
        let out_a = run(&mut a, layer, &s, &[n]);
        let (qr, kr, d) = (shape.q_row(), shape.kv_row(), shape.head_dim);
        let mut scratch = vec![0.0; qr];
        let mut worst = 0.0f32;
        for t in 0..n {
            b.append_attend(
                layer,
                &s.q[t * qr..(t + 1) * qr],
                &s.k[t * kr..(t + 1) * kr],
                &s.v[t * kr..(t + 1) * kr],
                &mut scratch,
            )
            .unwrap();
            let ks: Vec<Vec<f32>> = (0..shape.n_kv_heads).map(|h| b.materialize(layer, Kv::K, h).unwrap()).collect();
            let vs: Vec<Vec<f32>> = (0..shape.n_kv_heads).map(|h| b.materialize(layer, Kv::V, h).unwrap()).collect();
            let heads: Vec<HeadKv<'_>> = ks.iter().zip(&vs).map(|(k, v)| HeadKv::exact(k, v)).collect();
            let mut reference = vec![0.0; qr];
            decode_attention_ref(&s.q[t * qr..(t + 1) * qr], &heads, d, shape.softmax_scale, &mut reference).unwrap();
            for (x, r) in out_a[t * qr..(t + 1) * qr].iter().zip(&reference) {
                worst = worst.max((x - r).abs());
            }
        }
        assert!(worst < 2e-4, "config {ci}: max |cache - reference| = {worst}");
    }
}

#[test]
fn quantized_attention_differs_from_exact_and_more_bits_help() {
    // Guards against a cache that silently keeps everything exact.
    let shape = CacheShape::new(1, 4, 2, 64, 1024);
    let n = 400;
    let s = seq(&shape, n, 8);
    let mut full = FullPrecisionCache::new(shape.clone()).unwrap();
    let exact = run(&mut full, 0, &s, &[n]);
    let err = |k: Bits, v: Bits| {
        let mut c = QuantizedCache::new(shape.clone(), QuantCacheConfig::split(1, k, v).with_residual(16)).unwrap();
        let o = run(&mut c, 0, &s, &[n]);
        o.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
    };
    let (e8, e4, e2) = (err(Bits::B8, Bits::B8), err(Bits::B4, Bits::B4), err(Bits::B2, Bits::B2));
    assert!(e8 > 0.0 && e8 < e4 && e4 < e2, "{e8} {e4} {e2}");
}

#[test]
fn memory_equals_the_formula() {
    let shape = shape();
    for (ci, config) in configs().into_iter().enumerate() {
        let mut cache = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        let counts = [0usize, 1, 2, 3, 5, 8, 16, 40, 100];
        let mut held = vec![0usize; shape.n_layers];
        for (step, &c) in counts.iter().enumerate() {
            for layer in 0..shape.n_layers {
                // Layers grow at different speeds so their token counts differ.
                let add = c * (layer + 1) / 2;
                let s = seq(&shape, add, step as u64);
                if add > 0 {
                    run(&mut cache, layer, &s, &random_chunks(add, step as u64));
                }
                held[layer] += add;
            }
            let m = cache.memory();
            assert_eq!(m, expected_memory(&config, &shape, &held), "config {ci} step {step}");
            assert_eq!(m.elements, held.iter().map(|t| 2 * t * shape.kv_row()).sum::<usize>());
        }
    }
}

#[test]
fn k4v2_group64_f16_is_three_and_a_half_bits_plus_the_tail() {
    let shape = CacheShape::new(2, 9, 3, 64, 4096);
    let (n, residual) = (1024 + 128, 128);
    let mut cache = QuantizedCache::new(shape.clone(), QuantCacheConfig::split(2, Bits::B4, Bits::B2)).unwrap();
    for layer in 0..2 {
        run(&mut cache, layer, &seq(&shape, n, layer as u64), &[300, 1, 851]);
    }
    let m = cache.memory();
    let quant_bytes: usize =
        m.layers.iter().map(|l| l.k_code_bytes + l.k_meta_bytes + l.v_code_bytes + l.v_meta_bytes).sum();
    let quant_elements = 2 * 2 * (n - residual) * shape.kv_row();
    assert_eq!(8.0 * quant_bytes as f64 / quant_elements as f64, 3.5);
    let tail_bytes: usize = m.layers.iter().map(|l| l.k_full_bytes + l.v_full_bytes).sum();
    assert_eq!(tail_bytes, 2 * 2 * residual * shape.kv_row() * EXACT_BYTES);
    let expected =
        (3.5 * quant_elements as f64 + 32.0 * (2 * 2 * residual * shape.kv_row()) as f64) / m.elements as f64;
    assert!((m.bits_per_element() - expected).abs() < 1e-12);
    // With no window the whole cache is 3.5 bits per element.
    let mut c =
        QuantizedCache::new(shape.clone(), QuantCacheConfig::split(2, Bits::B4, Bits::B2).with_residual(0)).unwrap();
    run(&mut c, 0, &seq(&shape, 256, 1), &[256]);
    run(&mut c, 1, &seq(&shape, 256, 2), &[100, 156]);
    assert_eq!(c.memory().bits_per_element(), 3.5);
}

#[test]
fn capacity_and_bad_input_are_errors_that_leave_the_cache_intact() {
    let shape = CacheShape::new(1, 2, 1, 64, 40);
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let config = QuantCacheConfig::split(1, Bits::B4, Bits::B2).with_residual(8);
    let mut cache = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
    let s = seq(&shape, 41, 2);
    run(&mut cache, 0, &s_prefix(&s, 30, &shape), &[30]);
    let before = cache.memory();
    let mut out = vec![0.0; 11 * qr];
    let err = cache.append_attend(0, &s.q[..11 * qr], &s.k[..11 * kr], &s.v[..11 * kr], &mut out).unwrap_err();
    assert!(matches!(err, CacheError::Full { held: 30, adding: 11, max: 40, .. }), "{err}");
    assert!(matches!(cache.append(0, &s.k[..11 * kr], &s.v[..11 * kr]), Err(CacheError::Full { .. })));
    let mut bad = s.k[..kr].to_vec();
    bad[5] = f32::NAN;
    let err = cache.append_attend(0, &s.q[..qr], &bad, &s.v[..kr], &mut out[..qr]).unwrap_err();
    assert!(matches!(err, CacheError::NonFinite { what: "k", .. }));
    assert!(matches!(cache.append(0, &bad, &s.v[..kr]), Err(CacheError::NonFinite { .. })));
    assert!(matches!(
        cache.append_attend(1, &s.q[..qr], &s.k[..kr], &s.v[..kr], &mut out[..qr]),
        Err(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        cache.append_attend(0, &s.q[..qr], &s.k[..kr - 1], &s.v[..kr], &mut out[..qr]),
        Err(CacheError::Shape { .. })
    ));
    assert_eq!(cache.memory(), before);
    assert_eq!(cache.seq_len(0), 30);
    // Clearing keeps the configuration and a re-run gives the same result as a fresh cache.
    cache.clear();
    assert_eq!(cache.memory().total_bytes(), 0);
    let again = run(&mut cache, 0, &s_prefix(&s, 40, &shape), &[40]);
    let mut fresh = QuantizedCache::new(shape.clone(), config).unwrap();
    assert_eq!(again, run(&mut fresh, 0, &s_prefix(&s, 40, &shape), &[17, 23]));
}

#[test]
fn append_without_attention_stores_the_same_contents() {
    let shape = shape();
    let n = 150;
    for (ci, config) in configs().into_iter().enumerate() {
        let mut a = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        let mut b = QuantizedCache::new(shape.clone(), config.clone()).unwrap();
        let s = seq(&shape, n, 9 + ci as u64);
        run(&mut a, 1, &s, &random_chunks(n, 1));
        let kr = shape.kv_row();
        let mut t = 0;
        for c in random_chunks(n, 2) {
            b.append(1, &s.k[t * kr..(t + c) * kr], &s.v[t * kr..(t + c) * kr]).unwrap();
            t += c;
        }
        assert_eq!(a.memory(), b.memory());
        for head in 0..shape.n_kv_heads {
            for kv in [Kv::K, Kv::V] {
                assert_eq!(a.materialize(1, kv, head).unwrap(), b.materialize(1, kv, head).unwrap(), "config {ci}");
            }
        }
    }
}

fn s_prefix(s: &Seq, n: usize, shape: &CacheShape) -> Seq {
    Seq {
        q: s.q[..n * shape.q_row()].to_vec(),
        k: s.k[..n * shape.kv_row()].to_vec(),
        v: s.v[..n * shape.kv_row()].to_vec(),
    }
}

#[test]
fn invalid_configurations_are_typed_errors() {
    let shape = CacheShape::new(2, 4, 2, 48, 256);
    let field = |c: QuantCacheConfig| match QuantizedCache::new(shape.clone(), c) {
        Err(CacheError::Field { field, .. }) => field,
        other => panic!("expected a field error, got {:?}", other.map(|_| ())),
    };
    // Group 64 does not divide head_dim 48.
    assert_eq!(field(QuantCacheConfig::split(2, Bits::B4, Bits::B2)), "layers[0].k.group");
    // A per-channel group of 32 tokens does not divide a window of 48.
    let c = QuantCacheConfig::uniform(
        2,
        LayerPrecision::new(Precision::per_channel(Bits::B4, 32), Precision::per_token(Bits::B2, 16)),
    )
    .with_residual(48);
    assert_eq!(field(c), "layers[0].k.group");
    assert_eq!(field(QuantCacheConfig::uniform(1, LayerPrecision::full())), "layers");
    // Unknown widths cannot be written down.
    assert!(CacheSpec::from_json(
        r#"{"kind":"uniform","layer":{"k":{"quant":{"bits":7,"group":16,"axis":"per_token"}},"v":"full"}}"#
    )
    .is_err());
    assert!(matches!("k7v2".parse::<CacheSpec>(), Err(CacheError::Field { .. })));
}

#[test]
fn specs_build_every_cache() {
    let shape = CacheShape::new(2, 4, 2, 32, 256);
    let s = seq(&shape, 50, 4);
    let mut outs = Vec::new();
    for spec in [
        CacheSpec::FullF32,
        CacheSpec::FullF16,
        "k16v16".parse().unwrap(),
        "k8v8-g32-r16".parse().unwrap(),
        "k4v2-kivi-g16-r16-s2".parse().unwrap(),
        CacheSpec::from_json(r#"{"kind":"kvq","kvq":{"nbits":{"k":4,"v":2},"group_size":32,"residual_length":16}}"#)
            .unwrap(),
    ] {
        let mut c = spec.build(shape.clone()).unwrap();
        outs.push((c.describe(), run(c.as_mut(), 1, &s, &[20, 30]), c.memory().bits_per_element()));
    }
    assert_eq!(outs[0].1, outs[2].1, "k16v16 equals f32");
    assert_ne!(outs[0].1, outs[1].1, "f16 rounds");
    assert_eq!(outs[0].2, 32.0);
    assert_eq!(outs[1].2, 16.0);
    assert!(outs[3].2 < 32.0 && outs[4].2 < outs[3].2, "{outs:?}");
    assert_eq!(outs[3].0, "K8V8 g32/32 r16");
    assert_eq!(outs[4].0, "K4V2 g16c/16 r16 s2");
    assert!(outs[5].0.starts_with("K4V2 g32/32 r16"));
}

/// Everything a cache holds, as text: lengths, flushed prefixes, packed bytes, metadata and exact values.
fn state(cache: &dyn std::fmt::Debug) -> String {
    format!("{cache:?}")
}

/// Runs an append that must fail on `cache` and on nothing else, then checks that the cache is exactly `untouched`
/// (same contents, bytes and next attention outputs).
fn check_failed_append<C: KvCache + Clone + std::fmt::Debug>(
    cache: &mut C,
    s: &Seq,
    what: &str,
    failing: impl FnOnce(&mut C) -> Result<(), CacheError>,
    expect: impl Fn(&CacheError) -> bool,
) {
    let untouched = cache.clone();
    let err = failing(cache).expect_err(what);
    assert!(expect(&err), "{what}: unexpected error {err:?}");
    // Compared as text without printing it: a cache's state is megabytes of numbers.
    assert!(state(cache) == state(&untouched), "{what}: the failed append changed the cache");
    assert_eq!(cache.memory(), untouched.memory(), "{what}");
    assert_eq!(cache.seq_len(0), untouched.seq_len(0), "{what}");
    // The next append gives the same outputs and contents as on the untouched copy.
    let mut other = untouched;
    let next = s_prefix(s, 9, cache.shape());
    assert_eq!(run(cache, 0, &next, &[9]), run(&mut other, 0, &next, &[9]), "{what}: next outputs");
    assert!(state(cache) == state(&other), "{what}: contents differ after the next append");
}

#[test]
fn a_failed_append_leaves_the_cache_exactly_as_it_was() {
    let shape = CacheShape::new(1, 6, 3, 64, 512);
    let (qr, kr) = (shape.q_row(), shape.kv_row());
    let n = 100;
    let s = seq(&shape, 40 + n, 31);
    let fill = s_prefix(&s, 40, &shape);
    let new = Seq { q: s.q[40 * qr..].to_vec(), k: s.k[40 * kr..].to_vec(), v: s.v[40 * kr..].to_vec() };
    // Per-token and per-channel keys, with and without sinks; the last new key stays exact in every one.
    let configs = [
        QuantCacheConfig::split(1, Bits::B4, Bits::B2).with_residual(4),
        QuantCacheConfig::kivi(1, Bits::B3, Bits::B1_58).with_residual(64).with_sinks(3),
        QuantCacheConfig::kivi(1, Bits::B5, Bits::B6).with_residual(0).with_sinks(1),
    ];
    let last_head = shape.n_kv_heads - 1;
    for (ci, config) in configs.into_iter().enumerate() {
        let mut cache = QuantizedCache::new(shape.clone(), config).unwrap();
        run(&mut cache, 0, &fill, &[13, 27]);
        // Metadata overflow in the last KV head only, while the other heads (and, for values, every key head)
        // already grew: -1e5 is a finite f32 but no f16 minimum, and token 0 of the call is quantized in it.
        for side in [Kv::K, Kv::V] {
            let (mut k, mut v) = (new.k.clone(), new.v.clone());
            let x = if side == Kv::K { &mut k } else { &mut v };
            x[last_head * 64 + 5] = -1e5;
            let mut out = vec![0f32; new.q.len()];
            check_failed_append(
                &mut cache,
                &s,
                &format!("config {ci}: f16 overflow in the last head's {side:?}"),
                |c| c.append_attend(0, &new.q, &k, &v, &mut out),
                |e| matches!(e, CacheError::Kernel(adaquant_kernels::Error::MetaOverflow { .. })),
            );
            check_failed_append(
                &mut cache,
                &s,
                &format!("config {ci}: f16 overflow in the last head's {side:?}, append without attention"),
                |c| c.append(0, &k, &v),
                |e| matches!(e, CacheError::Kernel(adaquant_kernels::Error::MetaOverflow { .. })),
            );
        }
        // Attention that overflows after every head has grown and flushed: the last new token's key (exact, in
        // the tail) times its query passes 3.4e38.
        let (mut q, mut k) = (new.q.clone(), new.k.clone());
        q[(n - 1) * qr..].fill(1e30);
        k[(n - 1) * kr..].fill(1e10);
        let mut out = vec![0f32; q.len()];
        check_failed_append(
            &mut cache,
            &s,
            &format!("config {ci}: overflowing attention"),
            |c| c.append_attend(0, &q, &k, &new.v, &mut out),
            |e| matches!(e, CacheError::Kernel(adaquant_kernels::Error::AttentionOverflow { .. })),
        );
    }
    // The full-precision caches: overflowing attention, and values beyond f16 in an f16 cache.
    for dtype in [FullDtype::F32, FullDtype::F16] {
        let mut cache = FullPrecisionCache::with_dtype(shape.clone(), dtype).unwrap();
        run(&mut cache, 0, &fill, &[40]);
        let (mut q, mut k) = (new.q.clone(), new.k.clone());
        q[(n - 1) * qr..].fill(1e36);
        k[(n - 1) * kr..].fill(6e4);
        let mut out = vec![0f32; q.len()];
        check_failed_append(
            &mut cache,
            &s,
            &format!("{dtype:?}: overflowing attention"),
            |c| c.append_attend(0, &q, &k, &new.v, &mut out),
            |e| matches!(e, CacheError::Kernel(adaquant_kernels::Error::AttentionOverflow { .. })),
        );
        if dtype == FullDtype::F16 {
            let mut v = new.v.clone();
            v[7 * kr + 70] = 70_000.0;
            check_failed_append(
                &mut cache,
                &s,
                "f16 cache: a value beyond f16",
                |c| c.append_attend(0, &new.q, &new.k, &v, &mut out),
                |e| matches!(e, CacheError::F16Overflow { what: "v", layer: 0, index, .. } if *index == 7 * kr + 70),
            );
            check_failed_append(
                &mut cache,
                &s,
                "f16 cache: a key beyond f16, append without attention",
                |c| c.append(0, &v, &new.v),
                |e| matches!(e, CacheError::F16Overflow { what: "k", .. }),
            );
        }
    }
}
