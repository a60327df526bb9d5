//! Checks against the real Gemma 3 270M GGUF (base, Q4_K_M) and WikiText-2; each test prints SKIPPED and passes
//! when the files are absent (`cargo xtask fetch` provides them).

use std::sync::OnceLock;

use adaquant_cache::FullPrecisionCache;
use adaquant_model::generate::build_cache;
use adaquant_model::paths::{gemma3_270m, require, wikitext2_test};
use adaquant_model::perplexity::{perplexity, text_tokens};
use adaquant_model::{Activation, Arch, ForwardOptions, LogitsRange, Model, RopeScaling, WeightsMode};

fn model(test: &str) -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    require(gemma3_270m(), test)?;
    MODEL.get_or_init(|| Some(Model::load(&gemma3_270m()).expect("Gemma 3 270M loads"))).as_ref()
}

fn wikitext_tokens(model: &Model, test: &str) -> Option<Vec<u32>> {
    let path = require(wikitext2_test(), test)?;
    let text = std::fs::read_to_string(path).expect("wiki.test.raw is UTF-8");
    Some(text_tokens(model.tokenizer(), &text, 512).expect("tokenizes"))
}

#[test]
fn config_matches_the_gguf_metadata() {
    let Some(m) = model("config_matches_the_gguf_metadata") else { return };
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!(
        (c.n_layers, c.hidden, c.ffn, c.n_q_heads, c.n_kv_heads, c.head_dim, c.vocab),
        (18, 640, 2048, 4, 1, 256, 262144)
    );
    assert!(c.qk_norm && c.post_norms && c.tied_embeddings && !c.qkv_bias);
    assert_eq!(c.activation, Activation::GeluTanh);
    assert_eq!(c.embed_scale, 640f32.sqrt());
    assert_eq!(c.attn_scale, 1.0 / 16.0);
    assert_eq!((c.rope_theta, c.rope_theta_local, c.sliding_window), (1e6, 1e4, Some(512)));
    assert_eq!(c.rope_scaling, RopeScaling::None);
    let globals: Vec<usize> = (0..18).filter(|&l| !c.is_local(l)).collect();
    assert_eq!(globals, [5, 11, 17]);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(2), Some(1)));
    assert!(m.tokenizer().add_bos());
    // The converter folded Gemma's `1 + w` into the norms: the stored weights are far from zero-centred.
    let l0 = &m.weights().layers[0];
    let mean = |w: &[f32]| w.iter().sum::<f32>() / w.len() as f32;
    assert!(mean(l0.k_norm.as_ref().unwrap()) > 0.5, "k_norm mean {}", mean(l0.k_norm.as_ref().unwrap()));
}

