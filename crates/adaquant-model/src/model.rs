//! The decoder forward pass of the Llama family (Llama, Mistral, Qwen2, Qwen3) and Gemma 3: RMSNorm, RoPE (with
//! Llama 3 or linear scaling), optional QK-norm, grouped-query attention through a [`KvCache`], SwiGLU or GeGLU,
//! and Gemma's sandwich norms, scaled embeddings and sliding-window local layers.
//!
//! Weights are held dequantized to f32, row-major `[out][in]`. Query and key rows are kept in the Hugging Face
//! order, where RoPE rotates the two halves of each head (`x[i]`, `x[i + head_dim/2]`): GGUF files of the `llama`
//! architecture store them permuted so that RoPE rotates adjacent pairs (`x[2i]`, `x[2i + 1]`), and the loader
//! undoes that permutation. So keys, queries and hook taps have the same channel order whichever file a model
//! came from.
//!
//! Weights of GGUF files can instead stay in their block formats ([`WeightsMode::Packed`]): every linear layer whose
//! tensor has an integer-dot product in [`crate::qgemm`] then reads packed bytes, with 8-bit block activations, and
//! its f32 copy is not kept. The f32 path stays the reference and the choice for safetensors checkpoints.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use adaquant_cache::{CacheShape, KvCache};
use rayon::prelude::*;

use crate::config::{Activation, Arch, ModelConfig, RopeScaling};
use crate::gguf::GgufFile;
use crate::linalg::{gelu_tanh_glu, matmul_t, rms_norm, swiglu};
use crate::qgemm::{self, PackedMatrix};
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// One decoder layer's weights, f32 row-major `[out][in]`.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// `[n_q_heads * head_dim][hidden]`, rows of each head in the half-rotation (Hugging Face) order.
    pub wq: Vec<f32>,
    /// `[n_kv_heads * head_dim][hidden]`, same row order as `wq`.
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    /// `[hidden][n_q_heads * head_dim]`.
    pub wo: Vec<f32>,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// `[head_dim]` RMSNorm weights applied to every query head before RoPE (QK-norm; Qwen3, Gemma 3).
    pub q_norm: Option<Vec<f32>>,
    /// `[head_dim]` RMSNorm weights applied to every key head before RoPE.
    pub k_norm: Option<Vec<f32>>,
    /// `[hidden]` RMSNorm of the attention output before the residual add (Gemma's sandwich norm).
    pub post_attn_norm: Option<Vec<f32>>,
    /// The feed-forward block's input norm.
    pub ffn_norm: Vec<f32>,
    /// `[hidden]` RMSNorm of the feed-forward output before the residual add (Gemma's sandwich norm).
    pub post_ffn_norm: Option<Vec<f32>>,
    /// `[ffn][hidden]`.
    pub w_gate: Vec<f32>,
    /// `[ffn][hidden]`.
    pub w_up: Vec<f32>,
    /// `[hidden][ffn]`.
    pub w_down: Vec<f32>,
}

/// All weights of a model.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `[vocab][hidden]`.
    pub tok_embd: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub out_norm: Vec<f32>,
    /// `[vocab][hidden]`; `None` when the head is tied to `tok_embd`.
    pub output: Option<Vec<f32>>,
    /// `[head_dim / 2]` divisors of the RoPE frequencies (GGUF `rope_freqs.weight`, Llama 3 scaling).
    pub rope_freqs: Option<Vec<f32>>,
}

/// Borrowed attention weights of one layer, for analysis (norms and spectra of W_Q, W_K, W_V, W_O).
#[derive(Clone, Copy, Debug)]
pub struct LayerWeightsView<'a> {
    /// `[n_q_heads * head_dim][hidden]`.
    pub wq: &'a [f32],
    /// `[n_kv_heads * head_dim][hidden]`.
    pub wk: &'a [f32],
    /// `[n_kv_heads * head_dim][hidden]`.
    pub wv: &'a [f32],
    /// `[hidden][n_q_heads * head_dim]`.
    pub wo: &'a [f32],
    pub bq: Option<&'a [f32]>,
    pub bk: Option<&'a [f32]>,
    pub bv: Option<&'a [f32]>,
    pub hidden: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Which positions of a forward call get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsRange {
    /// Every token of the call.
    All,
    /// Only the last token (generation).
    #[default]
    Last,
    /// Tokens `i..` of the call (perplexity scores the second half of a window).
    From(usize),
    /// No logits (when only hooks matter); skips the output head.
    None,
}

