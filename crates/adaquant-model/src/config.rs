//! The model configuration, read from GGUF metadata or a Hugging Face `config.json`.

use serde::Serialize;

use crate::gguf::{Gguf, Value};
use crate::{ModelError, Result};

/// Architecture family of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    /// The architecture named `name` (GGUF `general.architecture` or HF `model_type`).
    pub fn parse(name: &str) -> Result<Arch> {
        match name {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(ModelError::UnsupportedArch { arch: other.to_string() }),
        }
    }
}

/// Everything the forward pass needs to know about a checkpoint's shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// The context length the model was trained for.
    pub max_seq_len: usize,
    /// The output head reuses the token embedding.
    pub tied_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Q, K and V projections carry biases (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Checks that the sizes are non-zero and consistent.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("n_q_heads", self.n_q_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(ModelError::InvalidConfig(format!("{name} is zero")));
            }
            if v > 1 << 24 && name != "max_seq_len" {
                return Err(ModelError::InvalidConfig(format!("{name} = {v} is implausibly large")));
            }
        }
        if !self.n_q_heads.is_multiple_of(self.n_kv_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "n_q_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ModelError::InvalidConfig(format!(
                "rope_theta {} must be a finite number above 1",
                self.rope_theta
            )));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(ModelError::InvalidConfig(format!("rms_eps {} must be positive", self.rms_eps)));
        }
        Ok(())
    }

    /// Parameters in the weights (embedding counted once when tied).
    pub fn n_params(&self) -> usize {
        let q = self.n_q_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let attn = self.hidden * (q + 2 * kv) + q * self.hidden;
        let mlp = 3 * self.hidden * self.ffn;
        let per_layer = attn + mlp + 2 * self.hidden;
        let emb = self.vocab * self.hidden * if self.tied_embeddings { 1 } else { 2 };
        self.n_layers * per_layer + emb + self.hidden
    }

    /// The configuration of a checkpoint without reading its weights: the header of a `.gguf` file (memory-mapped,
    /// tensors untouched) or the `config.json` of a Hugging Face folder. Lets commands check their settings
    /// against the model's shape before the (slower) load.
    pub fn read(path: &std::path::Path) -> Result<ModelConfig> {
        let config = if path.is_dir() {
            let cfg_path = path.join("config.json");
            let bytes = std::fs::read(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", cfg_path.display())))?;
            ModelConfig::from_hf_json(&json, &cfg_path.display().to_string())?
        } else {
            ModelConfig::from_gguf(&crate::gguf::GgufFile::open(path)?.header)?
        };
        Ok(config)
    }

    /// The cache shape of this configuration for contexts of up to `max_seq_len` tokens.
    pub fn cache_shape(&self, max_seq_len: usize) -> adaquant_cache::CacheShape {
        adaquant_cache::CacheShape::new(self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim, max_seq_len)
    }

    /// The configuration stored in a GGUF header.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let src = "GGUF metadata";
        let missing = |key: &str| ModelError::MissingKey { key: key.to_string(), source_name: src.to_string() };
        let arch_name =
            g.get("general.architecture").and_then(Value::as_str).ok_or_else(|| missing("general.architecture"))?;
        let arch = Arch::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let uint = |k: &str| -> Result<usize> {
            let full = key(k);
            let v = g.get(&full).ok_or_else(|| missing(&full))?;
            v.as_u64().and_then(|v| usize::try_from(v).ok()).ok_or_else(|| {
                ModelError::InvalidConfig(format!("{full} should be a non-negative integer, found {v:?}"))
            })
        };
        let float = |k: &str| -> Result<Option<f32>> {
            let full = key(k);
            match g.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(|x| Some(x as f32))
                    .ok_or_else(|| ModelError::InvalidConfig(format!("{full} should be a number, found {v:?}"))),
            }
        };
        let n_layers = uint("block_count")?;
        let hidden = uint("embedding_length")?;
        let ffn = uint("feed_forward_length")?;
        let n_q_heads = uint("attention.head_count")?;
        let n_kv_heads =
            if g.get(&key("attention.head_count_kv")).is_some() { uint("attention.head_count_kv")? } else { n_q_heads };
        let head_dim = if g.get(&key("attention.key_length")).is_some() {
            uint("attention.key_length")?
        } else {
            hidden.checked_div(n_q_heads).unwrap_or(0)
        };
        let vocab = match g.get(&key("vocab_size")) {
            Some(_) => uint("vocab_size")?,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len())
                .ok_or_else(|| missing(&key("vocab_size")))?,
        };
        let max_seq_len = uint("context_length")?;
        let rope_theta = float("rope.freq_base")?.unwrap_or(10000.0);
        let rms_eps = float("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| missing(&key("attention.layer_norm_rms_epsilon")))?;
        let tok_id = |k: &str| {
            g.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).filter(|&v| (v as usize) < vocab)
        };
        let cfg = ModelConfig {
            arch,
            n_layers,
            hidden,
            ffn,
            n_q_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rope_theta,
            rms_eps,
            max_seq_len,
            tied_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: tok_id("tokenizer.ggml.eos_token_id"),
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration in a Hugging Face `config.json` (already parsed).
    pub fn from_hf_json(j: &serde_json::Value, source_name: &str) -> Result<ModelConfig> {
        let missing = |key: &str| ModelError::MissingKey { key: key.to_string(), source_name: source_name.to_string() };
        let uint = |k: &str| -> Result<usize> {
            let v = j.get(k).ok_or_else(|| missing(k))?;
            v.as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ModelError::InvalidConfig(format!("{k} should be a non-negative integer, found {v}")))
        };
        let arch_name = j.get("model_type").and_then(|v| v.as_str()).ok_or_else(|| missing("model_type"))?;
        let arch = Arch::parse(arch_name)?;
        let hidden = uint("hidden_size")?;
        let n_q_heads = uint("num_attention_heads")?;
        let n_kv_heads = if j.get("num_key_value_heads").is_some_and(|v| !v.is_null()) {
            uint("num_key_value_heads")?
        } else {
            n_q_heads
        };
        let head_dim = if j.get("head_dim").is_some_and(|v| !v.is_null()) {
            uint("head_dim")?
        } else {
            hidden.checked_div(n_q_heads).unwrap_or(0)
        };
        let float = |k: &str, default: f64| -> Result<f32> {
            match j.get(k) {
                None => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| ModelError::InvalidConfig(format!("{k} should be a number, found {v}"))),
            }
        };
        let token = |k: &str| -> Option<u32> {
            match j.get(k)? {
                serde_json::Value::Array(a) => a.first()?.as_u64(),
                v => v.as_u64(),
            }
            .and_then(|v| u32::try_from(v).ok())
        };
        if j.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(ModelError::InvalidConfig(
                "rope_scaling is set in config.json; scaled RoPE variants are not implemented".into(),
            ));
        }
        let cfg = ModelConfig {
            arch,
            n_layers: uint("num_hidden_layers")?,
            hidden,
            ffn: uint("intermediate_size")?,
            n_q_heads,
            n_kv_heads,
            head_dim,
            vocab: uint("vocab_size")?,
            rope_theta: float("rope_theta", 10000.0)?,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            max_seq_len: uint("max_position_embeddings")?,
            tied_embeddings: j.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false),
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
            qkv_bias: arch == Arch::Qwen2 || j.get("attention_bias").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
