//! Checks against the real SmolLM2-135M-Instruct GGUF and WikiText-2; each test prints SKIPPED and passes when
//! the files are absent (`cargo xtask fetch` provides them).

use std::sync::OnceLock;

use adaquant_cache::{FullPrecisionCache, KvCache};
use adaquant_model::generate::{build_cache, generate_text};
use adaquant_model::gguf::{Gguf, GgufFile};
use adaquant_model::model::permute_rope_rows;
use adaquant_model::paths::{default_model, require, wikitext2_test};
use adaquant_model::perplexity::perplexity;
use adaquant_model::{ForwardOptions, LayerHook, LayerTaps, LogitsRange, Model, ModelError, Tokenizer};

fn model(test: &str) -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    require(default_model(), test)?;
    MODEL.get_or_init(|| Some(Model::load(&default_model()).expect("the default model loads"))).as_ref()
}

fn wikitext_tokens(model: &Model, test: &str) -> Option<Vec<u32>> {
    let path = require(wikitext2_test(), test)?;
    let text = std::fs::read_to_string(path).expect("wiki.test.raw is UTF-8");
    Some(model.tokenizer().encode(&text, false).expect("tokenizes"))
}

#[test]
fn config_matches_smollm2() {
    let Some(m) = model("config_matches_smollm2") else { return };
    let c = &m.config;
    assert_eq!(
        (c.n_layers, c.hidden, c.ffn, c.n_q_heads, c.n_kv_heads, c.head_dim, c.vocab),
        (30, 576, 1536, 9, 3, 64, 49152)
    );
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_eps - 1e-5).abs() < 1e-9);
    assert!(c.tied_embeddings && !c.qkv_bias);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    let w = m.layer_weights(29);
    assert_eq!((w.wq.len(), w.wk.len(), w.wv.len(), w.wo.len()), (576 * 576, 192 * 576, 192 * 576, 576 * 576));
}

#[test]
fn tokenizer_known_ids_and_round_trip() {
    let Some(m) = model("tokenizer_known_ids_and_round_trip") else { return };
    let t = m.tokenizer();
    assert_eq!(t.encode("Hello world", false).unwrap(), vec![19556, 905]);
    assert_eq!(t.encode("Hello world", true).unwrap(), vec![1, 19556, 905]);
    // Digits are split one by one by SmolLM2's pre-tokenizer.
    let ids = t.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    // Special tokens written in text become single ids.
    assert_eq!(t.encode("<|im_start|>user", false).unwrap()[0], 1);
    for s in [
        "Hello world",
        "  leading spaces, tabs\tand\nnewlines\r\n",
        "naïve café — “quotes” 日本語のテキスト 🦀🚀 e\u{301}",
        "mixed 12345 digits and ünïcödé; <|im_end|> in text",
        "\u{0}\u{7f}\u{fffd} control characters",
    ] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), s, "round trip of {s:?}");
    }
    // Pseudo-random text drawn from many Unicode ranges.
    let mut seed = 12345u64;
    for _ in 0..20 {
        let s: String = (0..64)
            .filter_map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (seed >> 33) as u32;
                let cp = match r % 4 {
                    0 => 0x20 + r % 0x5f,
                    1 => 0xa0 + r % 0x700,
                    2 => 0x3040 + r % 0x6000,
                    _ => 0x1f300 + r % 0x300,
                };
                char::from_u32(cp)
            })
            .collect();
        let ids = t.encode(&s, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), s);
    }
    assert!(t.decode(&[49152]).is_err());
}

/// Collects per-layer K and V to check the hook's layouts.
struct Capture {
    layers: Vec<usize>,
    k_shape_ok: bool,
    rope_changes_k: bool,
    first_k_unrotated: bool,
}

