//! Hugging Face checkpoint folders: `config.json`, one or more `*.safetensors`, `tokenizer.json` (and, when
//! present, the chat template and `add_bos_token` of `tokenizer_config.json`), for Llama, Mistral, Qwen2, Qwen3
//! and Gemma 3 (text) models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::config::{Arch, ModelConfig};
use crate::model::{LayerWeights, Model, Weights};
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// Memory-mapped safetensors files of one checkpoint, with an index from tensor name to file.
struct Shards {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, usize>,
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors { path: path.display().to_string(), msg: msg.to_string() }
}

impl Shards {
    fn open(dir: &Path) -> Result<Shards> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(st_err(dir, "no *.safetensors file in the folder"));
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in paths {
            let f = std::fs::File::open(&p).map_err(|e| ModelError::io(&p, e))?;
            // SAFETY: read-only private mapping of a checkpoint that adaquant does not modify while reading.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(&p, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| st_err(&p, e))?;
            for name in st.names() {
                if index.insert(name.to_string(), files.len()).is_some() {
                    return Err(st_err(&p, format!("tensor `{name}` appears in more than one shard")));
                }
            }
            files.push((p, map));
        }
        Ok(Shards { files, index })
    }

    /// Tensor `name` as f32 with its shape checked against `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self.index.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let (path, map) = &self.files[i];
        let st = SafeTensors::deserialize(map).map_err(|e| st_err(path, e))?;
        let t = st.tensor(name).map_err(|e| st_err(path, e))?;
        if t.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(st_err(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are read"),
                ))
            }
        })
    }
}

/// Loads a Hugging Face checkpoint folder.
pub fn load_hf_dir(dir: &Path) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let cfg_json: serde_json::Value = serde_json::from_slice(&cfg_bytes)
        .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", cfg_path.display())))?;
    let config = ModelConfig::from_hf_json(&cfg_json, &cfg_path.display().to_string())?;
    let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), config.bos_token_id, config.eos_token_id)?;
    if let Ok(b) = std::fs::read(dir.join("tokenizer_config.json")) {
        if let Ok(j) = serde_json::from_slice::<serde_json::Value>(&b) {
            tokenizer.set_chat_template(j.get("chat_template").and_then(|v| v.as_str()).map(str::to_string));
            if let Some(b) = j.get("add_bos_token").and_then(|v| v.as_bool()) {
                tokenizer.set_add_bos(b);
            }
        }
    }
    let shards = Shards::open(dir)?;
    let c = &config;
    let (h, q, kv) = (c.hidden, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let layers = (0..c.n_layers)
        .into_par_iter()
        .map(|i| -> Result<LayerWeights> {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let bias = |s: &str, n: usize| -> Result<Option<Vec<f32>>> {
                if c.qkv_bias {
                    shards.get(&p(s), &[n]).map(Some)
                } else {
                    Ok(None)
                }
            };
            let gemma = c.arch == Arch::Gemma3;
            // Gemma's RMSNorm multiplies by `1 + w`; the weights are stored as `w`.
            let norm = |s: &str, n: usize| -> Result<Vec<f32>> {
                let mut w = shards.get(&p(s), &[n])?;
                if gemma {
                    w.iter_mut().for_each(|v| *v += 1.0);
                }
                Ok(w)
            };
            let opt_norm = |s: &str, n: usize, wanted: bool| -> Result<Option<Vec<f32>>> {
                wanted.then(|| norm(s, n)).transpose()
            };
            // In Gemma 3, `post_attention_layernorm` is the sandwich norm of the attention output and
            // `pre_feedforward_layernorm` the feed-forward input norm; in Llama the former is the feed-forward input norm.
            let (ffn_norm_name, post_attn) = if c.post_norms {
                ("pre_feedforward_layernorm.weight", Some("post_attention_layernorm.weight"))
            } else {
                ("post_attention_layernorm.weight", None)
            };
            Ok(LayerWeights {
                attn_norm: norm("input_layernorm.weight", h)?,
                wq: shards.get(&p("self_attn.q_proj.weight"), &[q, h])?,
                wk: shards.get(&p("self_attn.k_proj.weight"), &[kv, h])?,
                wv: shards.get(&p("self_attn.v_proj.weight"), &[kv, h])?,
                wo: shards.get(&p("self_attn.o_proj.weight"), &[h, q])?,
                bq: bias("self_attn.q_proj.bias", q)?,
                bk: bias("self_attn.k_proj.bias", kv)?,
                bv: bias("self_attn.v_proj.bias", kv)?,
                q_norm: opt_norm("self_attn.q_norm.weight", c.head_dim, c.qk_norm)?,
                k_norm: opt_norm("self_attn.k_norm.weight", c.head_dim, c.qk_norm)?,
                post_attn_norm: post_attn.map(|s| norm(s, h)).transpose()?,
                ffn_norm: norm(ffn_norm_name, h)?,
                post_ffn_norm: opt_norm("post_feedforward_layernorm.weight", h, c.post_norms)?,
                w_gate: shards.get(&p("mlp.gate_proj.weight"), &[c.ffn, h])?,
                w_up: shards.get(&p("mlp.up_proj.weight"), &[c.ffn, h])?,
                w_down: shards.get(&p("mlp.down_proj.weight"), &[h, c.ffn])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tied = c.tied_embeddings;
    let mut out_norm = shards.get("model.norm.weight", &[h])?;
    if c.arch == Arch::Gemma3 {
        out_norm.iter_mut().for_each(|v| *v += 1.0);
    }
    let weights = Weights {
        tok_embd: shards.get("model.embed_tokens.weight", &[config.vocab, h])?,
        layers,
        out_norm,
        output: if tied { None } else { Some(shards.get("lm_head.weight", &[config.vocab, h])?) },
        rope_freqs: None,
    };
    Model::from_parts(config, weights, tokenizer)
}
