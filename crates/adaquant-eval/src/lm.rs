//! What the metrics need from a language model, and a tiny seeded attention model for tests.
//!
//! The metrics talk to [`LanguageModel`] only, so they run unchanged on the real Llama-family model
//! (`adaquant_model::Model`, see [`crate::model_lm`]) and on [`ToyLm`], a two-layer random attention model whose
//! attention also goes through a [`KvCache`] and which makes every evaluator testable in milliseconds.

use adaquant_cache::{CacheShape, KvCache};

use crate::data::SplitMix;
use crate::error::{EvalError, Result};

/// A causal language model whose attention runs through a [`KvCache`].
pub trait LanguageModel: Sync {
    /// Vocabulary size (length of one logits row).
    fn vocab(&self) -> usize;

    /// The cache shape for contexts up to `max_seq_len` tokens.
    fn cache_shape(&self, max_seq_len: usize) -> CacheShape;

    /// Appends `tokens` to what `cache` already holds and returns the logits of the positions `from..tokens.len()`
    /// of this call, row-major `[tokens.len() - from][vocab]`.
    fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache, from: usize) -> Result<Vec<f32>>;

    /// Tokenizes text.
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>>;

    /// Whether the model expects BOS at the start of every sequence (llama.cpp's `add_bos`); task prompts get it.
    fn add_bos(&self) -> bool {
        false
    }

    /// Turns tokens back into text.
    fn decode(&self, tokens: &[u32]) -> Result<String>;

    /// The largest context the model supports.
    fn max_context(&self) -> usize;

    /// Per-layer norms of the key and value projection weights (`None` when the model does not expose them).
    fn kv_weight_norms(&self, _kind: WeightNorm) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        None
    }
}

/// Which norm of a weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightNorm {
    Frobenius,
    /// `sqrt(||W||_F^2 + ||b||^2)`: the weights' Frobenius norm with the bias vector's (the RMS output norm for
    /// unit-variance inputs).
    FrobeniusWithBias,
    /// The largest singular value.
    Spectral,
}

/// Frobenius norm of a `[rows][cols]` matrix.
pub fn frobenius(w: &[f32]) -> f64 {
    w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// Spectral norm of a `[rows][cols]` matrix by power iteration on `W^T W` (f64, `iters` steps from a fixed start).
/// Converges to the largest singular value; 100 steps give about 1e-6 relative accuracy on projection weights
/// whose top two singular values differ by a few percent.
pub fn spectral_norm_power(w: &[f32], rows: usize, cols: usize, iters: usize) -> f64 {
    let mut x: Vec<f64> = (0..cols).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
    let mut y = vec![0.0f64; rows];
    let mut sigma = 0.0;
    for _ in 0..iters {
        let nx = x.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-300);
        x.iter_mut().for_each(|a| *a /= nx);
        for (r, yr) in y.iter_mut().enumerate() {
            *yr = w[r * cols..(r + 1) * cols].iter().zip(&x).map(|(&a, b)| a as f64 * b).sum();
        }
        sigma = y.iter().map(|a| a * a).sum::<f64>().sqrt();
        x.iter_mut().for_each(|a| *a = 0.0);
        for (r, &yr) in y.iter().enumerate() {
            for (xc, &wc) in x.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                *xc += wc as f64 * yr;
            }
        }
    }
    sigma
}

/// A tiny random attention model: tied embeddings, `n_layers` attention-only residual blocks, no MLP.
///
/// Its keys carry a per-channel offset (like real models' outlier channels), so per-token and per-channel
/// quantization behave differently on it. Tokens are bytes of the text modulo the vocabulary.
#[derive(Clone, Debug)]
pub struct ToyLm {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    embed: Vec<f32>,
    layers: Vec<ToyLayer>,
    adds_bos: bool,
}

#[derive(Clone, Debug)]
struct ToyLayer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    k_bias: Vec<f32>,
}

fn rand_matrix(rng: &mut SplitMix, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
}

/// `out[n][cols] = x[n][rows] * w[rows][cols]`.
fn matmul(x: &[f32], w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let n = x.len() / rows;
    let mut out = vec![0.0f32; n * cols];
    for i in 0..n {
        let o = &mut out[i * cols..(i + 1) * cols];
        for r in 0..rows {
            let a = x[i * rows + r];
            for (oc, &wc) in o.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                *oc += a * wc;
            }
        }
    }
    out
}

impl ToyLm {
    /// A seeded model with `vocab` tokens, `n_layers` layers, GQA `n_q_heads`/`n_kv_heads` and `head_dim`.
    pub fn new(seed: u64, vocab: usize, n_layers: usize, n_q_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        let mut rng = SplitMix(seed);
        let d_model = 32;
        let embed = rand_matrix(&mut rng, vocab * d_model, 1.0);
        let layers = (0..n_layers)
            .map(|_| {
                let kv = n_kv_heads * head_dim;
                let q = n_q_heads * head_dim;
                ToyLayer {
                    wq: rand_matrix(&mut rng, d_model * q, 0.5),
                    wk: rand_matrix(&mut rng, d_model * kv, 0.5),
                    wv: rand_matrix(&mut rng, d_model * kv, 0.5),
                    wo: rand_matrix(&mut rng, q * d_model, 0.3),
                    k_bias: rand_matrix(&mut rng, kv, 3.0),
                }
            })
            .collect();
        ToyLm { vocab, d_model, n_layers, n_q_heads, n_kv_heads, head_dim, embed, layers, adds_bos: false }
    }