#[test]
fn tokenizer_matches_the_reference_ids() {
    let Some(m) = model("tokenizer_matches_the_reference_ids") else { return };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3_tokenizer.json");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let t = m.tokenizer();
    let lines = j["lines"].as_array().unwrap();
    assert!(lines.len() >= 300);
    let mut bad = Vec::new();
    for l in lines {
        let text = l["text"].as_str().unwrap();
        let want: Vec<u32> = l["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = t.encode(text, false).unwrap();
        if got != want {
            bad.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        assert_eq!(t.decode(&got).unwrap(), text, "round trip");
    }
    assert!(bad.is_empty(), "{} of {} lines differ:\n{}", bad.len(), lines.len(), bad.join("\n"));
    assert_eq!(t.encode("Hello", true).unwrap()[0], 2);
}

#[test]
fn greedy_generation_is_coherent() {
    let Some(m) = model("greedy_generation_is_coherent") else { return };
    let t = m.tokenizer();
    let prompt = t.encode("The Eiffel Tower is located in the city of", true).unwrap();
    let mut cache = FullPrecisionCache::new(m.cache_shape(64)).unwrap();
    let mut logits = m.forward(&prompt, &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
    let mut out = Vec::new();
    for _ in 0..12 {
        let next = logits.argmax(0);
        out.push(next);
        logits = m.forward(&[next], &mut cache, &mut ForwardOptions::new(LogitsRange::Last)).unwrap();
    }
    let text = t.decode(&out).unwrap();
    assert!(text.contains("Paris"), "continuation: {text:?}");
}

/// One forward over a window equals token-by-token decoding bit for bit, through f32 and quantized caches.
#[test]
fn one_forward_equals_token_by_token_decoding() {
    let test = "one_forward_equals_token_by_token_decoding";
    let Some(m) = model(test) else { return };
    let Some(tokens) = wikitext_tokens(m, test) else { return };
    let toks = &tokens[..160];
    for spec in ["f32", "k8v4-g32-r16", "k4v2-g32-r16", "k2v4-kivi-g32-r32"] {
        let mut a = build_cache(spec, m.cache_shape(256)).unwrap();
        let la = m.forward(toks, a.as_mut(), &mut ForwardOptions::new(LogitsRange::All)).unwrap();
        let mut b = build_cache(spec, m.cache_shape(256)).unwrap();
        let mut rows = Vec::with_capacity(la.data.len());
        for &t in toks {
            rows.extend(m.forward(&[t], b.as_mut(), &mut ForwardOptions::new(LogitsRange::Last)).unwrap().data);
        }
        let first = la.data.iter().zip(&rows).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(first.is_none(), "{spec}: one forward and decoding differ first at element {first:?}");
        assert_eq!(a.seq_len(17), toks.len());
    }
}

/// Past the 512-token sliding window: one forward over 600 tokens equals a 560-token prefill followed by 40
/// decoding steps bit for bit, through f32 and quantized caches, while the local layers hold less than the global
/// ones (they dropped what no query can see any more).
#[test]
fn decoding_past_the_sliding_window_equals_one_forward() {
    let test = "decoding_past_the_sliding_window_equals_one_forward";
    let Some(m) = model(test) else { return };
    let Some(tokens) = wikitext_tokens(m, test) else { return };
    let (n, pre) = (600, 560);
    let toks = &tokens[..n];
    for spec in ["f32", "k4v2-g32-r16", "k2v4-kivi-g32-r32", "k3v2-rot-lloyd-r16"] {
        let mut a = build_cache(spec, m.cache_shape(640)).unwrap();
        let la = m.forward(toks, a.as_mut(), &mut ForwardOptions::new(LogitsRange::From(pre))).unwrap();
        let mut b = build_cache(spec, m.cache_shape(640)).unwrap();
        m.forward(&toks[..pre], b.as_mut(), &mut ForwardOptions::new(LogitsRange::None)).unwrap();
        let mut rows = Vec::with_capacity(la.data.len());
        for &t in &toks[pre..] {
            rows.extend(m.forward(&[t], b.as_mut(), &mut ForwardOptions::new(LogitsRange::Last)).unwrap().data);
        }
        let first = la.data.iter().zip(&rows).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(first.is_none(), "{spec}: one forward and decoding differ first at element {first:?}");
        let mem = b.memory();
        assert_eq!(b.seq_len(0), n);
        assert!(mem.layers[0].tokens < n && mem.layers[5].tokens == n, "{spec}: {:?}", mem.layers[0]);
        let bytes = |l: usize| mem.layers[l].k_bytes() + mem.layers[l].v_bytes();
        assert!(bytes(0) < bytes(5), "{spec}: local layer 0 holds {} bytes, global layer 5 {}", bytes(0), bytes(5));
        assert_eq!(a.memory(), mem, "{spec}: the same bytes either way");
    }
}

/// With packed weights (Q5_0 and Q8_0 on the interleaved kernels, Q4_K and Q6_K on the K-quant path) one forward
/// over a window equals token-by-token decoding bit for bit too.
#[test]
fn packed_forward_equals_token_by_token_decoding() {
    let test = "packed_forward_equals_token_by_token_decoding";
    let Some(path) = require(gemma3_270m(), test) else { return };
    let Some(f) = model(test) else { return };
    let Some(tokens) = wikitext_tokens(f, test) else { return };
    let m = Model::load_with(&path, WeightsMode::Packed).expect("Gemma 3 270M loads packed");
    assert_eq!(m.weights_mode(), WeightsMode::Packed);
    let toks = &tokens[..48];
    for spec in ["f32", "k4v2-g32-r16"] {
        let mut a = build_cache(spec, m.cache_shape(64)).unwrap();
        let la = m.forward(toks, a.as_mut(), &mut ForwardOptions::new(LogitsRange::All)).unwrap();
        let mut b = build_cache(spec, m.cache_shape(64)).unwrap();
        let mut rows = Vec::with_capacity(la.data.len());
        for &t in toks {
            rows.extend(m.forward(&[t], b.as_mut(), &mut ForwardOptions::new(LogitsRange::Last)).unwrap().data);
        }
        let first = la.data.iter().zip(&rows).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(first.is_none(), "{spec}: one forward and decoding differ first at element {first:?}");
    }
}

/// The first 4 windows of llama.cpp's protocol (BOS first in every window). The pinned value is this
/// implementation's on those windows in the 100-window run recorded in docs/MODEL.md; 1% covers summation order.
#[test]
fn wikitext2_perplexity_first_4_windows() {
    let test = "wikitext2_perplexity_first_4_windows";
    let Some(m) = model(test) else { return };
    let Some(tokens) = wikitext_tokens(m, test) else { return };
    assert_eq!(tokens[0], 2);
    assert_eq!(tokens[512], 2);
    let mut cache = FullPrecisionCache::new(m.cache_shape(512)).unwrap();
    let p = perplexity(m, &tokens, 512, Some(4), &mut cache).unwrap();
    eprintln!("gemma-3-270m, 4 windows: ppl {:.4}", p.ppl);
    assert_eq!((p.windows, p.scored), (4, 4 * 255));
    assert!((p.ppl - FIRST_4).abs() <= 0.01 * FIRST_4, "perplexity of the first 4 windows is {}", p.ppl);
}

const FIRST_4: f64 = 15.2343;

/// llama.cpp (llama-perplexity, build 0c1e570, `-c 512 --chunks 100`, flash attention, two threads) gives
/// 18.7410 +/- 0.362 on this file; adaquant's f32 forward must be within 1.5% of it.
#[test]
#[ignore = "about 5-15 minutes on two cores; run with --ignored (numbers in docs/MODEL.md)"]
fn wikitext2_perplexity_100_windows() {
    let test = "wikitext2_perplexity_100_windows";
    let Some(m) = model(test) else { return };
    let Some(tokens) = wikitext_tokens(m, test) else { return };
    let mut cache = FullPrecisionCache::new(m.cache_shape(512)).unwrap();
    let p = perplexity(m, &tokens, 512, Some(100), &mut cache).unwrap();
    eprintln!("gemma-3-270m, 100 windows: ppl {:.4} +/- {:.4}", p.ppl, p.ppl_stderr);
    assert_eq!(p.scored, 100 * 255);
    assert!((p.ppl - 18.7410).abs() <= 0.015 * 18.7410, "perplexity {} is not within 1.5% of 18.7410", p.ppl);
}