/// What one layer computed for the tokens of a forward call, handed to a [`LayerHook`].
///
/// Layouts are token-major: `k_pre_rope`, `k` and `v` are `[n][n_kv_heads][head_dim]`, `q` and `attn_out`
/// are `[n][n_q_heads][head_dim]`. Channels follow the half-rotation (Hugging Face) order.
#[derive(Debug)]
pub struct LayerTaps<'a> {
    /// Absolute positions of the tokens (`start..start + n`).
    pub positions: Range<usize>,
    pub k_pre_rope: &'a [f32],
    /// Keys after RoPE, as appended to the cache.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Queries after RoPE.
    pub q: &'a [f32],
    /// Attention outputs (before the output projection).
    pub attn_out: &'a [f32],
}

/// Receives every layer's taps during a forward pass.
pub trait LayerHook {
    fn on_layer(&mut self, layer: usize, taps: &LayerTaps<'_>);
}

/// Options of [`Model::forward`].
#[derive(Default)]
pub struct ForwardOptions<'a> {
    pub logits: LogitsRange,
    pub hook: Option<&'a mut dyn LayerHook>,
}

impl<'a> ForwardOptions<'a> {
    /// Logits for `range`, no hook.
    pub fn new(logits: LogitsRange) -> Self {
        ForwardOptions { logits, hook: None }
    }

    /// Logits for `range`, with a hook.
    pub fn with_hook(logits: LogitsRange, hook: &'a mut dyn LayerHook) -> Self {
        ForwardOptions { logits, hook: Some(hook) }
    }
}

/// Output logits: `rows` rows of `vocab` values, the first for token `first_pos` of the forward call.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub vocab: usize,
    /// Index within the call's tokens of the first row.
    pub first_pos: usize,
    /// `[rows][vocab]`.
    pub data: Vec<f32>,
}

impl Logits {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// Row `i` (0-based within the rows held, i.e. token `first_pos + i` of the call).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The largest logit's token id of row `i`.
    pub fn argmax(&self, i: usize) -> u32 {
        let r = self.row(i);
        let mut best = 0;
        for (j, &v) in r.iter().enumerate() {
            if v > r[best] {
                best = j;
            }
        }
        best as u32
    }

    /// `-log softmax(row i)[target]`, in f64.
    pub fn nll(&self, i: usize, target: u32) -> f64 {
        let r = self.row(i);
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        lse - r[target as usize] as f64
    }
}

/// How the linear layers of a model compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsMode {
    /// Weights dequantized to f32 at load; products in f32 ([`crate::gemm`]). The reference.
    #[default]
    F32,
    /// Weights kept in their GGUF block formats; 8-bit block activations and integer dot products
    /// ([`crate::qgemm`]). Tensors without such a product (f16, f32, ...) and safetensors checkpoints stay f32.
    Packed,
}

impl WeightsMode {
    /// `f32` or `packed`.
    pub fn name(self) -> &'static str {
        match self {
            WeightsMode::F32 => "f32",
            WeightsMode::Packed => "packed",
        }
    }
}

/// 0: f32, 1: packed.
static DEFAULT_WEIGHTS: AtomicU8 = AtomicU8::new(0);

/// Sets the mode [`Model::load`] uses in this process (programs set it from their `--weights` flag).
pub fn set_default_weights_mode(mode: WeightsMode) {
    DEFAULT_WEIGHTS.store(mode as u8, Ordering::Relaxed);
}

/// The mode [`Model::load`] uses: [`WeightsMode::F32`] unless [`set_default_weights_mode`] said otherwise.
pub fn default_weights_mode() -> WeightsMode {
    if DEFAULT_WEIGHTS.load(Ordering::Relaxed) == 1 {
        WeightsMode::Packed
    } else {
        WeightsMode::F32
    }
}

