//! Tiny random checkpoints of four architectures, built with Hugging Face transformers' own model classes by
//! `tests/data/make_tiny.py` and committed with their float32 logits on a fixed prompt: Llama with Llama 3 RoPE
//! scaling, Qwen2 (q/k/v biases), Qwen3 (QK-norm) and Gemma 3 (QK-norm, sandwich norms, GeGLU, scaled
//! embeddings, local and global layers with their own RoPE bases, linear scaling on the global layer, a query
//! scale that is not 1/sqrt(head_dim), a prompt longer than the local layers' window). adaquant must reproduce the logits to 1e-4 from the safetensors folder
//! and from a GGUF written here from the same weights the way llama.cpp's converter writes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adaquant_cache::FullPrecisionCache;
use adaquant_model::gguf::{GgufWriter, Value};
use adaquant_model::model::permute_rope_rows;
use adaquant_model::{Arch, ForwardOptions, LogitsRange, Model, ModelError, RopeScaling};
use safetensors::SafeTensors;
use serde_json::Value as Json;

const TOL: f32 = 1e-4;

/// The committed files of a tiny checkpoint: configuration, tokenizer, tensor list and reference logits.
fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny").join(name)
}

fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xCBF29CE484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001B3))
}

fn splitmix(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E3779B97F4A7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^ (x >> 31)
}

/// Element `i` of tensor `name`, as `make_tiny.py`'s `value` defines it (exact in f32).
fn weight_value(name: &str, i: usize, gemma: bool) -> f32 {
    let m = (splitmix(fnv1a(name) ^ (i as u64).wrapping_mul(0x9E3779B97F4A7C15)) % 2001) as f32 - 1000.0;
    let u = m / 1024.0;
    match (name.contains("norm"), gemma) {
        (true, true) => 0.5 * u,
        (true, false) => 1.0 + 0.5 * u,
        _ => 0.25 * u,
    }
}

