//! A tiny synthetic model written as a Hugging Face folder (config.json, safetensors, tokenizer.json) and as
//! GGUF files, checked against a plain reference forward pass written here from the architecture's definition.
//! This pins both RoPE conventions: Hugging Face rotates halves of each head, GGUF (llama) stores Q/K rows
//! permuted for adjacent-pair rotation, and both must give the reference logits.

use std::path::PathBuf;

use adaquant_cache::FullPrecisionCache;
use adaquant_model::gguf::{GgufWriter, Value};
use adaquant_model::model::permute_rope_rows;
use adaquant_model::{ForwardOptions, LogitsRange, Model, ModelError};
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

const HIDDEN: usize = 32;
const FFN: usize = 48;
const NQ: usize = 4;
const NKV: usize = 2;
const HD: usize = 8;
const LAYERS: usize = 2;
const THETA: f64 = 10000.0;
const EPS: f32 = 1e-5;

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n in order.
fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Vocabulary: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the 256 byte tokens, then merges "h e", "l l".
fn vocab() -> (Vec<String>, Vec<String>) {
    let mut toks: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    toks.extend(byte_chars().iter().map(|c| c.to_string()));
    toks.push("he".into());
    toks.push("ll".into());
    (toks, vec!["h e".into(), "l l".into()])
}