    /// The default test model: 64 tokens, 2 layers, 4 query and 2 KV heads of 16 channels.
    pub fn small(seed: u64) -> Self {
        ToyLm::new(seed, 64, 2, 4, 2, 16)
    }
}

impl ToyLm {
    /// The same model, marked as one that expects BOS (token 0) at the start of every sequence.
    pub fn with_bos(mut self) -> Self {
        self.adds_bos = true;
        self
    }
}

impl LanguageModel for ToyLm {
    fn add_bos(&self) -> bool {
        self.adds_bos
    }

    fn vocab(&self) -> usize {
        self.vocab
    }

    fn cache_shape(&self, max_seq_len: usize) -> CacheShape {
        CacheShape::new(self.n_layers, self.n_q_heads, self.n_kv_heads, self.head_dim, max_seq_len)
    }

    fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache, from: usize) -> Result<Vec<f32>> {
        let d = self.d_model;
        if from > tokens.len() {
            return Err(EvalError::BadRequest(format!("logits from {from} past {} tokens", tokens.len())));
        }
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize;
            if t >= self.vocab {
                return Err(EvalError::Model(format!("token {t} outside the vocabulary of {}", self.vocab)));
            }
            x.extend_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let (q_row, kv_row) = (self.n_q_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        for (li, l) in self.layers.iter().enumerate() {
            let q = matmul(&x, &l.wq, d, q_row);
            let mut k = matmul(&x, &l.wk, d, kv_row);
            for row in k.chunks_mut(kv_row) {
                row.iter_mut().zip(&l.k_bias).for_each(|(a, b)| *a += b);
            }
            let v = matmul(&x, &l.wv, d, kv_row);
            let mut att = vec![0.0f32; q.len()];
            cache.append_attend(li, &q, &k, &v, &mut att)?;
            let o = matmul(&att, &l.wo, q_row, d);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let n_out = tokens.len() - from;
        let mut logits = vec![0.0f32; n_out * self.vocab];
        for (i, row) in logits.chunks_mut(self.vocab).enumerate() {
            let h = &x[(from + i) * d..(from + i + 1) * d];
            for (t, out) in row.iter_mut().enumerate() {
                *out = h.iter().zip(&self.embed[t * d..(t + 1) * d]).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        Ok(logits)
    }

    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut out: Vec<u32> = if add_bos { vec![0] } else { Vec::new() };
        out.extend(text.bytes().map(|b| 1 + (b as u32) % (self.vocab as u32 - 1)));
        Ok(out)
    }

    fn decode(&self, tokens: &[u32]) -> Result<String> {
        Ok(tokens.iter().map(|&t| char::from(b'0' + (t % 10) as u8)).collect())
    }

    fn max_context(&self) -> usize {
        1 << 20
    }

    fn kv_weight_norms(&self, kind: WeightNorm) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        let (d, kv) = (self.d_model, self.n_kv_heads * self.head_dim);
        let norm = |w: &[f32], b: &[f32]| match kind {
            WeightNorm::Frobenius => frobenius(w),
            WeightNorm::FrobeniusWithBias => frobenius(w).hypot(frobenius(b)),
            WeightNorm::Spectral => spectral_norm_power(w, d, kv, 200),
        };
        Some(Ok((
            self.layers.iter().map(|l| norm(&l.wk, &l.k_bias)).collect(),
            self.layers.iter().map(|l| norm(&l.wv, &[])).collect(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaquant_cache::FullPrecisionCache;

    #[test]
    fn toy_forward_is_causal_and_prefix_stable() {
        let lm = ToyLm::small(1);
        let tokens: Vec<u32> = (0..20).map(|i| (i * 7 % 63) as u32).collect();
        let mut c = FullPrecisionCache::new(lm.cache_shape(64)).unwrap();
        let all = lm.forward(&tokens, &mut c, 0).unwrap();
        c.clear();
        let prefix = lm.forward(&tokens[..9], &mut c, 0).unwrap();
        assert_eq!(&all[..prefix.len()], &prefix[..]);
        c.clear();
        let tail = lm.forward(&tokens, &mut c, 15).unwrap();
        assert_eq!(&all[15 * lm.vocab..], &tail[..]);
        assert!(lm.forward(&[64], &mut c, 0).is_err());
    }

    #[test]
    fn spectral_norm_by_power_iteration_matches_a_known_matrix() {
        // Rows of a 3x4 matrix with orthogonal rows of norms 5, 2 and 1: singular values 5, 2, 1.
        let w = [3.0f32, 4.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert!((spectral_norm_power(&w, 3, 4, 100) - 5.0).abs() < 1e-9);
        assert!((frobenius(&w) - 30f64.sqrt()).abs() < 1e-12);
        let lm = ToyLm::small(2);
        let (fk, fv) = lm.kv_weight_norms(WeightNorm::Frobenius).unwrap().unwrap();
        let (sk, sv) = lm.kv_weight_norms(WeightNorm::Spectral).unwrap().unwrap();
        assert_eq!((fk.len(), fv.len()), (2, 2));
        for i in 0..2 {
            // sigma_max <= ||W||_F <= sqrt(rank) sigma_max.
            assert!(sk[i] <= fk[i] + 1e-9 && fk[i] <= sk[i] * 32f64.sqrt() + 1e-9);
            assert!(sv[i] <= fv[i] + 1e-9);
        }
    }
}