/// A tiny checkpoint folder in the temporary directory: the committed files plus `model.safetensors` rebuilt from
/// `weights.json` (no weights are committed).
fn dir(name: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("adaquant-tiny-{name}-{}", std::process::id()));
    if out.join("model.safetensors").is_file() {
        return out;
    }
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "tokenizer.json", "logits.json"] {
        std::fs::copy(source(name).join(f), out.join(f)).unwrap();
    }
    let list: Json = serde_json::from_slice(&std::fs::read(source(name).join("weights.json")).unwrap()).unwrap();
    let gemma = name == "gemma3";
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let n = t["name"].as_str().unwrap().to_string();
            let shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let count: usize = shape.iter().product();
            let bytes = (0..count).flat_map(|i| weight_value(&n, i, gemma).to_le_bytes()).collect();
            (n, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    // Written under a temporary name and renamed, so parallel tests never read half a file.
    let tmp = out.join(format!("model.safetensors.{:?}", std::thread::current().id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, out.join("model.safetensors")).unwrap();
    out
}

struct Reference {
    prompt: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn reference(name: &str) -> Reference {
    let j: Json = serde_json::from_slice(&std::fs::read(dir(name).join("logits.json")).unwrap()).unwrap();
    let prompt = j["prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let logits = j["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    Reference { prompt, logits }
}

/// The largest absolute difference between the model's logits on the prompt and the reference.
fn max_error(m: &Model, r: &Reference) -> f32 {
    let mut cache = FullPrecisionCache::new(m.cache_shape(64)).unwrap();
    let got = m.forward(&r.prompt, &mut cache, &mut ForwardOptions::new(LogitsRange::All)).unwrap();
    assert_eq!(got.rows(), r.logits.len());
    let mut worst = 0.0f32;
    for (i, want) in r.logits.iter().enumerate() {
        for (a, b) in got.row(i).iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

fn check_folder(name: &str) -> Model {
    let m = Model::load(&dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let err = max_error(&m, &reference(name));
    eprintln!("{name} from safetensors: max |logit error| {err:.2e}");
    assert!(err <= TOL, "{name} from safetensors: max |logit error| {err}");
    m
}

/// Reads every tensor of a folder's safetensors file as f32.
fn tensors(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir(name).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            let data = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (n, (t.shape().to_vec(), data))
        })
        .collect()
}

/// llama.cpp's converter's `rope_freqs` for Llama 3 scaling: the divisor of every frequency.
fn llama3_divisors(c: &Json, head_dim: usize) -> Vec<f32> {
    let s = &c["rope_scaling"];
    let f = |k: &str| s[k].as_f64().unwrap();
    let (factor, low, high, old) =
        (f("factor"), f("low_freq_factor"), f("high_freq_factor"), f("original_max_position_embeddings"));
    let theta = c["rope_theta"].as_f64().unwrap();
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Writes the folder's weights as a GGUF file the way llama.cpp's converter does.
fn write_gguf(name: &str, arch: &str, tweak: &dyn Fn(&mut Json)) -> PathBuf {
    let mut c: Json = serde_json::from_slice(&std::fs::read(dir(name).join("config.json")).unwrap()).unwrap();
    tweak(&mut c);
    let u = |k: &str| c[k].as_u64().unwrap() as u32;
    let (hidden, heads, kv_heads, layers, vocab) =
        (u("hidden_size"), u("num_attention_heads"), u("num_key_value_heads"), u("num_hidden_layers"), u("vocab_size"));
    let head_dim = c.get("head_dim").and_then(Json::as_u64).map_or(hidden / heads, |v| v as u32);
    let gemma = arch == "gemma3";
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.meta("general.architecture", Value::String(arch.into()))
        .meta(&k("block_count"), Value::U32(layers))
        .meta(&k("embedding_length"), Value::U32(hidden))
        .meta(&k("feed_forward_length"), Value::U32(u("intermediate_size")))
        .meta(&k("attention.head_count"), Value::U32(heads))
        .meta(&k("attention.head_count_kv"), Value::U32(kv_heads))
        .meta(&k("attention.key_length"), Value::U32(head_dim))
        .meta(&k("attention.value_length"), Value::U32(head_dim))
        .meta(&k("context_length"), Value::U32(u("max_position_embeddings")))
        .meta(&k("rope.freq_base"), Value::F32(c["rope_theta"].as_f64().unwrap() as f32))
        .meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(c["rms_norm_eps"].as_f64().unwrap() as f32));
    let tokens: Vec<Value> = (0..vocab).map(|i| Value::String(format!("t{i}"))).collect();
    w.meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens))
        .meta("tokenizer.ggml.scores", Value::Array((0..vocab).map(|i| Value::F32(-(i as f32))).collect()))
        .meta("tokenizer.ggml.token_type", Value::Array((0..vocab).map(|_| Value::I32(1)).collect()))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(2))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    if gemma {
        w.meta(&k("attention.sliding_window"), Value::U32(u("sliding_window")));
        let scale = 1.0 / c["query_pre_attn_scalar"].as_f64().unwrap().sqrt();
        w.meta(&k("attention.scale"), Value::F32(scale as f32));
    }
    match c["rope_scaling"].get("rope_type").and_then(Json::as_str) {
        Some("linear") => {
            w.meta(&k("rope.scaling.type"), Value::String("linear".into()));
            w.meta(&k("rope.scaling.factor"), Value::F32(c["rope_scaling"]["factor"].as_f64().unwrap() as f32));
        }
        Some("llama3") => {
            let d = llama3_divisors(&c, head_dim as usize);
            w.tensor_f32("rope_freqs.weight", &[d.len()], &d);
        }
        _ => {}
    }
    let t = tensors(name);
    let permute = arch == "llama";
    for (hf, (shape, data)) in &t {
        let mut data = data.clone();
        let gg = if let Some(rest) = hf.strip_prefix("model.layers.") {
            let (i, rest) = rest.split_once('.').unwrap();
            let short = match rest {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.q_norm.weight" => "attn_q_norm.weight",
                "self_attn.k_norm.weight" => "attn_k_norm.weight",
                "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
                "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                other => panic!("unexpected tensor {other}"),
            };
            if permute && (short == "attn_q.weight" || short == "attn_k.weight") {
                let n = if short == "attn_q.weight" { heads } else { kv_heads } as usize;
                data = permute_rope_rows(&data, n, head_dim as usize, hidden as usize);
            }
            format!("blk.{i}.{short}")
        } else {
            match hf.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".into(),
                "model.norm.weight" => "output_norm.weight".into(),
                "lm_head.weight" => "output.weight".into(),
                other => panic!("unexpected tensor {other}"),
            }
        };
        // llama.cpp's Gemma converter stores `1 + w` for every norm.
        if gemma && gg.ends_with("norm.weight") {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        w.tensor_f32(&gg, shape, &data);
    }
    // Tests run in parallel and two of them write the same folder with different tweaks: one file per call.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("adaquant-tiny-{name}-{arch}-{}-{call}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    path
}

fn check_gguf(name: &str, arch: &str) -> Model {
    let path = write_gguf(name, arch, &|_| {});
    let m = Model::load(&path);
    std::fs::remove_file(&path).ok();
    let m = m.unwrap_or_else(|e| panic!("{name} GGUF: {e}"));
    let err = max_error(&m, &reference(name));
    eprintln!("{name} from GGUF: max |logit error| {err:.2e}");
    assert!(err <= TOL, "{name} from GGUF: max |logit error| {err}");
    m
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    let m = check_folder("llama3");
    assert!(matches!(m.config.rope_scaling, RopeScaling::Llama3 { .. }));
    let g = check_gguf("llama3", "llama");
    assert_eq!(g.config.rope_scaling, RopeScaling::FreqFactors);
}

#[test]
fn llama3_without_its_scaling_misses_the_reference() {
    // The same weights read with plain RoPE (as adaquant did before it read rope_freqs.weight) must be off.
    let path = write_gguf("llama3", "llama", &|c| c["rope_scaling"] = Json::Null);
    let m = Model::load(&path);
    std::fs::remove_file(&path).ok();
    let err = max_error(&m.unwrap(), &reference("llama3"));
    assert!(err > 1e-3, "plain RoPE should not reproduce Llama 3 scaling, error {err}");
}

#[test]
fn qwen2_matches_transformers() {
    let m = check_folder("qwen2");
    assert!(m.config.qkv_bias && !m.config.qk_norm && m.config.tied_embeddings);
    let g = check_gguf("qwen2", "qwen2");
    assert!(g.config.qkv_bias);
}

#[test]
fn qwen3_matches_transformers() {
    let m = check_folder("qwen3");
    assert_eq!(m.config.arch, Arch::Qwen3);
    assert!(m.config.qk_norm && !m.config.qkv_bias);
    assert_eq!(m.config.head_dim, 16);
    let g = check_gguf("qwen3", "qwen3");
    assert!(g.config.qk_norm);
}

#[test]
fn gemma3_matches_transformers() {
    let m = check_folder("gemma3");
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!(c.local_layers, [true, true, true, true, true, false]);
    assert_eq!((c.sliding_window, c.rope_theta_local, c.rope_theta), (Some(16), 10000.0, 1e6));
    assert!(c.qk_norm && c.post_norms && c.tied_embeddings);
    assert!((c.attn_scale - 1.0 / 24f32.sqrt()).abs() < 1e-7);
    let g = check_gguf("gemma3", "gemma3");
    assert_eq!(g.config.local_layers, c.local_layers);
    assert_eq!(g.config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn gemma3_sliding_window_matters_and_quantized_caches_slide_too() {
    let m = Model::load(&dir("gemma3")).unwrap();
    let r = reference("gemma3");
    assert!(r.prompt.len() > 16 + 16, "the reference prompt must pass the 16-token window by more than a group");
    // The shape read from the configuration alone (what the CLI checks before loading weights) is the model's.
    let from_config = adaquant_model::ModelConfig::read(&dir("gemma3")).unwrap().cache_shape(64);
    assert_eq!(from_config, m.cache_shape(64));
    // A cache built without the windows (every layer global) is refused rather than attending too far back.
    let mut shape = m.cache_shape(64);
    assert_eq!(shape.windows, [Some(16), Some(16), Some(16), Some(16), Some(16), None]);
    shape.windows.clear();
    let mut plain = FullPrecisionCache::new(shape).unwrap();
    let e = m.forward(&r.prompt, &mut plain, &mut ForwardOptions::new(LogitsRange::All)).unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(ref s) if s.contains("cache shape")), "{e}");
    // Quantized caches slide as well: with an exact window of 4 tokens the local layers drop packed groups (per
    // token, and per-channel keys cut only at 16-token groups). One forward equals token-by-token decoding bit for
    // bit, and 8-bit codes stay close to the reference logits while 2-bit codes do not.
    for (spec, close) in [("k8v8-g8-r4", true), ("k8v8-g16-r16-kivi", true), ("k2v2-g8-r4", false)] {
        let build = || adaquant_model::generate::build_cache(spec, m.cache_shape(64)).unwrap();
        let mut one = build();
        let all = m.forward(&r.prompt, one.as_mut(), &mut ForwardOptions::new(LogitsRange::All)).unwrap();
        let mut steps = build();
        for (i, &t) in r.prompt.iter().enumerate() {
            let l = m.forward(&[t], steps.as_mut(), &mut ForwardOptions::new(LogitsRange::All)).unwrap();
            assert_eq!(l.row(0), all.row(i), "{spec}: token {i} decoded alone differs from the whole forward");
        }
        assert_eq!(one.seq_len(0), r.prompt.len(), "{spec}: the layer's position is the sequence's");
        assert_eq!(one.memory(), steps.memory(), "{spec}: the same bytes either way");
        let worst = r
            .logits
            .iter()
            .enumerate()
            .flat_map(|(i, want)| all.row(i).iter().zip(want).map(|(a, b)| (a - b).abs()).collect::<Vec<_>>())
            .fold(0.0f32, f32::max);
        eprintln!("{spec}: max |logit error| {worst:.2e} against the reference");
        if close {
            assert!(worst < 0.05, "{spec}: max |logit error| {worst}");
        } else {
            assert!(worst > 0.05, "{spec}: 2-bit codes should move the logits, max error {worst}");
        }
    }
}