/// Index of each linear layer of a decoder layer in [`PackedLinears::layers`].
#[derive(Clone, Copy)]
enum Lin {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

/// The linear layers held in block formats; `None` where a tensor stays f32.
#[derive(Clone, Debug, Default)]
struct PackedLinears {
    layers: Vec<[Option<PackedMatrix>; 7]>,
    tok_embd: Option<PackedMatrix>,
    output: Option<PackedMatrix>,
}

impl PackedLinears {
    fn bytes(&self) -> usize {
        let m = |p: &Option<PackedMatrix>| p.as_ref().map_or(0, PackedMatrix::bytes);
        self.layers.iter().flatten().map(m).sum::<usize>() + m(&self.tok_embd) + m(&self.output)
    }
}

/// A loaded model: configuration, weights and tokenizer.
pub struct Model {
    pub config: ModelConfig,
    weights: Weights,
    tokenizer: Tokenizer,
    /// RoPE inverse frequencies of the global layers (`theta^(-2i / head_dim)`, rescaled), in f64.
    inv_freq: Vec<f64>,
    /// RoPE inverse frequencies of the sliding-window layers (unscaled, base `rope_theta_local`).
    inv_freq_local: Vec<f64>,
    /// Linear layers kept in block formats ([`WeightsMode::Packed`]); their f32 copies in `weights` are empty.
    packed: Option<PackedLinears>,
    /// f32 attention weights of a packed model, dequantized on first use by [`Model::layer_weights`].
    attn_f32: OnceLock<Vec<[Vec<f32>; 4]>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Undoes the GGUF converter's Q/K row permutation within each head: GGUF row `2b + a` is Hugging Face row
/// `a * head_dim / 2 + b`. `w` holds `rows = n_heads * head_dim` rows of `cols` values.
pub fn unpermute_rope_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_heads {
        for b in 0..half {
            for a in 0..2 {
                let src = (h * head_dim + 2 * b + a) * cols;
                let dst = (h * head_dim + a * half + b) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// The inverse of [`unpermute_rope_rows`]: Hugging Face order to GGUF's adjacent-pair order.
pub fn permute_rope_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_heads {
        for b in 0..half {
            for a in 0..2 {
                let dst = (h * head_dim + 2 * b + a) * cols;
                let src = (h * head_dim + a * half + b) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn expect_len(name: &str, v: Vec<f32>, shape: &[usize], expected: &[usize]) -> Result<Vec<f32>> {
    if shape != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: shape.to_vec(),
        });
    }
    Ok(v)
}

/// The row order a permutation of whole rows produces: `unpermute_rope_rows` applied to row indices.
fn unpermuted_row_order(n_heads: usize, head_dim: usize) -> Vec<usize> {
    let idx: Vec<f32> = (0..n_heads * head_dim).map(|r| r as f32).collect();
    unpermute_rope_rows(&idx, n_heads, head_dim, 1).into_iter().map(|r| r as usize).collect()
}

impl Model {
    /// Loads a `.gguf` file, or a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`), with the
    /// weights mode of [`default_weights_mode`].
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with(path, default_weights_mode())
    }

    /// Loads a model with its linear layers computed as `mode` says (safetensors checkpoints are always f32).
    pub fn load_with(path: &Path, mode: WeightsMode) -> Result<Model> {
        if path.is_dir() {
            crate::hf::load_hf_dir(path)
        } else {
            let mut m = Self::load_gguf(path)?;
            if mode == WeightsMode::Packed {
                m.pack_from_gguf(&GgufFile::open(path)?)?;
            }
            Ok(m)
        }
    }

    /// Replaces the f32 copies of every linear layer that has an integer-dot product by its packed GGUF bytes.
    fn pack_from_gguf(&mut self, file: &GgufFile) -> Result<()> {
        let c = self.config.clone();
        let permuted = matches!(c.arch, Arch::Llama | Arch::Mistral);
        let pack = |name: &str, order: Option<&[usize]>| -> Result<Option<PackedMatrix>> {
            let Some(t) = file.header.tensor(name) else { return Ok(None) };
            let ty = file.header.tensor_type(t)?;
            if !PackedMatrix::supports(ty) || t.dims.len() != 2 {
                return Ok(None);
            }
            let (cols, rows) = (t.dims[0], t.dims[1]);
            let bytes = file.header.tensor_bytes(file.bytes(), t)?;
            let data = match order {
                None => bytes.to_vec(),
                Some(order) => {
                    let rb = bytes.len() / rows.max(1);
                    let mut v = Vec::with_capacity(bytes.len());
                    for &r in order {
                        v.extend_from_slice(&bytes[r * rb..(r + 1) * rb]);
                    }
                    v
                }
            };
            PackedMatrix::new(ty, rows, cols, data).map(Some)
        };
        let q_order = permuted.then(|| unpermuted_row_order(c.n_q_heads, c.head_dim));
        let k_order = permuted.then(|| unpermuted_row_order(c.n_kv_heads, c.head_dim));
        let layers = (0..c.n_layers)
            .into_par_iter()
            .map(|i| -> Result<[Option<PackedMatrix>; 7]> {
                let p = |s: &str| format!("blk.{i}.{s}");
                Ok([
                    pack(&p("attn_q.weight"), q_order.as_deref())?,
                    pack(&p("attn_k.weight"), k_order.as_deref())?,
                    pack(&p("attn_v.weight"), None)?,
                    pack(&p("attn_output.weight"), None)?,
                    pack(&p("ffn_gate.weight"), None)?,
                    pack(&p("ffn_up.weight"), None)?,
                    pack(&p("ffn_down.weight"), None)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let packed = PackedLinears {
            layers,
            tok_embd: pack("token_embd.weight", None)?,
            output: if self.weights.output.is_some() { pack("output.weight", None)? } else { None },
        };
        // Check every packed matrix against the f32 shapes the loader validated, then drop those copies.
        let (h, qd, kvd) = (c.hidden, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let shapes = [(qd, h), (kvd, h), (kvd, h), (h, qd), (c.ffn, h), (c.ffn, h), (h, c.ffn)];
        for (i, (pl, l)) in packed.layers.iter().zip(&mut self.weights.layers).enumerate() {
            let f32s = [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down];
            for ((pm, w), (rows, cols)) in pl.iter().zip(f32s).zip(shapes) {
                if let Some(pm) = pm {
                    if (pm.rows(), pm.cols()) != (rows, cols) {
                        return Err(ModelError::TensorShape {
                            name: format!("layer {i} packed weights"),
                            expected: vec![rows, cols],
                            got: vec![pm.rows(), pm.cols()],
                        });
                    }
                    *w = Vec::new();
                }
            }
        }
        let mut heads = vec![(&packed.tok_embd, &mut self.weights.tok_embd)];
        if let Some(o) = self.weights.output.as_mut() {
            heads.push((&packed.output, o));
        }
        for (pm, w) in heads {
            if let Some(pm) = pm {
                if (pm.rows(), pm.cols()) != (c.vocab, h) {
                    return Err(ModelError::TensorShape {
                        name: "packed embedding or output".into(),
                        expected: vec![c.vocab, h],
                        got: vec![pm.rows(), pm.cols()],
                    });
                }
                *w = Vec::new();
            }
        }
        self.packed = Some(packed);
        Ok(())
    }

    /// How the linear layers compute: [`WeightsMode::Packed`] when any layer reads block formats.
    pub fn weights_mode(&self) -> WeightsMode {
        if self.packed.is_some() {
            WeightsMode::Packed
        } else {
            WeightsMode::F32
        }
    }

    /// `out = x · Wᵀ` for linear layer `which` of decoder layer `li`, packed where the model holds it packed.
    fn linear(
        &self,
        li: usize,
        which: Lin,
        x: &[f32],
        n: usize,
        k: usize,
        w: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        match self.packed.as_ref().and_then(|p| p.layers[li][which as usize].as_ref()) {
            Some(pm) => qgemm::linear(x, n, pm, out),
            None => {
                matmul_t(x, n, k, w, m, out);
                Ok(())
            }
        }
    }

    /// Loads a GGUF file.
    pub fn load_gguf(path: &Path) -> Result<Model> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file.header)?;
        let tokenizer = Tokenizer::from_gguf(&file.header)?;
        // llama.cpp stores Q/K of the `llama` architecture permuted for adjacent-pair RoPE; qwen2, qwen3 and
        // gemma3 use NeoX (half) rotation and are stored unpermuted. llama.cpp's Gemma converter has already
        // folded Gemma's `1 + w` norm convention into the stored norm weights.
        let permuted = matches!(config.arch, Arch::Llama | Arch::Mistral);
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let (v, t) = file.dequantize(name)?;
            expect_len(name, v, &t.shape(), shape)
        };
        let c = &config;
        let (h, q, kv) = (c.hidden, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let layers = (0..c.n_layers)
            .into_par_iter()
            .map(|i| -> Result<LayerWeights> {
                let p = |s: &str| format!("blk.{i}.{s}");
                let mut wq = get(&p("attn_q.weight"), &[q, h])?;
                let mut wk = get(&p("attn_k.weight"), &[kv, h])?;
                let bias = |s: &str, n: usize| -> Result<Option<Vec<f32>>> {
                    if c.qkv_bias {
                        get(&p(s), &[n]).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                let mut bq = bias("attn_q.bias", q)?;
                let mut bk = bias("attn_k.bias", kv)?;
                let opt = |s: &str, n: usize, wanted: bool| -> Result<Option<Vec<f32>>> {
                    if wanted {
                        get(&p(s), &[n]).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                if permuted {
                    wq = unpermute_rope_rows(&wq, c.n_q_heads, c.head_dim, h);
                    wk = unpermute_rope_rows(&wk, c.n_kv_heads, c.head_dim, h);
                    bq = bq.map(|b| unpermute_rope_rows(&b, c.n_q_heads, c.head_dim, 1));
                    bk = bk.map(|b| unpermute_rope_rows(&b, c.n_kv_heads, c.head_dim, 1));
                }
                Ok(LayerWeights {
                    attn_norm: get(&p("attn_norm.weight"), &[h])?,
                    wq,
                    wk,
                    wv: get(&p("attn_v.weight"), &[kv, h])?,
                    wo: get(&p("attn_output.weight"), &[h, q])?,
                    bq,
                    bk,
                    bv: bias("attn_v.bias", kv)?,
                    q_norm: opt("attn_q_norm.weight", c.head_dim, c.qk_norm)?,
                    k_norm: opt("attn_k_norm.weight", c.head_dim, c.qk_norm)?,
                    post_attn_norm: opt("post_attention_norm.weight", h, c.post_norms)?,
                    ffn_norm: get(&p("ffn_norm.weight"), &[h])?,
                    post_ffn_norm: opt("post_ffw_norm.weight", h, c.post_norms)?,
                    w_gate: get(&p("ffn_gate.weight"), &[c.ffn, h])?,
                    w_up: get(&p("ffn_up.weight"), &[c.ffn, h])?,
                    w_down: get(&p("ffn_down.weight"), &[h, c.ffn])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = Weights {
            tok_embd: get("token_embd.weight", &[c.vocab, h])?,
            layers,
            out_norm: get("output_norm.weight", &[h])?,
            output: if c.tied_embeddings { None } else { Some(get("output.weight", &[c.vocab, h])?) },
            rope_freqs: match c.rope_scaling {
                RopeScaling::FreqFactors => Some(get("rope_freqs.weight", &[c.head_dim / 2])?),
                _ => None,
            },
        };
        Model::from_parts(config, weights, tokenizer)
    }

    /// A model from its parts; checks every weight's length against the configuration.
    pub fn from_parts(config: ModelConfig, weights: Weights, tokenizer: Tokenizer) -> Result<Model> {
        config.validate()?;
        let c = &config;
        let (h, q, kv) = (c.hidden, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let check = |name: String, got: usize, want: usize| -> Result<()> {
            if got == want {
                Ok(())
            } else {
                Err(ModelError::TensorShape { name, expected: vec![want], got: vec![got] })
            }
        };
        if weights.layers.len() != c.n_layers {
            return Err(ModelError::InvalidConfig(format!(
                "{} layers of weights for a {}-layer configuration",
                weights.layers.len(),
                c.n_layers
            )));
        }
        check("tok_embd".into(), weights.tok_embd.len(), c.vocab * h)?;
        check("out_norm".into(), weights.out_norm.len(), h)?;
        if let Some(o) = &weights.output {
            check("output".into(), o.len(), c.vocab * h)?;
        }
        for (i, l) in weights.layers.iter().enumerate() {
            let n = |s: &str| format!("layer {i} {s}");
            check(n("attn_norm"), l.attn_norm.len(), h)?;
            check(n("wq"), l.wq.len(), q * h)?;
            check(n("wk"), l.wk.len(), kv * h)?;
            check(n("wv"), l.wv.len(), kv * h)?;
            check(n("wo"), l.wo.len(), h * q)?;
            for (s, b, want) in [("bq", &l.bq, q), ("bk", &l.bk, kv), ("bv", &l.bv, kv)] {
                match b {
                    Some(b) => check(n(s), b.len(), want)?,
                    None if c.qkv_bias => return Err(ModelError::MissingTensor(n(s))),
                    None => {}
                }
            }
            for (s, w, want, needed) in [
                ("q_norm", &l.q_norm, c.head_dim, c.qk_norm),
                ("k_norm", &l.k_norm, c.head_dim, c.qk_norm),
                ("post_attn_norm", &l.post_attn_norm, h, c.post_norms),
                ("post_ffn_norm", &l.post_ffn_norm, h, c.post_norms),
            ] {
                match w {
                    Some(w) if needed => check(n(s), w.len(), want)?,
                    Some(_) => {
                        return Err(ModelError::InvalidConfig(format!(
                            "layer {i} has {s} weights but the configuration does not use them"
                        )))
                    }
                    None if needed => return Err(ModelError::MissingTensor(n(s))),
                    None => {}
                }
            }
            check(n("ffn_norm"), l.ffn_norm.len(), h)?;
            check(n("w_gate"), l.w_gate.len(), c.ffn * h)?;
            check(n("w_up"), l.w_up.len(), c.ffn * h)?;
            check(n("w_down"), l.w_down.len(), h * c.ffn)?;
        }
        let half = c.head_dim / 2;
        let factors = match (&c.rope_scaling, &weights.rope_freqs) {
            (RopeScaling::FreqFactors, Some(f)) => {
                check("rope_freqs".into(), f.len(), half)?;
                if let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                    return Err(ModelError::InvalidConfig(format!(
                        "rope_freqs holds {bad}; divisors must be positive"
                    )));
                }
                Some(f.as_slice())
            }
            (RopeScaling::FreqFactors, None) => return Err(ModelError::MissingTensor("rope_freqs.weight".into())),
            (_, Some(_)) => {
                return Err(ModelError::InvalidConfig(
                    "rope_freqs weights given but the configuration's RoPE scaling does not use them".into(),
                ))
            }
            (_, None) => None,
        };
        let inv_freq = c.rope_scaling.inv_freq(c.rope_theta as f64, c.head_dim, factors);
        let inv_freq_local = RopeScaling::None.inv_freq(c.rope_theta_local as f64, c.head_dim, None);
        Ok(Model { config, weights, tokenizer, inv_freq, inv_freq_local, packed: None, attn_f32: OnceLock::new() })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// All weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Bytes the weights occupy in memory.
    pub fn resident_weight_bytes(&self) -> usize {
        let w = &self.weights;
        let mut n = w.tok_embd.len()
            + w.out_norm.len()
            + w.output.as_ref().map_or(0, Vec::len)
            + w.rope_freqs.as_ref().map_or(0, Vec::len);
        for l in &w.layers {
            n += [&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w_gate, &l.w_up, &l.w_down]
                .iter()
                .map(|v| v.len())
                .sum::<usize>();
            n += [&l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm, &l.post_attn_norm, &l.post_ffn_norm]
                .iter()
                .map(|b| b.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        }
        n * std::mem::size_of::<f32>() + self.packed.as_ref().map_or(0, PackedLinears::bytes)
    }

    /// The cache shape of this model for contexts of up to `max_seq_len` tokens.
    pub fn cache_shape(&self, max_seq_len: usize) -> CacheShape {
        self.config.cache_shape(max_seq_len)
    }

    /// The RoPE inverse frequencies of `layer` (f64, `head_dim / 2` of them).
    pub fn rope_inv_freq(&self, layer: usize) -> &[f64] {
        if self.config.is_local(layer) {
            &self.inv_freq_local
        } else {
            &self.inv_freq
        }
    }

    /// Attention weights of `layer` (see [`LayerWeightsView`]); panics if `layer >= n_layers`.
    pub fn layer_weights(&self, layer: usize) -> LayerWeightsView<'_> {
        let l = &self.weights.layers[layer];
        let c = &self.config;
        let [wq, wk, wv, wo]: [&[f32]; 4] = match &self.packed {
            None => [&l.wq, &l.wk, &l.wv, &l.wo],
            Some(p) => {
                let all = self.attn_f32.get_or_init(|| {
                    p.layers
                        .iter()
                        .zip(&self.weights.layers)
                        .map(|(pl, l)| {
                            let f =
                                |i: usize, w: &Vec<f32>| pl[i].as_ref().map_or_else(|| w.clone(), |m| m.dequantize());
                            [f(0, &l.wq), f(1, &l.wk), f(2, &l.wv), f(3, &l.wo)]
                        })
                        .collect()
                });
                let a = &all[layer];
                [&a[0], &a[1], &a[2], &a[3]]
            }
        };
        LayerWeightsView {
            wq,
            wk,
            wv,
            wo,
            bq: l.bq.as_deref(),
            bk: l.bk.as_deref(),
            bv: l.bv.as_deref(),
            hidden: c.hidden,
            n_q_heads: c.n_q_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// Rotates each `head_dim`-long head of `x` (`[n][heads][head_dim]`) by its token's position, halves convention.
    fn rope(&self, x: &mut [f32], heads: usize, cos_sin: &[(f32, f32)]) {
        let d = self.config.head_dim;
        let half = d / 2;
        x.par_chunks_mut(heads * d).enumerate().with_min_len(8).for_each(|(i, tok)| {
            let cs = &cos_sin[i * half..(i + 1) * half];
            for head in tok.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for ((x1, x2), &(c, s)) in a.iter_mut().zip(b.iter_mut()).zip(cs) {
                    let (u, v) = (*x1, *x2);
                    *x1 = u * c - v * s;
                    *x2 = v * c + u * s;
                }
            }
        });
    }

    /// Runs `tokens` through the model, appending their keys and values to `cache` (which must be at the same
    /// length in every layer) and returning the logits `opts.logits` asks for.
    pub fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache, opts: &mut ForwardOptions<'_>) -> Result<Logits> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::InvalidInput("forward needs at least one token".into()));
        }
        if let Some((pos, &id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= c.vocab) {
            return Err(ModelError::TokenOutOfRange { id, pos, vocab: c.vocab });
        }
        let shape = cache.shape();
        if shape.n_layers != c.n_layers
            || shape.n_q_heads != c.n_q_heads
            || shape.n_kv_heads != c.n_kv_heads
            || shape.head_dim != c.head_dim
            || shape.softmax_scale != c.attn_scale
            || (0..c.n_layers).any(|l| shape.window(l) != c.layer_window(l))
        {
            return Err(ModelError::InvalidInput(format!(
                "cache shape {shape:?} does not match the model; build it with Model::cache_shape"
            )));
        }
        let start = cache.seq_len(0);
        if let Some(l) = (1..c.n_layers).find(|&l| cache.seq_len(l) != start) {
            return Err(ModelError::InvalidInput(format!(
                "cache layers disagree on length (layer 0 holds {start} tokens, layer {l} holds {})",
                cache.seq_len(l)
            )));
        }
        if start + n > shape.max_seq_len {
            return Err(ModelError::InvalidInput(format!(
                "{n} tokens after {start} cached ones exceed the cache's maximum of {}",
                shape.max_seq_len
            )));
        }
        let rows = match opts.logits {
            LogitsRange::All => 0..n,
            LogitsRange::Last => n - 1..n,
            LogitsRange::From(i) if i < n => i..n,
            LogitsRange::From(i) => {
                return Err(ModelError::InvalidInput(format!("logits from token {i} of a {n}-token call")))
            }
            LogitsRange::None => n..n,
        };

        let (h, qd, kvd) = (c.hidden, c.n_q_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let half = c.head_dim / 2;
        let table = |inv_freq: &[f64]| {
            let mut cos_sin = Vec::with_capacity(n * half);
            for i in 0..n {
                let p = (start + i) as f64;
                cos_sin.extend(inv_freq.iter().map(|f| {
                    let (s, co) = (p * f).sin_cos();
                    (co as f32, s as f32)
                }));
            }
            cos_sin
        };
        let cos_sin_global = table(&self.inv_freq);
        let cos_sin_local = if c.local_layers.iter().any(|&l| l) { table(&self.inv_freq_local) } else { Vec::new() };

        let mut x = vec![0.0f32; n * h];
        let packed_embd = self.packed.as_ref().and_then(|p| p.tok_embd.as_ref());
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            match packed_embd {
                Some(pm) => row.copy_from_slice(&pm.dequantize_row(t as usize)),
                None => row.copy_from_slice(&self.weights.tok_embd[t as usize * h..(t as usize + 1) * h]),
            }
            if c.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
        let mut xn = vec![0.0f32; n * h];
        let mut q = vec![0.0f32; n * qd];
        let mut k = vec![0.0f32; n * kvd];
        let mut v = vec![0.0f32; n * kvd];
        let mut k_pre = Vec::new();
        let mut attn = vec![0.0f32; n * qd];
        let mut proj = vec![0.0f32; n * h];
        let mut gate = vec![0.0f32; n * c.ffn];
        let mut up = vec![0.0f32; n * c.ffn];
        let mut tmp = Vec::new();

        for (li, l) in self.weights.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.rms_eps, &mut xn);
            self.linear(li, Lin::Q, &xn, n, h, &l.wq, qd, &mut q)?;
            self.linear(li, Lin::K, &xn, n, h, &l.wk, kvd, &mut k)?;
            self.linear(li, Lin::V, &xn, n, h, &l.wv, kvd, &mut v)?;
            for (buf, b, width) in [(&mut q, &l.bq, qd), (&mut k, &l.bk, kvd), (&mut v, &l.bv, kvd)] {
                if let Some(b) = b {
                    for row in buf.chunks_exact_mut(width) {
                        row.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
                    }
                }
            }
            // QK-norm: every head of every token on its own, before RoPE.
            for (buf, w) in [(&mut q, &l.q_norm), (&mut k, &l.k_norm)] {
                if let Some(w) = w {
                    tmp.clone_from(buf);
                    rms_norm(&tmp, w, c.rms_eps, buf);
                }
            }
            if opts.hook.is_some() {
                k_pre.clone_from(&k);
            }
            let cos_sin = if c.is_local(li) { &cos_sin_local } else { &cos_sin_global };
            self.rope(&mut q, c.n_q_heads, cos_sin);
            self.rope(&mut k, c.n_kv_heads, cos_sin);
            cache.append_attend(li, &q, &k, &v, &mut attn)?;
            if let Some(hook) = opts.hook.as_deref_mut() {
                let taps =
                    LayerTaps { positions: start..start + n, k_pre_rope: &k_pre, k: &k, v: &v, q: &q, attn_out: &attn };
                hook.on_layer(li, &taps);
            }
            self.linear(li, Lin::O, &attn, n, qd, &l.wo, h, &mut proj)?;
            if let Some(w) = &l.post_attn_norm {
                tmp.clone_from(&proj);
                rms_norm(&tmp, w, c.rms_eps, &mut proj);
            }
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

            rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut xn);
            self.linear(li, Lin::Gate, &xn, n, h, &l.w_gate, c.ffn, &mut gate)?;
            self.linear(li, Lin::Up, &xn, n, h, &l.w_up, c.ffn, &mut up)?;
            match c.activation {
                Activation::Silu => swiglu(&mut gate, &up),
                Activation::GeluTanh => gelu_tanh_glu(&mut gate, &up),
            }
            self.linear(li, Lin::Down, &gate, n, c.ffn, &l.w_down, h, &mut proj)?;
            if let Some(w) = &l.post_ffn_norm {
                tmp.clone_from(&proj);
                rms_norm(&tmp, w, c.rms_eps, &mut proj);
            }
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }

        let nr = rows.len();
        let mut data = vec![0.0f32; nr * c.vocab];
        if nr > 0 {
            let xr = &x[rows.start * h..rows.end * h];
            let mut xo = vec![0.0f32; nr * h];
            rms_norm(xr, &self.weights.out_norm, c.rms_eps, &mut xo);
            let packed_head = self.packed.as_ref().and_then(|p| {
                if self.weights.output.is_some() {
                    p.output.as_ref()
                } else {
                    p.tok_embd.as_ref()
                }
            });
            match packed_head {
                Some(pm) => qgemm::linear(&xo, nr, pm, &mut data)?,
                None => {
                    let head = self.weights.output.as_deref().unwrap_or(&self.weights.tok_embd);
                    matmul_t(&xo, nr, h, head, c.vocab, &mut data);
                }
            }
        }
        Ok(Logits { vocab: c.vocab, first_pos: rows.start, data })
    }
}