impl LayerHook for Capture {
    fn on_layer(&mut self, layer: usize, taps: &LayerTaps<'_>) {
        self.layers.push(layer);
        let n = taps.positions.len();
        self.k_shape_ok &= taps.k.len() == n * 3 * 64 && taps.v.len() == n * 192 && taps.attn_out.len() == n * 576;
        self.k_shape_ok &= taps.q.len() == n * 576 && taps.k_pre_rope.len() == taps.k.len();
        // Position 0 has angle 0: RoPE leaves it unchanged; later positions are rotated.
        self.first_k_unrotated &= taps.k[..192] == taps.k_pre_rope[..192];
        self.rope_changes_k |= taps.k[192..] != taps.k_pre_rope[192..];
    }
}

#[test]
fn prefill_equals_decode_and_hooks_see_every_layer() {
    let Some(m) = model("prefill_equals_decode_and_hooks_see_every_layer") else { return };
    let toks = m.tokenizer().encode("The quick brown fox jumps over the lazy dog because it", false).unwrap();
    let mut a = FullPrecisionCache::new(m.cache_shape(64)).unwrap();
    let mut cap = Capture { layers: vec![], k_shape_ok: true, rope_changes_k: false, first_k_unrotated: true };
    let la = m.forward(&toks, &mut a, &mut ForwardOptions::with_hook(LogitsRange::All, &mut cap)).unwrap();
    assert_eq!(cap.layers, (0..30).collect::<Vec<_>>());
    assert!(cap.k_shape_ok && cap.rope_changes_k && cap.first_k_unrotated);
    assert_eq!(la.rows(), toks.len());
    let mut b = FullPrecisionCache::new(m.cache_shape(64)).unwrap();
    let split = 5;
    let lb1 = m.forward(&toks[..split], &mut b, &mut ForwardOptions::new(LogitsRange::All)).unwrap();
    let mut rows = lb1.data.clone();
    for &t in &toks[split..] {
        rows.extend(m.forward(&[t], &mut b, &mut ForwardOptions::new(LogitsRange::Last)).unwrap().data);
    }
    // The forward is batch-invariant: the same bits whether a token comes in a batch or alone.
    let first = la.data.iter().zip(&rows).position(|(x, y)| x.to_bits() != y.to_bits());
    assert!(first.is_none(), "prefill and token-by-token logits differ first at element {first:?}");
    assert_eq!(b.seq_len(29), toks.len());
    let bad = m.forward(&[49152], &mut b, &mut ForwardOptions::default());
    assert!(bad.is_err());
}

/// llama.cpp's perplexity tool on this file and model (f16 cache, 512-token windows, first 100 windows) gives
/// 23.5351 +/- 0.448. The asserted tolerance (0.3) is tighter than that statistical error because it bounds the
/// implementation difference on the same tokens, not sampling noise: f32 vs f16 cache and summation order only.
#[test]
#[ignore = "about 2-5 minutes on two cores; run with --ignored (numbers in docs/MODEL.md)"]
fn wikitext2_perplexity_100_windows() {
    let Some(m) = model("wikitext2_perplexity_100_windows") else { return };
    let Some(tokens) = wikitext_tokens(m, "wikitext2_perplexity_100_windows") else { return };
    let mut cache = FullPrecisionCache::new(m.cache_shape(512)).unwrap();
    let p = perplexity(m, &tokens, 512, Some(100), &mut cache).unwrap();
    eprintln!("wikitext-2 test, 100 windows: ppl {:.4} +/- {:.4}; window nll {:?}", p.ppl, p.ppl_stderr, p.window_nll);
    assert_eq!(p.scored, 100 * 255);
    assert!((p.ppl - 23.54).abs() <= 0.3, "perplexity {} is not 23.54 +/- 0.3", p.ppl);
}

/// The first 8 windows (4096 tokens) of the same protocol, in the default test run. The pinned 24.497 is this
/// implementation's value on those windows in the 100-window run that matches llama.cpp (23.47 vs 23.54, see
/// docs/MODEL.md). The 1% tolerance covers summation order and thread-count differences, which move perplexity
/// by well under 0.1%; real defects move it far more (the wrong RoPE convention gives hundreds, a dropped
/// bias, eps or an off-by-one in the scored positions several percent).
#[test]
fn wikitext2_perplexity_first_8_windows() {
    let Some(m) = model("wikitext2_perplexity_first_8_windows") else { return };
    let Some(tokens) = wikitext_tokens(m, "wikitext2_perplexity_first_8_windows") else { return };
    let mut cache = FullPrecisionCache::new(m.cache_shape(512)).unwrap();
    let p = perplexity(m, &tokens, 512, Some(8), &mut cache).unwrap();
    assert_eq!((p.windows, p.scored), (8, 8 * 255));
    assert!((p.ppl - 24.497).abs() <= 0.01 * 24.497, "perplexity of the first 8 windows is {}", p.ppl);
}

