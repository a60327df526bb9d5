//! The KV cache the model's attention runs through, and the policies that choose each layer's precision.
//!
//! Every cache implements [`KvCache`]: the forward pass appends a layer's new keys and values and asks for the
//! attention outputs of the new queries in one call, so a cache can serve prefill (many tokens) and decoding
//! (one token) with identical, decode-faithful semantics. Implementations: [`FullPrecisionCache`] (f32 or f16) and
//! [`QuantizedCache`] (per-layer key and value precision, exact sinks and recent window, packed history). A
//! [`CacheSpec`] (JSON, or a short name such as `k4v2`) builds any of them; [`alloc`] chooses per-layer widths and
//! group sizes from a budget; [`kvq`] reads the authors' config shape. See `docs/CACHE.md`.
//!
//! ```
//! use adaquant_cache::{BitBudget, CacheShape, CacheSpec, KvCache, QuantCacheConfig, Sensitivities};
//!
//! let shape = CacheShape::new(2, 4, 2, 64, 1024);
//! let mut cache = "k4v2-r16".parse::<CacheSpec>()?.build(shape.clone())?;
//! let n = 20;
//! let q: Vec<f32> = (0..n * shape.q_row()).map(|i| (i as f32 * 0.37).sin()).collect();
//! let k: Vec<f32> = (0..n * shape.kv_row()).map(|i| (i as f32 * 0.11).cos()).collect();
//! let v: Vec<f32> = (0..n * shape.kv_row()).map(|i| (i as f32 * 0.23).sin()).collect();
//! let mut out = vec![0.0; q.len()];
//! cache.append_attend(0, &q, &k, &v, &mut out)?;
//! assert_eq!(cache.seq_len(0), n);
//! // 4 tokens left the 16-token window and are held in 4 + 2 bits plus f16 metadata.
//! let m = cache.memory();
//! assert_eq!(m.layers[0].k_code_bytes, 2 * 4 * 64 / 2);
//!
//! // Keys with larger norms get more bits under an average budget of 3 bits.
//! let sens = Sensitivities::new(vec![40.0, 35.0], vec![10.0, 12.0])?;
//! let alloc = BitBudget::new(3.0).solve(&sens)?;
//! assert!(alloc.k[0] > alloc.v[0]);
//! let _config: QuantCacheConfig = QuantCacheConfig::split(2, alloc.k[0], alloc.v[0]);
//! # Ok::<(), adaquant_cache::CacheError>(())
//! ```

pub mod alloc;
pub mod config;
pub mod error;
pub mod full;
pub mod kvq;
pub mod quant;
pub mod quantizer;

pub use alloc::{BitAllocation, BitBudget, BitPolicy, GroupBudget, Sensitivities, Solver};
pub use config::{CacheSpec, LayerPrecision, Precision, QuantCacheConfig};
pub use error::{CacheError, Result};
pub use full::{FullDtype, FullPrecisionCache};
pub use kvq::KvqConfig;
pub use quant::{expected_memory, Kv, QuantizedCache};
pub use quantizer::Quantizer;

use serde::{Deserialize, Serialize};

/// Model-side dimensions every cache needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheShape {
    pub n_layers: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Largest number of tokens the cache accepts; appending past it is [`CacheError::Full`].
    pub max_seq_len: usize,
    /// Multiplier of q.k before the softmax, usually 1/sqrt(head_dim).
    pub softmax_scale: f32,
    /// Per layer, `Some(w)` for a sliding-window layer whose queries see only the last `w` tokens (themselves
    /// included); empty when no layer slides (Gemma 3's local layers slide over 512 tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Option<usize>>,
}

impl CacheShape {
    /// A shape with the usual 1/sqrt(head_dim) softmax scale.
    pub fn new(n_layers: usize, n_q_heads: usize, n_kv_heads: usize, head_dim: usize, max_seq_len: usize) -> Self {
        CacheShape {
            n_layers,
            n_q_heads,
            n_kv_heads,
            head_dim,
            max_seq_len,
            softmax_scale: 1.0 / (head_dim as f32).sqrt(),
            windows: Vec::new(),
        }
    }

    /// The sliding window of `layer` (`None`: the layer attends to every cached token).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }

