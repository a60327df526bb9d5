//! The per-layer studies: weights (W_Q, W_K, W_V, W_O), activations (K and V caches) and quantization sensitivity.
//!
//! These functions take plain slices, so they run on synthetic data in tests and on whatever the model captured in
//! [`crate::run`]. Layouts follow the model crate: weights are row-major `[out][in]` (W_K has `n_kv_heads *
//! head_dim` rows, KV head `h` owning rows `h * head_dim .. (h + 1) * head_dim`); activations are token-major
//! (`[tokens][heads][head_dim]`).

use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{AnalysisError, Result};
use crate::linalg::{channel_stats, frobenius, mat_stats, ChannelStats, MatStats, View};

/// Model dimensions the studies need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    pub n_layers: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Width of the residual stream (columns of W_Q, W_K, W_V; rows of W_O).
    pub hidden: usize,
}

impl Dims {
    /// Checks that the sizes are non-zero and the grouped-query ratio is whole.
    pub fn validate(&self) -> Result<()> {
        if self.n_layers == 0 || self.n_q_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 || self.hidden == 0 {
            return Err(AnalysisError::InvalidArgument(format!("model dimensions have a zero entry: {self:?}")));
        }
        if !self.n_q_heads.is_multiple_of(self.n_kv_heads) {
            return Err(AnalysisError::InvalidArgument(format!(
                "n_q_heads ({}) is not a multiple of n_kv_heads ({})",
                self.n_q_heads, self.n_kv_heads
            )));
        }
        Ok(())
    }

    /// Width of one token's keys (or values): `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of one token's queries: `n_q_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_q_heads * self.head_dim
    }
}

/// Norms without the spectrum (for W_Q and W_O, reported for context).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Norms {
    pub fro: f64,
    pub spec: f64,
}

impl From<&MatStats> for Norms {
    fn from(s: &MatStats) -> Norms {
        Norms { fro: s.fro, spec: s.spec }
    }
}

/// Statistics of a whole matrix and of each KV head's slice of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadedStats {
    /// The whole matrix: `fro`, `spec`, `singular_values`, ...
    #[serde(flatten)]
    pub whole: MatStats,
    /// Which KV heads `heads` describes (all by default; `--heads` keeps a subset).
    pub head_ids: Vec<usize>,
    /// One entry per reported KV head.
    pub heads: Vec<MatStats>,
    /// Frobenius norm per head (the same numbers as in `heads`, as a flat array).
    pub head_fro: Vec<f64>,
    /// Spectral norm per head.
    pub head_spec: Vec<f64>,
}

impl HeadedStats {
    fn new(whole: MatStats, heads: Vec<MatStats>) -> HeadedStats {
        HeadedStats {
            head_ids: (0..heads.len()).collect(),
            head_fro: heads.iter().map(|h| h.fro).collect(),
            head_spec: heads.iter().map(|h| h.spec).collect(),
            whole,
            heads,
        }
    }
}

impl HeadedStats {
    /// Keeps only the heads in `ids` (in the order of `ids`; unknown ids are skipped).
    pub fn keep_heads(&mut self, ids: &[usize]) {
        let pick: Vec<usize> = ids.iter().filter_map(|id| self.head_ids.iter().position(|h| h == id)).collect();
        let heads: Vec<MatStats> = pick.iter().map(|&i| self.heads[i].clone()).collect();
        let head_ids = pick.iter().map(|&i| self.head_ids[i]).collect();
        *self = HeadedStats { head_ids, ..HeadedStats::new(self.whole.clone(), heads) };
    }
}

/// One layer's weight matrices, row-major `[out][in]`.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    pub wq: &'a [f32],
    pub wk: &'a [f32],
    pub wv: &'a [f32],
    pub wo: &'a [f32],
}

/// The weight study of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightLayer {
    pub w_q: Norms,
    pub w_o: Norms,
    pub w_k: HeadedStats,
    pub w_v: HeadedStats,
}