/// Keeping GGUF's adjacent-pair Q/K row order while rotating halves (the wrong convention) must wreck the model.
#[test]
fn wrong_rope_convention_wrecks_perplexity() {
    let Some(m) = model("wrong_rope_convention_wrecks_perplexity") else { return };
    let Some(tokens) = wikitext_tokens(m, "wrong_rope_convention_wrecks_perplexity") else { return };
    let c = &m.config;
    let mut w = m.weights().clone();
    for l in &mut w.layers {
        l.wq = permute_rope_rows(&l.wq, c.n_q_heads, c.head_dim, c.hidden);
        l.wk = permute_rope_rows(&l.wk, c.n_kv_heads, c.head_dim, c.hidden);
    }
    let header = GgufFile::open(&default_model()).unwrap().header;
    let wrong = Model::from_parts(c.clone(), w, Tokenizer::from_gguf(&header).unwrap()).unwrap();
    let mut cache = FullPrecisionCache::new(m.cache_shape(512)).unwrap();
    let right = perplexity(m, &tokens, 512, Some(1), &mut cache).unwrap().ppl;
    let bad = perplexity(&wrong, &tokens, 512, Some(1), &mut cache).unwrap().ppl;
    assert!(right < 30.0 && bad > 100.0, "right convention {right}, wrong convention {bad}");
}

#[test]
fn chat_answers_paris() {
    let Some(m) = model("chat_answers_paris") else { return };
    let mut cache = FullPrecisionCache::new(m.cache_shape(256)).unwrap();
    let g = generate_text(m, "What is the capital of France?", true, 24, &mut cache).unwrap();
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
}

#[test]
fn chat_answers_paris_through_a_quantized_cache() {
    let Some(m) = model("chat_answers_paris_through_a_quantized_cache") else { return };
    let mut cache = build_cache("k8v4-g32-r16", m.cache_shape(256)).unwrap();
    let g = generate_text(m, "What is the capital of France?", true, 24, cache.as_mut()).unwrap();
    assert!(g.text.contains("Paris"), "answer through {}: {:?}", cache.describe(), g.text);
    assert!(cache.memory().bits_per_element() < 24.0, "{:?}", cache.memory().bits_per_element());
}

/// Prefixes and seeded byte corruptions of the real file's header give values or typed errors, never panics.
#[test]
fn truncated_and_corrupted_real_header() {
    let Some(path) = require(default_model(), "truncated_and_corrupted_real_header") else { return };
    let file = GgufFile::open(&path).unwrap();
    let bytes = file.bytes();
    let header_end = file.header.data_offset;
    for cut in [0, 3, 4, 8, 23, 24, 1000, header_end / 2, header_end - 1, header_end, bytes.len() - 1] {
        assert!(Gguf::parse(&bytes[..cut]).is_err(), "a {cut}-byte prefix parsed");
    }
    let mut seed = 99u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut head = bytes[..header_end].to_vec();
    head.resize(header_end + 4096, 0);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..100 {
        let mut b = head.clone();
        for _ in 0..4 {
            // Corrupt the structural fields near the start and the tensor table near the end most often.
            let at = match next() % 3 {
                0 => next() % 64,
                1 => header_end - 1 - next() % 20_000,
                _ => next() % header_end,
            };
            b[at] = next() as u8;
        }
        match Gguf::parse(&b) {
            Ok(_) => ok += 1,
            Err(ModelError::Gguf { .. }) => err += 1,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert_eq!(ok + err, 100);
    assert!(err > 0, "no corruption was detected");
}
