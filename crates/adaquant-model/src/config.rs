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
    Qwen3,
    Gemma3,
}

impl Arch {
    /// The architecture named `name` (GGUF `general.architecture` or HF `model_type`).
    pub fn parse(name: &str) -> Result<Arch> {
        match name {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            // `gemma3_text` is the text-only model type of Hugging Face folders.
            "gemma3" | "gemma3_text" => Ok(Arch::Gemma3),
            other => Err(ModelError::UnsupportedArch { arch: other.to_string() }),
        }
    }
}

/// How RoPE frequencies are rescaled for contexts beyond the training length.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's rule: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Per-frequency divisors from the GGUF tensor `rope_freqs.weight` (how llama.cpp stores Llama 3 scaling).
    FreqFactors,
}

impl RopeScaling {
    /// The inverse frequencies of `head_dim`-wide heads with base `theta`, rescaled by this rule; `factors` are
    /// the per-frequency divisors of [`RopeScaling::FreqFactors`] (ignored otherwise).
    pub fn inv_freq(&self, theta: f64, head_dim: usize, factors: Option<&[f32]>) -> Vec<f64> {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
        match self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::FreqFactors => match factors {
                Some(d) => base.iter().zip(d).map(|(f, &d)| f / d as f64).collect(),
                None => base,
            },
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The gating nonlinearity of the feed-forward block: `down(act(gate(x)) * up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma.
    GeluTanh,
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
    /// RoPE frequency scaling of the global (full-attention) layers.
    pub rope_scaling: RopeScaling,
    /// Each query and key head is RMS-normalised before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Attention and feed-forward outputs are RMS-normalised before the residual add (Gemma's sandwich norms).
    pub post_norms: bool,
    pub activation: Activation,
    /// Token embeddings are multiplied by this (sqrt(hidden) for Gemma, 1 otherwise).
    pub embed_scale: f32,
    /// The softmax scale of attention scores (1/sqrt(head_dim) unless the checkpoint says otherwise).
    pub attn_scale: f32,
    /// Tokens a sliding-window layer attends to, itself included (`None`: no sliding-window layers).
    pub sliding_window: Option<usize>,
    /// Per layer: true for a sliding-window (local) layer. Empty or all false without sliding windows.
    pub local_layers: Vec<bool>,
    /// RoPE base of the local layers (unscaled); equals `rope_theta` when there are none.
    pub rope_theta_local: f32,
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
        for (name, v) in [("embed_scale", self.embed_scale), ("attn_scale", self.attn_scale)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::InvalidConfig(format!("{name} {v} must be a finite positive number")));
            }
        }
        if !(self.rope_theta_local.is_finite() && self.rope_theta_local > 1.0) {
            return Err(ModelError::InvalidConfig(format!(
                "local RoPE base {} must be a finite number above 1",
                self.rope_theta_local
            )));
        }
        if !self.local_layers.is_empty() && self.local_layers.len() != self.n_layers {
            return Err(ModelError::InvalidConfig(format!(
                "{} layer types for {} layers",
                self.local_layers.len(),
                self.n_layers
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(ModelError::InvalidConfig("sliding window of 0 tokens".into()));
        }
        if self.local_layers.iter().any(|&l| l) && self.sliding_window.is_none() {
            return Err(ModelError::InvalidConfig("sliding-window layers without a window size".into()));
        }
        match &self.rope_scaling {
            RopeScaling::Linear { factor } if !(factor.is_finite() && *factor > 0.0) => {
                return Err(ModelError::InvalidConfig(format!("linear RoPE scaling factor {factor} must be positive")))
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let ok = [*factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0)
                    && high_freq_factor > low_freq_factor;
                if !ok {
                    return Err(ModelError::InvalidConfig(format!(
                        "llama3 RoPE scaling needs positive factors with high_freq_factor > low_freq_factor, found \
                         factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor {high_freq_factor}, \
                         original_max_position_embeddings {original_max_position_embeddings}"
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether `layer` is a sliding-window (local) layer.
    pub fn is_local(&self, layer: usize) -> bool {
        self.local_layers.get(layer).copied().unwrap_or(false)
    }

    /// The window of `layer`: `Some(tokens)` for a sliding-window layer, `None` for full attention.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        if self.is_local(layer) {
            self.sliding_window
        } else {
            None
        }
    }

    /// Parameters in the weights (embedding counted once when tied).
    pub fn n_params(&self) -> usize {
        let q = self.n_q_heads * self.head_dim;
        let kv = self.n_kv_heads * self.head_dim;
        let attn = self.hidden * (q + 2 * kv) + q * self.hidden;
        let mlp = 3 * self.hidden * self.ffn;
        let norms = 2 * self.hidden
            + if self.qk_norm { 2 * self.head_dim } else { 0 }
            + if self.post_norms { 2 * self.hidden } else { 0 };
        let biases = if self.qkv_bias { q + 2 * kv } else { 0 };
        let per_layer = attn + mlp + norms + biases;
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

    /// The cache shape of this configuration for contexts of up to `max_seq_len` tokens: heads, softmax scale
    /// and the sliding windows of local layers, exactly what [`crate::Model::forward`] requires of a cache.
    pub fn cache_shape(&self, max_seq_len: usize) -> adaquant_cache::CacheShape {
        let mut shape =
            adaquant_cache::CacheShape::new(self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim, max_seq_len);
        shape.softmax_scale = self.attn_scale;
        if self.local_layers.iter().any(|&l| l) {
            shape.windows = (0..self.n_layers).map(|l| self.layer_window(l)).collect();
        }
        shape
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
        let has_freqs = g.tensor("rope_freqs.weight").is_some();
        let scaling_type = match g.get(&key("rope.scaling.type")) {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| {
                ModelError::InvalidConfig(format!("{} should be a string, found {v:?}", key("rope.scaling.type")))
            })?),
        };
        let linear = |factor: Option<f32>| -> Result<RopeScaling> {
            let factor = factor.ok_or_else(|| missing(&key("rope.scaling.factor")))? as f64;
            Ok(if factor == 1.0 { RopeScaling::None } else { RopeScaling::Linear { factor } })
        };
        let mut rope_scaling = match scaling_type {
            None => match float("rope.scale_linear")? {
                Some(f) => linear(Some(f))?,
                None => RopeScaling::None,
            },
            Some("none") => RopeScaling::None,
            Some("linear") => linear(float("rope.scaling.factor")?.or(float("rope.scale_linear")?))?,
            Some(other) => {
                return Err(ModelError::UnsupportedRopeScaling { kind: other.to_string(), source_name: src.into() })
            }
        };
        if has_freqs {
            if rope_scaling != RopeScaling::None {
                return Err(ModelError::UnsupportedRopeScaling {
                    kind: "rope_freqs.weight together with linear scaling".into(),
                    source_name: src.into(),
                });
            }
            rope_scaling = RopeScaling::FreqFactors;
        }
        let gemma = arch == Arch::Gemma3;
        let sliding_window = if gemma && g.get(&key("attention.sliding_window")).is_some() {
            Some(uint("attention.sliding_window")?).filter(|&w| w > 0)
        } else {
            None
        };
        // llama.cpp's Gemma 3: every sixth layer is global, the others slide over the window with RoPE base
        // 10,000; queries are scaled by 1/sqrt(head_dim), except in the 62-layer (27B) model: 1/sqrt(hidden/heads).
        let local_layers: Vec<bool> =
            if sliding_window.is_some() { (0..n_layers).map(|i| (i + 1) % 6 != 0).collect() } else { Vec::new() };
        let query_scalar = if gemma && n_layers == 62 { hidden / n_q_heads.max(1) } else { head_dim };
        // `{arch}.attention.scale` (llama.cpp's f_attention_scale), when present, multiplies the scores instead.
        let attn_scale = float("attention.scale")?.unwrap_or(1.0 / (query_scalar.max(1) as f32).sqrt());
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
            rope_scaling,
            qk_norm: g.tensor("blk.0.attn_q_norm.weight").is_some() || matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma,
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
            attn_scale,
            sliding_window,
            local_layers,
            rope_theta_local: if sliding_window.is_some() { 10000.0 } else { rope_theta },
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
        if j.get("text_config").is_some() {
            return Err(ModelError::InvalidConfig(format!(
                "{source_name} describes a multimodal checkpoint (it has text_config); \
                 give the text-only model folder (model_type `{arch_name}_text`)"
            )));
        }
        let rope_scaling = rope_scaling_from_hf(j.get("rope_scaling"), source_name)?;
        let gemma = arch == Arch::Gemma3;
        let act_name = j
            .get("hidden_activation")
            .or_else(|| j.get("hidden_act"))
            .and_then(|v| v.as_str())
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(ModelError::InvalidConfig(format!(
                    "activation `{other}` is not implemented (supported: silu, gelu_pytorch_tanh)"
                )))
            }
        };
        for k in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if j.get(k).is_some_and(|v| !v.is_null()) {
                return Err(ModelError::InvalidConfig(format!("{k} is set; logit soft-capping is not implemented")));
            }
        }
        if j.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(ModelError::InvalidConfig(
                "use_sliding_window is true; sliding windows are implemented for Gemma 3 only".into(),
            ));
        }
        let n_layers = uint("num_hidden_layers")?;
        let rope_theta = float("rope_theta", if gemma { 1_000_000.0 } else { 10000.0 })?;
        let (sliding_window, local_layers) = if gemma {
            let window = if j.get("sliding_window").is_some_and(|v| !v.is_null()) {
                Some(uint("sliding_window")?)
            } else {
                None
            };
            let types: Vec<bool> = match j.get("layer_types").and_then(|v| v.as_array()) {
                Some(a) => a
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(ModelError::InvalidConfig(format!("unknown layer type {t} in layer_types"))),
                    })
                    .collect::<Result<_>>()?,
                None => {
                    let pattern =
                        if j.get("sliding_window_pattern").is_some() { uint("sliding_window_pattern")? } else { 6 };
                    (0..n_layers).map(|i| pattern > 0 && (i + 1) % pattern != 0).collect()
                }
            };
            match window {
                Some(w) => (Some(w), types),
                None => (None, Vec::new()),
            }
        } else {
            (None, Vec::new())
        };
        let query_scalar = match j.get("query_pre_attn_scalar") {
            Some(v) if gemma && !v.is_null() => v.as_f64().ok_or_else(|| {
                ModelError::InvalidConfig(format!("query_pre_attn_scalar should be a number, found {v}"))
            })?,
            _ => head_dim as f64,
        };
        let cfg = ModelConfig {
            arch,
            n_layers,
            hidden,
            ffn: uint("intermediate_size")?,
            n_q_heads,
            n_kv_heads,
            head_dim,
            vocab: uint("vocab_size")?,
            rope_theta,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            max_seq_len: uint("max_position_embeddings")?,
            tied_embeddings: j.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(gemma),
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
            qkv_bias: arch == Arch::Qwen2 || j.get("attention_bias").and_then(|v| v.as_bool()).unwrap_or(false),
            rope_scaling,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma,
            activation,
            embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
            attn_scale: (1.0 / query_scalar.sqrt()) as f32,
            sliding_window,
            local_layers,
            rope_theta_local: if sliding_window.is_some() {
                float("rope_local_base_freq", 10000.0)?
            } else {
                rope_theta
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The `rope_scaling` object of a `config.json` (`null` or absent: none).
fn rope_scaling_from_hf(v: Option<&serde_json::Value>, source_name: &str) -> Result<RopeScaling> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| ModelError::MissingKey {
            key: format!("rope_scaling.{k}"),
            source_name: source_name.to_string(),
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::UnsupportedRopeScaling { kind: other.to_string(), source_name: source_name.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }
    }

    #[test]
    fn llama3_rope_scaling_matches_the_reference_numbers() {
        // transformers 4.53.3 `ROPE_INIT_FUNCTIONS["llama3"]` for head_dim 16, theta 500000 (float32 values).
        let reference = [
            1.0,
            0.193922758102417,
            0.03760603070259094,
            0.00729266507551074,
            0.0005248460220173001,
            3.428102354519069e-05,
            6.647869668086059e-06,
            1.289173155782919e-06,
        ];
        let got = llama3().inv_freq(500000.0, 16, None);
        for (i, (g, r)) in got.iter().zip(reference).enumerate() {
            assert!((g - r).abs() <= 1e-6 * r, "frequency {i}: {g} vs {r}");
        }
    }

    #[test]
    fn llama3_rope_scaling_follows_its_three_bands() {
        let theta = 500000.0f64;
        let d = 128;
        let got = llama3().inv_freq(theta, d, None);
        let (mut kept, mut divided, mut ramp) = (0, 0, 0);
        for (i, &g) in got.iter().enumerate() {
            let f = 1.0 / theta.powf((2 * i) as f64 / d as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(g, f, "high frequency {i} must be kept");
                kept += 1;
            } else if wavelen > 8192.0 {
                assert!((g - f / 8.0).abs() < 1e-18, "low frequency {i} must be divided by 8");
                divided += 1;
            } else {
                // Between the bands the result interpolates linearly in 8192/wavelen between f/8 and f.
                let t = (8192.0 / wavelen - 1.0) / 3.0;
                assert!((0.0..=1.0).contains(&t));
                assert!((g - (f / 8.0 + t * (f - f / 8.0))).abs() < 1e-15 * f.max(1e-300));
                assert!(g > f / 8.0 && g < f);
                ramp += 1;
            }
        }
        assert!(kept > 0 && divided > 0 && ramp > 0, "{kept} {divided} {ramp}");
    }

    #[test]
    fn linear_and_factor_scalings() {
        let plain = RopeScaling::None.inv_freq(10000.0, 16, None);
        let lin = RopeScaling::Linear { factor: 4.0 }.inv_freq(10000.0, 16, None);
        // transformers' linear rule for the same sizes.
        let reference = [0.25, 0.07905694097280502, 0.02500000037252903, 0.007905694656074047];
        for (i, r) in reference.iter().enumerate() {
            assert!((lin[i] - r).abs() <= 1e-6 * r, "{i}: {} vs {r}", lin[i]);
            assert_eq!(lin[i], plain[i] / 4.0);
        }
        let divisors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        let fac = RopeScaling::FreqFactors.inv_freq(10000.0, 16, Some(&divisors));
        for i in 0..8 {
            assert_eq!(fac[i], plain[i] / (1.0 + i as f64));
        }
    }

    fn hf(extra: serde_json::Value) -> serde_json::Value {
        let mut j = json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 1024,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        });
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        j
    }

    #[test]
    fn config_json_rope_scaling_types() {
        let c = ModelConfig::from_hf_json(
            &hf(json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})),
            "t",
        )
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            }
        );
        let c =
            ModelConfig::from_hf_json(&hf(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})), "t").unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let c = ModelConfig::from_hf_json(&hf(json!({"rope_scaling": null})), "t").unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None);
        for kind in ["yarn", "dynamic", "longrope"] {
            let e = ModelConfig::from_hf_json(&hf(json!({"rope_scaling": {"rope_type": kind, "factor": 4.0}})), "t")
                .unwrap_err();
            assert!(matches!(&e, ModelError::UnsupportedRopeScaling { kind: k, .. } if k == kind), "{kind}: {e}");
            assert!(e.to_string().contains(kind), "{e}");
        }
        let e = ModelConfig::from_hf_json(&hf(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})), "t")
            .unwrap_err();
        assert!(matches!(e, ModelError::MissingKey { .. }), "{e}");
    }

    #[test]
    fn gguf_rope_scaling_keys() {
        use crate::gguf::GgufWriter;
        let base = |w: &mut GgufWriter| {
            w.meta("general.architecture", Value::String("llama".into()))
                .meta("llama.block_count", Value::U32(1))
                .meta("llama.embedding_length", Value::U32(16))
                .meta("llama.feed_forward_length", Value::U32(32))
                .meta("llama.attention.head_count", Value::U32(2))
                .meta("llama.context_length", Value::U32(64))
                .meta("llama.vocab_size", Value::U32(10))
                .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        };
        let parse = |f: &dyn Fn(&mut GgufWriter)| {
            let mut w = GgufWriter::new();
            base(&mut w);
            f(&mut w);
            ModelConfig::from_gguf(&Gguf::parse(&w.to_bytes()).unwrap())
        };
        assert_eq!(parse(&|_| {}).unwrap().rope_scaling, RopeScaling::None);
        let c = parse(&|w| {
            w.meta("llama.rope.scaling.type", Value::String("linear".into()))
                .meta("llama.rope.scaling.factor", Value::F32(4.0));
        })
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let c = parse(&|w| {
            w.tensor_f32("rope_freqs.weight", &[4], &[1.0, 1.0, 2.0, 8.0]);
        })
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::FreqFactors);
        let e = parse(&|w| {
            w.meta("llama.rope.scaling.type", Value::String("yarn".into()))
                .meta("llama.rope.scaling.factor", Value::F32(4.0));
        })
        .unwrap_err();
        assert!(matches!(&e, ModelError::UnsupportedRopeScaling { kind, .. } if kind == "yarn"), "{e}");
    }
}