/// Statistics of a `[rows][cols]` weight and of each KV head's block of `head_dim` rows.
pub fn weight_stats(w: &[f32], rows: usize, cols: usize, head_dim: usize, what: &str) -> Result<HeadedStats> {
    let m = View::new(w, rows, cols);
    let whole = mat_stats(m, what)?;
    if head_dim == 0 || !rows.is_multiple_of(head_dim) {
        return Err(AnalysisError::InvalidArgument(format!(
            "`{what}` has {rows} rows, not a whole number of heads of {head_dim}"
        )));
    }
    let heads = (0..rows / head_dim)
        .into_par_iter()
        .map(|h| mat_stats(m.row_range(h * head_dim, head_dim), &format!("{what} head {h}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(HeadedStats::new(whole, heads))
}

/// Norms and spectra of one layer's projections.
pub fn weight_layer(layer: usize, w: &LayerWeights<'_>, dims: &Dims) -> Result<WeightLayer> {
    let (q, kv, d) = (dims.q_dim(), dims.kv_dim(), dims.hidden);
    let name = |m: &str| format!("layer {layer} {m}");
    let (w_k, w_v) = rayon::join(
        || weight_stats(w.wk, kv, d, dims.head_dim, &name("W_K")),
        || weight_stats(w.wv, kv, d, dims.head_dim, &name("W_V")),
    );
    let (w_q, w_o) = rayon::join(
        || mat_stats(View::new(w.wq, q, d), &name("W_Q")),
        || mat_stats(View::new(w.wo, d, q), &name("W_O")),
    );
    Ok(WeightLayer { w_q: Norms::from(&w_q?), w_o: Norms::from(&w_o?), w_k: w_k?, w_v: w_v? })
}

/// Statistics of a token-major `[tokens][heads][head_dim]` activation, whole and per head.
pub fn activation_stats(x: &[f32], tokens: usize, heads: usize, head_dim: usize, what: &str) -> Result<HeadedStats> {
    let width = heads * head_dim;
    let whole = mat_stats(View::new(x, tokens, width), what)?;
    let per_head = (0..heads)
        .into_par_iter()
        .map(|h| mat_stats(View::columns(x, tokens, width, h * head_dim, head_dim), &format!("{what} head {h}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(HeadedStats::new(whole, per_head))
}

/// Per-head, per-channel magnitudes of a token-major activation.
pub fn activation_channels(x: &[f32], tokens: usize, heads: usize, head_dim: usize) -> Vec<ChannelStats> {
    let width = heads * head_dim;
    (0..heads).map(|h| channel_stats(View::columns(x, tokens, width, h * head_dim, head_dim))).collect()
}

/// Copies KV head `h` of a token-major `[tokens][heads][head_dim]` buffer into a dense `[tokens][head_dim]` one.
pub fn head_slice(x: &[f32], tokens: usize, heads: usize, head_dim: usize, h: usize) -> Vec<f32> {
    let width = heads * head_dim;
    (0..tokens).flat_map(|t| x[t * width + h * head_dim..][..head_dim].iter().copied()).collect()
}

/// A fake-quantizer: quantizes one head's dense `[tokens][head_dim]` values at a width and returns the
/// reconstruction. [`crate::run`] plugs in the kernels' group quantizer.
pub trait Quantizer: Sync {
    fn round_trip(&self, x: &[f32], tokens: usize, head_dim: usize, bits: Bits) -> Result<Vec<f32>>;
}

impl<F> Quantizer for F
where
    F: Fn(&[f32], usize, usize, Bits) -> Result<Vec<f32>> + Sync,
{
    fn round_trip(&self, x: &[f32], tokens: usize, head_dim: usize, bits: Bits) -> Result<Vec<f32>> {
        self(x, tokens, head_dim, bits)
    }
}

/// The kernels' group quantizer: asymmetric min-max over per-token groups of `group` channels, f16 metadata
/// (`adaquant_kernels::quant::quantize` then `dequantize`), the default precision recipe of the cache.
#[derive(Clone, Copy, Debug)]
pub struct GroupQuantizer {
    pub group: usize,
}

impl Quantizer for GroupQuantizer {
    fn round_trip(&self, x: &[f32], _tokens: usize, head_dim: usize, bits: Bits) -> Result<Vec<f32>> {
        let spec = QuantSpec::new(bits, self.group, GroupAxis::PerToken);
        let q = |e: adaquant_kernels::Error| AnalysisError::Quant(e.to_string());
        let stream = adaquant_kernels::quant::quantize(&spec, head_dim, x).map_err(q)?;
        let mut out = vec![0.0f32; x.len()];
        adaquant_kernels::quant::dequantize(&stream.view(), &mut out).map_err(q)?;
        Ok(out)
    }
}

/// Quantizes every head of a token-major activation at `bits` and returns the reconstruction in the same layout.
pub fn quantize_heads<Q: Quantizer + ?Sized>(
    q: &Q,
    x: &[f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    bits: Bits,
) -> Result<Vec<f32>> {
    let width = heads * head_dim;
    let mut out = vec![0.0f32; tokens * width];
    for h in 0..heads {
        let dense = head_slice(x, tokens, heads, head_dim, h);
        let rec = q.round_trip(&dense, tokens, head_dim, bits)?;
        if rec.len() != dense.len() {
            return Err(AnalysisError::Quant(format!(
                "the quantizer returned {} values for {} inputs",
                rec.len(),
                dense.len()
            )));
        }
        for t in 0..tokens {
            out[t * width + h * head_dim..][..head_dim].copy_from_slice(&rec[t * head_dim..][..head_dim]);
        }
    }
    Ok(out)
}

/// ||a - b||_F / ||a||_F (0 when both are zero).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    if a.is_empty() {
        return 0.0;
    }
    let diff: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| x as f64 - y as f64).collect();
    let num = frobenius(View::new(&diff, 1, diff.len().max(1)));
    let den = frobenius(View::new(a, 1, a.len().max(1)));
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        num / den
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorize it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Softmax weights of one query over keys `0..=p` of KV head `kh`, written into `w` (length `p + 1`).
fn softmax_weights(qv: &[f32], k: &[f32], kh: usize, nkv: usize, hd: usize, scale: f32, w: &mut [f32]) {
    let mut mx = f32::NEG_INFINITY;
    for (s, sc) in w.iter_mut().enumerate() {
        *sc = dot(qv, &k[(s * nkv + kh) * hd..][..hd]) * scale;
        mx = mx.max(*sc);
    }
    let mut sum = 0.0f32;
    for sc in w.iter_mut() {
        *sc = (*sc - mx).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    w.iter_mut().for_each(|x| *x *= inv);
}

/// `out = sum_s w[s] * v[s]` over the value rows of KV head `kh`.
fn weighted_values(w: &[f32], v: &[f32], kh: usize, nkv: usize, hd: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (s, &ws) in w.iter().enumerate() {
        for (a, b) in out.iter_mut().zip(&v[(s * nkv + kh) * hd..][..hd]) {
            *a += ws * b;
        }
    }
}

/// Causal grouped-query attention outputs of selected query positions.
///
/// `q` is `[tokens][n_q_heads][head_dim]`, `k` and `v` `[tokens][n_kv_heads][head_dim]` (keys after RoPE); query
/// position `p` attends to positions `0..=p`, or with a sliding `window` to the last `window` of them (Gemma 3's
/// local layers). Returns `[positions.len()][n_q_heads][head_dim]`. Queries are processed in parallel;
/// [`attention_ref`] is the serial reference.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[usize],
    window: Option<usize>,
    dims: &Dims,
    scale: f32,
) -> Vec<f32> {
    let (nq, nkv, hd) = (dims.n_q_heads, dims.n_kv_heads, dims.head_dim);
    let per_kv = nq / nkv;
    let mut out = vec![0.0f32; positions.len() * nq * hd];
    out.par_chunks_mut(nq * hd).zip(positions).for_each(|(o, &p)| {
        let lo = window_start(p, window);
        let (k, v) = (&k[lo * nkv * hd..], &v[lo * nkv * hd..]);
        let mut w = vec![0.0f32; p + 1 - lo];
        for h in 0..nq {
            let kh = h / per_kv;
            softmax_weights(&q[(p * nq + h) * hd..][..hd], k, kh, nkv, hd, scale, &mut w);
            weighted_values(&w, v, kh, nkv, hd, &mut o[h * hd..][..hd]);
        }
    });
    out
}

/// The first position a query at `p` sees.
fn window_start(p: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (p + 1).saturating_sub(w))
}

/// Relative attention-output errors `||O - O'||_F / ||O||_F` over the query `positions`, where `O'` uses the
/// quantized keys `k_quant[j]` (with exact values) or the quantized values `v_quant[j]` (with exact keys).
///
/// Each query's exact softmax weights and output are computed once and reused: a value width costs one weighted
/// sum, a key width one score pass and one weighted sum. [`attention`] plus [`relative_error`] is the reference.
pub fn attention_errors(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    k_quant: &[Vec<f32>],
    v_quant: &[Vec<f32>],
    positions: &[usize],
    window: Option<usize>,
    dims: &Dims,
    scale: f32,
) -> (Vec<f64>, Vec<f64>) {
    let (nq, nkv, hd) = (dims.n_q_heads, dims.n_kv_heads, dims.head_dim);
    let per_kv = nq / nkv;
    let (nk, nv) = (k_quant.len(), v_quant.len());
    // Per position: [||O||^2, ||O - O_k[j]||^2 for each j, ||O - O_v[j]||^2 for each j].
    let sums = positions
        .par_iter()
        .map(|&p| {
            let mut acc = vec![0.0f64; 1 + nk + nv];
            let lo = window_start(p, window);
            let at = lo * nkv * hd;
            let (k, v) = (&k[at..], &v[at..]);
            let mut w = vec![0.0f32; p + 1 - lo];
            let mut wq = vec![0.0f32; p + 1 - lo];
            let mut o = vec![0.0f32; hd];
            let mut o2 = vec![0.0f32; hd];
            let sq = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
            for h in 0..nq {
                let kh = h / per_kv;
                let qv = &q[(p * nq + h) * hd..][..hd];
                softmax_weights(qv, k, kh, nkv, hd, scale, &mut w);
                weighted_values(&w, v, kh, nkv, hd, &mut o);
                acc[0] += o.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
                for (j, kq) in k_quant.iter().enumerate() {
                    softmax_weights(qv, &kq[at..], kh, nkv, hd, scale, &mut wq);
                    weighted_values(&wq, v, kh, nkv, hd, &mut o2);
                    acc[1 + j] += sq(&o, &o2);
                }
                for (j, vq) in v_quant.iter().enumerate() {
                    weighted_values(&w, &vq[at..], kh, nkv, hd, &mut o2);
                    acc[1 + nk + j] += sq(&o, &o2);
                }
            }
            acc
        })
        .reduce(|| vec![0.0f64; 1 + nk + nv], |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect());
    let den = sums[0].sqrt();
    let rel = |x: f64| if den > 0.0 { x.sqrt() / den } else { 0.0 };
    (sums[1..1 + nk].iter().map(|&x| rel(x)).collect(), sums[1 + nk..].iter().map(|&x| rel(x)).collect())
}

/// Reference twin of [`attention`]: serial, f64 accumulation, explicit softmax.
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[usize],
    window: Option<usize>,
    dims: &Dims,
    scale: f32,
) -> Vec<f32> {
    let (nq, nkv, hd) = (dims.n_q_heads, dims.n_kv_heads, dims.head_dim);
    let mut out = Vec::with_capacity(positions.len() * nq * hd);
    for &p in positions {
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..nq {
            let kh = h * nkv / nq;
            let logits: Vec<f64> = (lo..=p)
                .map(|s| {
                    (0..hd).map(|d| q[(p * nq + h) * hd + d] as f64 * k[(s * nkv + kh) * hd + d] as f64).sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let acc: f64 = (lo..=p).map(|s| w[s - lo] * v[(s * nkv + kh) * hd + d] as f64).sum();
                out.push((acc / z) as f32);
            }
        }
    }
    out
}

/// `n` query positions spread evenly over the second half of `0..tokens` (always including the last one), where
/// attention spans enough history to be representative. Fewer when there are fewer tokens.
pub fn query_positions(tokens: usize, n: usize) -> Vec<usize> {
    if tokens == 0 || n == 0 {
        return Vec::new();
    }
    let start = tokens / 2;
    let span = tokens - start;
    let n = n.min(span);
    let mut v: Vec<usize> = (0..n).map(|i| start + ((i + 1) * span) / n - 1).collect();
    v.dedup();
    v
}

/// Errors of quantizing one layer's K (or V) alone at one width.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantError {
    /// Nominal width (1.58 for ternary).
    pub bits: f64,
    /// ||K - Q(K)||_F / ||K||_F over all heads and tokens.
    pub k_rel: f64,
    /// ||V - Q(V)||_F / ||V||_F.
    pub v_rel: f64,
    /// Relative error of the layer's attention output when only K is quantized (`null` without queries).
    pub k_attn_rel: Option<f64>,
    /// Relative error of the layer's attention output when only V is quantized.
    pub v_attn_rel: Option<f64>,
}

/// One layer's captured activations, token-major.
#[derive(Clone, Debug, Default)]
pub struct LayerActivations {
    pub tokens: usize,
    /// Queries after RoPE, `[tokens][n_q_heads][head_dim]`; empty when not captured (no attention error then).
    pub q: Vec<f32>,
    /// Keys after RoPE (what the cache stores), `[tokens][n_kv_heads][head_dim]`.
    pub k: Vec<f32>,
    /// Keys before RoPE, same layout; empty when not captured.
    pub k_pre_rope: Vec<f32>,
    /// Values, `[tokens][n_kv_heads][head_dim]`.
    pub v: Vec<f32>,
}

/// Options of the activation study.
#[derive(Clone, Debug)]
pub struct ActivationOptions {
    /// Analyse keys before RoPE instead of after (quantization is always measured on post-RoPE keys, which is what
    /// the cache stores).
    pub pre_rope: bool,
    /// Widths at which quantization errors are measured.
    pub bits: Vec<Bits>,
    /// Number of query positions for the attention-output error (0 disables it).
    pub attn_queries: usize,
    /// Softmax scale, usually 1 / sqrt(head_dim).
    pub softmax_scale: f32,
    /// The layer's sliding window (a query sees only its last `w` positions), `None` for a global layer.
    pub window: Option<usize>,
}

/// The activation study of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationLayer {
    pub k: HeadedStats,
    pub v: HeadedStats,
    /// Per KV head: max and mean |x| of each key channel.
    pub k_channels: Vec<ChannelStats>,
    /// Per KV head: max and mean |x| of each value channel.
    pub v_channels: Vec<ChannelStats>,
    /// One entry per width.
    pub quant: Vec<QuantError>,
}

/// Norms, spectra, channel magnitudes and quantization errors of one layer's K and V.
pub fn activation_layer<Q: Quantizer + ?Sized>(
    layer: usize,
    a: &LayerActivations,
    dims: &Dims,
    opts: &ActivationOptions,
    quantizer: &Q,
) -> Result<ActivationLayer> {
    let (t, nkv, hd) = (a.tokens, dims.n_kv_heads, dims.head_dim);
    let check = |what: &str, x: &[f32], width: usize| {
        if x.len() != t * width {
            return Err(AnalysisError::Shape {
                what: format!("layer {layer} {what}"),
                rows: t,
                cols: width,
                stride: width,
                needed: t * width,
                got: x.len(),
            });
        }
        Ok(())
    };
    check("K", &a.k, dims.kv_dim())?;
    check("V", &a.v, dims.kv_dim())?;
    let k_an: &[f32] = if opts.pre_rope {
        check("K before RoPE", &a.k_pre_rope, dims.kv_dim())?;
        &a.k_pre_rope
    } else {
        &a.k
    };
    let with_attn = opts.attn_queries > 0 && !a.q.is_empty();
    if with_attn {
        check("Q", &a.q, dims.q_dim())?;
    }
    let (k, v) = rayon::join(
        || activation_stats(k_an, t, nkv, hd, &format!("layer {layer} K")),
        || activation_stats(&a.v, t, nkv, hd, &format!("layer {layer} V")),
    );
    let (k, v) = (k?, v?);
    let k_channels = activation_channels(k_an, t, nkv, hd);
    let v_channels = activation_channels(&a.v, t, nkv, hd);

    let mut k_quant = Vec::with_capacity(opts.bits.len());
    let mut v_quant = Vec::with_capacity(opts.bits.len());
    for &bits in &opts.bits {
        k_quant.push(quantize_heads(quantizer, &a.k, t, nkv, hd, bits)?);
        v_quant.push(quantize_heads(quantizer, &a.v, t, nkv, hd, bits)?);
    }
    let (k_attn, v_attn) = if with_attn {
        let positions = query_positions(t, opts.attn_queries);
        let (ka, va) =
            attention_errors(&a.q, &a.k, &a.v, &k_quant, &v_quant, &positions, opts.window, dims, opts.softmax_scale);
        (ka.into_iter().map(Some).collect(), va.into_iter().map(Some).collect())
    } else {
        (vec![None; opts.bits.len()], vec![None; opts.bits.len()])
    };
    let quant = opts
        .bits
        .iter()
        .enumerate()
        .map(|(j, bits)| QuantError {
            bits: bits.nominal(),
            k_rel: relative_error(&a.k, &k_quant[j]),
            v_rel: relative_error(&a.v, &v_quant[j]),
            k_attn_rel: k_attn[j],
            v_attn_rel: v_attn[j],
        })
        .collect();
    Ok(ActivationLayer { k, v, k_channels, v_channels, quant })
}