    /// The first position that the query at position `pos` of `layer` attends to.
    pub fn window_start(&self, layer: usize, pos: usize) -> usize {
        self.window(layer).map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Checks the shape itself (GQA ratio, non-zero sizes).
    pub fn validate(&self) -> Result<()> {
        if self.n_layers == 0 || self.n_q_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return Err(CacheError::InvalidConfig(format!("cache shape has a zero dimension: {self:?}")));
        }
        if !self.n_q_heads.is_multiple_of(self.n_kv_heads) {
            return Err(CacheError::InvalidConfig(format!(
                "n_q_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        if !self.windows.is_empty() && self.windows.len() != self.n_layers {
            return Err(CacheError::InvalidConfig(format!(
                "{} sliding windows for {} layers",
                self.windows.len(),
                self.n_layers
            )));
        }
        if self.windows.contains(&Some(0)) {
            return Err(CacheError::InvalidConfig("a sliding window of 0 tokens".into()));
        }
        Ok(())
    }

    /// Elements of one token's K (or V) in one layer.
    pub fn kv_row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Elements of one token's queries (or attention output) in one layer.
    pub fn q_row(&self) -> usize {
        self.n_q_heads * self.head_dim
    }
}

/// Bytes held by one layer, split by what they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerMemory {
    /// Packed key codes.
    pub k_code_bytes: usize,
    /// Key scales and minimums.
    pub k_meta_bytes: usize,
    /// Full-precision keys (residual window, sinks, or everything for an unquantized layer).
    pub k_full_bytes: usize,
    pub v_code_bytes: usize,
    pub v_meta_bytes: usize,
    pub v_full_bytes: usize,
    /// Tokens held by this layer (a sliding-window layer frees its oldest ones; where keys and values free
    /// different amounts, the larger count).
    pub tokens: usize,
}

impl LayerMemory {
    pub fn k_bytes(&self) -> usize {
        self.k_code_bytes + self.k_meta_bytes + self.k_full_bytes
    }
    pub fn v_bytes(&self) -> usize {
        self.v_code_bytes + self.v_meta_bytes + self.v_full_bytes
    }
    pub fn total(&self) -> usize {
        self.k_bytes() + self.v_bytes()
    }
}

/// What a cache holds, per layer and in total.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub layers: Vec<LayerMemory>,
    /// Elements of K and V held (tokens x kv_heads x head_dim, keys and values each, summed over layers).
    pub elements: usize,
}

impl MemoryReport {
    /// Total bytes held.
    pub fn total_bytes(&self) -> usize {
        self.layers.iter().map(LayerMemory::total).sum()
    }

    /// Bits per stored K/V element, metadata and full-precision tail included.
    pub fn bits_per_element(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            8.0 * self.total_bytes() as f64 / self.elements as f64
        }
    }
}

/// A per-layer key/value store that the forward pass attends through.
pub trait KvCache: Send {
    /// The dimensions this cache was built for.
    fn shape(&self) -> &CacheShape;

    /// Tokens currently held by `layer`.
    fn seq_len(&self, layer: usize) -> usize;

    /// Appends `n` new tokens to `layer` and writes the attention outputs of their `n` queries.
    ///
    /// Layouts are token-major: `q` and `out` are `[n][n_q_heads][head_dim]`, `k` and `v` are
    /// `[n][n_kv_heads][head_dim]` (keys after RoPE). Query `i` sits at position `p = seq_len_before + i` and attends
    /// causally to positions `0..=p`, each seen exactly as step-by-step decoding would have seen it when `p` was the
    /// newest token (decode-faithful): calling this once with `n` tokens or `n` times with one token gives the same
    /// outputs and the same cache contents.
    fn append_attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()>;

    /// Bytes held, per layer and in total.
    fn memory(&self) -> MemoryReport;

    /// Drops every token, keeping the configuration (and, where possible, the allocations).
    fn clear(&mut self);

    /// A short human-readable name of the configuration (e.g. `f32`, `K4V2 g64 r128`).
    fn describe(&self) -> String;

    /// An independent copy of this cache and everything it holds, where the cache supports it (benchmarks measure
    /// several runs from one filled state this way); `None` otherwise.
    fn snapshot(&self) -> Option<Box<dyn KvCache>> {
        None
    }
}

/// Checks the keys and values of an append (layer in range, whole tokens, equal lengths, finite) and returns the
/// number of new tokens.
pub fn check_kv_args(shape: &CacheShape, layer: usize, k: &[f32], v: &[f32]) -> Result<usize> {
    if layer >= shape.n_layers {
        return Err(CacheError::InvalidConfig(format!(
            "layer {layer} out of range (cache has {} layers)",
            shape.n_layers
        )));
    }
    let kv = shape.kv_row();
    if !k.len().is_multiple_of(kv) {
        return Err(CacheError::Shape { what: "k", expected: kv, got: k.len() });
    }
    if v.len() != k.len() {
        return Err(CacheError::Shape { what: "v", expected: k.len(), got: v.len() });
    }
    for (what, buf) in [("k", k), ("v", v)] {
        if let Some(i) = buf.iter().position(|x| !x.is_finite()) {
            return Err(CacheError::NonFinite { what, layer, index: i });
        }
    }
    Ok(k.len() / kv)
}

/// Checks the lengths of an `append_attend` call and returns the number of new tokens.
pub fn check_append_args(
    shape: &CacheShape,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
) -> Result<usize> {
    if layer >= shape.n_layers {
        return Err(CacheError::InvalidConfig(format!(
            "layer {layer} out of range (cache has {} layers)",
            shape.n_layers
        )));
    }
    let kv = shape.kv_row();
    if !k.len().is_multiple_of(kv) {
        return Err(CacheError::Shape { what: "k", expected: kv, got: k.len() });
    }
    let n = k.len() / kv;
    for (what, buf, row) in [("v", v, kv), ("q", q, shape.q_row()), ("out", out, shape.q_row())] {
        if buf.len() != n * row {
            return Err(CacheError::Shape { what, expected: n * row, got: buf.len() });
        }
    }
    for (what, buf) in [("k", k), ("v", v), ("q", q)] {
        if let Some(i) = buf.iter().position(|x| !x.is_finite()) {
            return Err(CacheError::NonFinite { what, layer, index: i });
        }
    }
    Ok(n)
}