fn vocab_size() -> usize {
    vocab().0.len()
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    bq: Vec<f32>,
    bk: Vec<f32>,
    bv: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

struct Tiny {
    embd: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    bias: bool,
}

fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn tiny(seed: u64, bias: bool) -> Tiny {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v = vocab_size();
    let mut layers = Vec::new();
    for _ in 0..LAYERS {
        let s = 1.0 / (HIDDEN as f32).sqrt();
        layers.push(Layer {
            attn_norm: (0..HIDDEN).map(|_| rng.random_range(0.5..1.5)).collect(),
            wq: rand_vec(&mut rng, NQ * HD * HIDDEN, 2.0 * s),
            wk: rand_vec(&mut rng, NKV * HD * HIDDEN, 2.0 * s),
            wv: rand_vec(&mut rng, NKV * HD * HIDDEN, s),
            wo: rand_vec(&mut rng, HIDDEN * NQ * HD, s),
            bq: if bias { rand_vec(&mut rng, NQ * HD, 0.5) } else { vec![0.0; NQ * HD] },
            bk: if bias { rand_vec(&mut rng, NKV * HD, 0.5) } else { vec![0.0; NKV * HD] },
            bv: if bias { rand_vec(&mut rng, NKV * HD, 0.5) } else { vec![0.0; NKV * HD] },
            ffn_norm: (0..HIDDEN).map(|_| rng.random_range(0.5..1.5)).collect(),
            gate: rand_vec(&mut rng, FFN * HIDDEN, s),
            up: rand_vec(&mut rng, FFN * HIDDEN, s),
            down: rand_vec(&mut rng, HIDDEN * FFN, 1.0 / (FFN as f32).sqrt()),
        });
    }
    Tiny {
        embd: rand_vec(&mut rng, v * HIDDEN, 1.0),
        layers,
        norm: (0..HIDDEN).map(|_| rng.random_range(0.5..1.5)).collect(),
        bias,
    }
}

fn linear(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f32> {
    let n_in = x.len();
    (0..w.len() / n_in)
        .map(|o| {
            let s: f64 = (0..n_in).map(|i| w[o * n_in + i] as f64 * x[i] as f64).sum();
            s as f32 + b.map_or(0.0, |b| b[o])
        })
        .collect()
}

fn rmsnorm(x: &[f32], w: &[f32]) -> Vec<f32> {
    let ms: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + EPS as f64).sqrt();
    x.iter().zip(w).map(|(v, w)| (*v as f64 * inv) as f32 * w).collect()
}

/// Rotates each head's halves (x[i], x[i + HD/2]) by position `p`.
fn rope_halves(x: &mut [f32], p: usize) {
    for head in x.chunks_mut(HD) {
        for i in 0..HD / 2 {
            let ang = p as f64 / THETA.powf(2.0 * i as f64 / HD as f64);
            let (s, c) = ang.sin_cos();
            let (a, b) = (head[i] as f64, head[i + HD / 2] as f64);
            head[i] = (a * c - b * s) as f32;
            head[i + HD / 2] = (b * c + a * s) as f32;
        }
    }
}

/// The plain reference: one token at a time, explicit key/value lists, f64 where it is free.
fn reference_logits(m: &Tiny, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut keys: Vec<Vec<Vec<f32>>> = vec![vec![]; LAYERS];
    let mut vals: Vec<Vec<Vec<f32>>> = vec![vec![]; LAYERS];
    let mut out = Vec::new();
    for (p, &t) in tokens.iter().enumerate() {
        let mut x = m.embd[t as usize * HIDDEN..(t as usize + 1) * HIDDEN].to_vec();
        for (li, l) in m.layers.iter().enumerate() {
            let h = rmsnorm(&x, &l.attn_norm);
            let bias = |b: &[f32]| if m.bias { Some(b.to_vec()) } else { None };
            let mut q = linear(&l.wq, bias(&l.bq).as_deref(), &h);
            let mut k = linear(&l.wk, bias(&l.bk).as_deref(), &h);
            let v = linear(&l.wv, bias(&l.bv).as_deref(), &h);
            rope_halves(&mut q, p);
            rope_halves(&mut k, p);
            keys[li].push(k);
            vals[li].push(v);
            let mut att = vec![0.0f32; NQ * HD];
            for hq in 0..NQ {
                let kvh = hq / (NQ / NKV);
                let qh = &q[hq * HD..(hq + 1) * HD];
                let scores: Vec<f64> = keys[li]
                    .iter()
                    .map(|k| (0..HD).map(|d| qh[d] as f64 * k[kvh * HD + d] as f64).sum::<f64>() / (HD as f64).sqrt())
                    .collect();
                let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..HD {
                    let s: f64 = e.iter().zip(&vals[li]).map(|(w, v)| w * v[kvh * HD + d] as f64).sum();
                    att[hq * HD + d] = (s / z) as f32;
                }
            }
            let o = linear(&l.wo, None, &att);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rmsnorm(&x, &l.ffn_norm);
            let g = linear(&l.gate, None, &h);
            let u = linear(&l.up, None, &h);
            let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = linear(&l.down, None, &a);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        out.push(linear(&m.embd, None, &rmsnorm(&x, &m.norm)));
    }
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("adaquant-model-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tokenizer_json() -> serde_json::Value {
    let (toks, merges) = vocab();
    let vocab: serde_json::Map<String, serde_json::Value> =
        toks.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<_> = (0..3)
        .map(|i| json!({"id": i, "content": toks[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `m` as a Hugging Face folder of `model_type` (`llama` or `qwen2`), weights in two shards.
fn write_hf(m: &Tiny, model_type: &str, name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let config = json!({
        "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": NQ,
        "num_key_value_heads": NKV, "num_hidden_layers": LAYERS, "vocab_size": vocab_size(), "rope_theta": THETA,
        "rms_norm_eps": EPS, "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab_size(), HIDDEN], f32_bytes(&m.embd)),
        ("model.norm.weight".into(), vec![HIDDEN], f32_bytes(&m.norm)),
    ];
    for (i, l) in m.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        tensors.push((p("input_layernorm.weight"), vec![HIDDEN], f32_bytes(&l.attn_norm)));
        tensors.push((p("self_attn.q_proj.weight"), vec![NQ * HD, HIDDEN], f32_bytes(&l.wq)));
        tensors.push((p("self_attn.k_proj.weight"), vec![NKV * HD, HIDDEN], f32_bytes(&l.wk)));
        tensors.push((p("self_attn.v_proj.weight"), vec![NKV * HD, HIDDEN], f32_bytes(&l.wv)));
        tensors.push((p("self_attn.o_proj.weight"), vec![HIDDEN, NQ * HD], f32_bytes(&l.wo)));
        if m.bias {
            tensors.push((p("self_attn.q_proj.bias"), vec![NQ * HD], f32_bytes(&l.bq)));
            tensors.push((p("self_attn.k_proj.bias"), vec![NKV * HD], f32_bytes(&l.bk)));
            tensors.push((p("self_attn.v_proj.bias"), vec![NKV * HD], f32_bytes(&l.bv)));
        }
        tensors.push((p("post_attention_layernorm.weight"), vec![HIDDEN], f32_bytes(&l.ffn_norm)));
        tensors.push((p("mlp.gate_proj.weight"), vec![FFN, HIDDEN], f32_bytes(&l.gate)));
        tensors.push((p("mlp.up_proj.weight"), vec![FFN, HIDDEN], f32_bytes(&l.up)));
        tensors.push((p("mlp.down_proj.weight"), vec![HIDDEN, FFN], f32_bytes(&l.down)));
    }
    let half = tensors.len() / 2;
    for (shard, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let views: Vec<(String, TensorView<'_>)> =
            part.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(format!("model-0000{}-of-00002.safetensors", shard + 1)), bytes).unwrap();
    }
    dir
}

/// Writes `m` as a GGUF file; with `permute`, Q/K rows are stored the way llama.cpp's converter stores them.
fn write_gguf(m: &Tiny, arch: &str, permute: bool, name: &str) -> PathBuf {
    let (toks, merges) = vocab();
    let mut w = GgufWriter::new();
    let a = |k: &str| format!("{arch}.{k}");
    w.meta("general.architecture", Value::String(arch.into()))
        .meta(&a("block_count"), Value::U32(LAYERS as u32))
        .meta(&a("context_length"), Value::U32(128))
        .meta(&a("embedding_length"), Value::U32(HIDDEN as u32))
        .meta(&a("feed_forward_length"), Value::U32(FFN as u32))
        .meta(&a("attention.head_count"), Value::U32(NQ as u32))
        .meta(&a("attention.head_count_kv"), Value::U32(NKV as u32))
        .meta(&a("rope.freq_base"), Value::F32(THETA as f32))
        .meta(&a("attention.layer_norm_rms_epsilon"), Value::F32(EPS))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(toks.iter().map(|t| Value::String(t.clone())).collect()))
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array((0..toks.len()).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
        )
        .meta("tokenizer.ggml.merges", Value::Array(merges.iter().map(|t| Value::String(t.clone())).collect()))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.tensor_f32("token_embd.weight", &[vocab_size(), HIDDEN], &m.embd);
    w.tensor_f32("output_norm.weight", &[HIDDEN], &m.norm);
    let perm = |x: &[f32], heads: usize, cols: usize| {
        if permute {
            permute_rope_rows(x, heads, HD, cols)
        } else {
            x.to_vec()
        }
    };
    for (i, l) in m.layers.iter().enumerate() {
        let p = |s: &str| format!("blk.{i}.{s}");
        w.tensor_f32(&p("attn_norm.weight"), &[HIDDEN], &l.attn_norm);
        w.tensor_f32(&p("attn_q.weight"), &[NQ * HD, HIDDEN], &perm(&l.wq, NQ, HIDDEN));
        w.tensor_f32(&p("attn_k.weight"), &[NKV * HD, HIDDEN], &perm(&l.wk, NKV, HIDDEN));
        w.tensor_f32(&p("attn_v.weight"), &[NKV * HD, HIDDEN], &l.wv);
        w.tensor_f32(&p("attn_output.weight"), &[HIDDEN, NQ * HD], &l.wo);
        if m.bias {
            w.tensor_f32(&p("attn_q.bias"), &[NQ * HD], &perm(&l.bq, NQ, 1));
            w.tensor_f32(&p("attn_k.bias"), &[NKV * HD], &perm(&l.bk, NKV, 1));
            w.tensor_f32(&p("attn_v.bias"), &[NKV * HD], &l.bv);
        }
        w.tensor_f32(&p("ffn_norm.weight"), &[HIDDEN], &l.ffn_norm);
        w.tensor_f32(&p("ffn_gate.weight"), &[FFN, HIDDEN], &l.gate);
        w.tensor_f32(&p("ffn_up.weight"), &[FFN, HIDDEN], &l.up);
        w.tensor_f32(&p("ffn_down.weight"), &[HIDDEN, FFN], &l.down);
    }
    let dir = temp_dir(name);
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, w.to_bytes()).unwrap();
    path
}

fn model_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = FullPrecisionCache::new(model.cache_shape(64)).unwrap();
    model.forward(tokens, &mut cache, &mut ForwardOptions::new(LogitsRange::All)).unwrap().data
}

fn max_diff(a: &[f32], reference: &[Vec<f32>]) -> f32 {
    let flat: Vec<f32> = reference.iter().flatten().copied().collect();
    assert_eq!(a.len(), flat.len());
    a.iter().zip(&flat).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const TOKENS: [u32; 13] = [1, 259, 260, 5, 77, 120, 3, 250, 9, 100, 44, 258, 2];

#[test]
fn hf_llama_matches_reference() {
    let m = tiny(1, false);
    let dir = write_hf(&m, "llama", "hf-llama");
    let model = Model::load(&dir).unwrap();
    assert_eq!(model.config.n_layers, LAYERS);
    assert!(model.config.tied_embeddings && !model.config.qkv_bias);
    let d = max_diff(&model_logits(&model, &TOKENS), &reference_logits(&m, &TOKENS));
    assert!(d < 1e-4, "max logit difference {d}");
    // The tokenizer from tokenizer.json applies the merges and knows the special tokens.
    let t = model.tokenizer();
    assert_eq!(t.encode("hell", false).unwrap(), vec![259, 260]);
    assert_eq!(t.encode("<|im_end|>", true).unwrap(), vec![1, 2]);
    assert_eq!(t.decode(&t.encode("héllo wörld\n", false).unwrap()).unwrap(), "héllo wörld\n");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hf_qwen2_biases_match_reference() {
    let m = tiny(2, true);
    let dir = write_hf(&m, "qwen2", "hf-qwen2");
    let model = Model::load(&dir).unwrap();
    assert!(model.config.qkv_bias);
    assert!(model.layer_weights(1).bk.is_some());
    let d = max_diff(&model_logits(&model, &TOKENS), &reference_logits(&m, &TOKENS));
    assert!(d < 1e-4, "max logit difference {d}");
    // Without its biases the same weights give different logits, so the biases are really applied.
    let no_bias = Tiny { bias: false, ..tiny(2, true) };
    assert!(max_diff(&model_logits(&model, &TOKENS), &reference_logits(&no_bias, &TOKENS)) > 1e-2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn gguf_llama_permuted_rows_match_reference_and_unpermuted_do_not() {
    let m = tiny(3, false);
    let reference = reference_logits(&m, &TOKENS);
    let path = write_gguf(&m, "llama", true, "gguf-llama");
    let model = Model::load(&path).unwrap();
    let d = max_diff(&model_logits(&model, &TOKENS), &reference);
    assert!(d < 1e-4, "max logit difference {d}");
    // Q/K rows stored in Hugging Face order in a llama GGUF are read as adjacent-pair order: wrong logits.
    let wrong = write_gguf(&m, "llama", false, "gguf-llama-wrong");
    let d = max_diff(&model_logits(&Model::load(&wrong).unwrap(), &TOKENS), &reference);
    assert!(d > 1e-2, "the RoPE row order made no difference ({d})");
    // The GGUF tokenizer rebuilt from metadata agrees with tokenizer.json.
    assert_eq!(model.tokenizer().encode("hell<|im_start|>", false).unwrap(), vec![259, 260, 1]);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    let _ = std::fs::remove_dir_all(wrong.parent().unwrap());
}

#[test]
fn gguf_qwen2_is_stored_unpermuted() {
    let m = tiny(4, true);
    let path = write_gguf(&m, "qwen2", false, "gguf-qwen2");
    let model = Model::load(&path).unwrap();
    let d = max_diff(&model_logits(&model, &TOKENS), &reference_logits(&m, &TOKENS));
    assert!(d < 1e-4, "max logit difference {d}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn missing_keys_tensors_and_bad_architectures_are_typed_errors() {
    let m = tiny(5, false);
    let dir = write_hf(&m, "llama", "hf-errors");
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    let mut c = cfg.clone();
    c.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    assert!(matches!(Model::load(&dir), Err(ModelError::MissingKey { key, .. }) if key == "hidden_size"));
    let mut c = cfg.clone();
    c["model_type"] = json!("gpt_neox");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    assert!(matches!(Model::load(&dir), Err(ModelError::UnsupportedArch { arch }) if arch == "gpt_neox"));
    let mut c = cfg.clone();
    c["num_key_value_heads"] = json!(3);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    assert!(matches!(Model::load(&dir), Err(ModelError::InvalidConfig(_))));
    // Biases announced (qwen2) but absent from the weights.
    let mut c = cfg.clone();
    c["model_type"] = json!("qwen2");
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    assert!(matches!(Model::load(&dir), Err(ModelError::MissingTensor(name)) if name.contains("q_proj.bias")));
    // A wrong shape.
    let mut c = cfg.clone();
    c["intermediate_size"] = json!(FFN + 1);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    assert!(matches!(Model::load(&dir), Err(ModelError::TensorShape { .. })));
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(Model::load(&dir).is_ok());
    let _ = std::fs::remove_dir_all(dir);
    assert!(matches!(Model::load(std::path::Path::new("/nonexistent/model.gguf")), Err(ModelError::Io { .. })));
}

#[test]
fn forward_rejects_bad_input() {
    let m = tiny(6, false);
    let path = write_gguf(&m, "llama", true, "gguf-bad-input");
    let model = Model::load(&path).unwrap();
    let mut cache = FullPrecisionCache::new(model.cache_shape(4)).unwrap();
    let mut opts = ForwardOptions::new(LogitsRange::All);
    assert!(matches!(model.forward(&[], &mut cache, &mut opts), Err(ModelError::InvalidInput(_))));
    assert!(matches!(model.forward(&[9999], &mut cache, &mut opts), Err(ModelError::TokenOutOfRange { .. })));
    assert!(matches!(model.forward(&[1; 5], &mut cache, &mut opts), Err(ModelError::InvalidInput(_))));
    let mut opts = ForwardOptions::new(LogitsRange::From(3));
    assert!(matches!(model.forward(&[1, 2, 3], &mut cache, &mut opts), Err(ModelError::InvalidInput(_))));
    let mut other = FullPrecisionCache::new(adaquant_cache::CacheShape::new(3, NQ, NKV, HD, 8)).unwrap();
    assert!(model.forward(&[1], &mut other, &mut ForwardOptions::default()).is_err());
    let logits = model.forward(&[1, 2, 3], &mut cache, &mut ForwardOptions::new(LogitsRange::None)).unwrap();
    assert_eq!(logits.rows(), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn config_is_read_without_the_weights() {
    let m = tiny(6, false);
    let gguf = write_gguf(&m, "llama", true, "config-gguf");
    let hf = write_hf(&m, "llama", "config-hf");
    let loaded = Model::load(&gguf).unwrap().config;
    assert_eq!(adaquant_model::ModelConfig::read(&gguf).unwrap(), loaded);
    assert_eq!(adaquant_model::ModelConfig::read(&hf).unwrap(), Model::load(&hf).unwrap().config);
    assert_eq!(loaded.cache_shape(77), Model::load(&gguf).unwrap().cache_shape(77));
    assert!(adaquant_model::ModelConfig::read(&hf.join("missing.gguf")).is_err());
    let _ = std::fs::remove_dir_all(gguf.parent().unwrap());
    let _ = std::fs::remove_dir_all(hf);
}
