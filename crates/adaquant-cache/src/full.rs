//! The full-precision cache: f32 storage (or f16 storage, to measure the usual baseline's bytes).

use half::f16;
use rayon::prelude::*;

use crate::{check_append_args, CacheError, CacheShape, KvCache, LayerMemory, MemoryReport, Result};

/// Element type of a [`FullPrecisionCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullDtype {
    F32,
    /// Keys and values rounded to f16 on append (what most inference engines hold).
    F16,
}

#[derive(Clone, Debug, Default)]
struct Layer {
    /// `[t][kv_head][head_dim]`, f32 (for F16 the values are rounded to f16 and widened back).
    k: Vec<f32>,
    v: Vec<f32>,
    tokens: usize,
}

/// A cache that keeps every key and value unquantized.
#[derive(Clone, Debug)]
pub struct FullPrecisionCache {
    shape: CacheShape,
    dtype: FullDtype,
    layers: Vec<Layer>,
}

impl FullPrecisionCache {
    /// An empty f32 cache.
    pub fn new(shape: CacheShape) -> Result<Self> {
        Self::with_dtype(shape, FullDtype::F32)
    }

    /// An empty cache with the given element type.
    pub fn with_dtype(shape: CacheShape, dtype: FullDtype) -> Result<Self> {
        shape.validate()?;
        let layers = vec![Layer::default(); shape.n_layers];
        Ok(FullPrecisionCache { shape, dtype, layers })
    }

    /// Appends keys and values (`[n][n_kv_heads][head_dim]` each) to `layer` without attending, for filling a
    /// cache (benchmarks, replaying a captured context).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let n = crate::check_kv_args(&self.shape, layer, k, v)?;
        let l = &mut self.layers[layer];
        if l.tokens + n > self.shape.max_seq_len {
            return Err(CacheError::Full { layer, held: l.tokens, adding: n, max: self.shape.max_seq_len });
        }
        let dtype = self.dtype;
        let round = |x: &f32| match dtype {
            FullDtype::F32 => *x,
            FullDtype::F16 => f16::from_f32(*x).to_f32(),
        };
        l.k.extend(k.iter().map(round));
        l.v.extend(v.iter().map(round));
        l.tokens += n;
        Ok(())
    }

    /// Keys of `layer`, `[t][kv_head][head_dim]`.
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.layers[layer].k
    }

    /// Values of `layer`, `[t][kv_head][head_dim]`.
    pub fn values(&self, layer: usize) -> &[f32] {
        &self.layers[layer].v
    }
}

impl KvCache for FullPrecisionCache {
    fn shape(&self) -> &CacheShape {
        &self.shape
    }

    fn seq_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.tokens)
    }

    fn append_attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()> {
        let n = check_append_args(&self.shape, layer, q, k, v, out)?;
        let shape = &self.shape;
        let l = &mut self.layers[layer];
        if l.tokens + n > shape.max_seq_len {
            return Err(CacheError::Full { layer, held: l.tokens, adding: n, max: shape.max_seq_len });
        }
        let round = |x: &f32| match self.dtype {
            FullDtype::F32 => *x,
            FullDtype::F16 => f16::from_f32(*x).to_f32(),
        };
        l.k.extend(k.iter().map(round));
        l.v.extend(v.iter().map(round));
        let start = l.tokens;
        l.tokens += n;
        causal_attention(shape, &l.k, &l.v, start, q, out);
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let el = match self.dtype {
            FullDtype::F32 => 4,
            FullDtype::F16 => 2,
        };
        let layers: Vec<LayerMemory> = self
            .layers
            .iter()
            .map(|l| LayerMemory {
                k_full_bytes: l.k.len() * el,
                v_full_bytes: l.v.len() * el,
                tokens: l.tokens,
                ..Default::default()
            })
            .collect();
        let elements = self.layers.iter().map(|l| l.k.len() + l.v.len()).sum();
        MemoryReport { layers, elements }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            l.k.clear();
            l.v.clear();
            l.tokens = 0;
        }
    }

    fn describe(&self) -> String {
        match self.dtype {
            FullDtype::F32 => "f32".into(),
            FullDtype::F16 => "f16".into(),
        }
    }
}

/// Causal attention of the queries of positions `start..start + n` over full-precision `k`/`v`
/// (`[t][kv_head][head_dim]`, holding at least `start + n` tokens). f32 accumulation, max-subtracted softmax.
pub fn causal_attention(shape: &CacheShape, k: &[f32], v: &[f32], start: usize, q: &[f32], out: &mut [f32]) {
    let (hq, hkv, d) = (shape.n_q_heads, shape.n_kv_heads, shape.head_dim);
    let group = hq / hkv;
    let kv_row = hkv * d;
    out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (i, h) = (idx / hq, idx % hq);
        let kvh = h / group;
        let qv = &q[idx * d..(idx + 1) * d];
        let len = start + i + 1;
        scores.clear();
        let mut m = f32::NEG_INFINITY;
        for t in 0..len {
            let kr = &k[t * kv_row + kvh * d..t * kv_row + (kvh + 1) * d];
            let s = dot(qv, kr) * shape.softmax_scale;
            m = m.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - m).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            let vr = &v[t * kv_row + kvh * d..t * kv_row + (kvh + 1) * d];
            for (oc, &vc) in o.iter_mut().zip(vr) {
                *oc += p * vc;
            }
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorises without reassociation flags.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for j in chunks * 8..a.len() {
        s += a[j] * b[j];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn prefill_equals_token_by_token() {
        let shape = CacheShape::new(2, 6, 2, 16, 64);
        let n = 23;
        let mut seed = 7;
        let q: Vec<f32> = (0..n * shape.q_row()).map(|_| lcg(&mut seed)).collect();
        let k: Vec<f32> = (0..n * shape.kv_row()).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f32> = (0..n * shape.kv_row()).map(|_| lcg(&mut seed)).collect();
        let mut a = FullPrecisionCache::new(shape.clone()).unwrap();
        let mut out_a = vec![0.0; q.len()];
        a.append_attend(1, &q, &k, &v, &mut out_a).unwrap();
        let mut b = FullPrecisionCache::new(shape.clone()).unwrap();
        let mut out_b = vec![0.0; q.len()];
        for i in 0..n {
            let (qr, kr) = (shape.q_row(), shape.kv_row());
            b.append_attend(
                1,
                &q[i * qr..(i + 1) * qr],
                &k[i * kr..(i + 1) * kr],
                &v[i * kr..(i + 1) * kr],
                &mut out_b[i * qr..(i + 1) * qr],
            )
            .unwrap();
        }
        assert_eq!(out_a, out_b);
        assert_eq!(a.memory().total_bytes(), n * shape.kv_row() * 2 * 4);
        assert_eq!(a.seq_len(1), n);
        assert_eq!(a.seq_len(0), 0);
    }

    #[test]
    fn first_token_attends_only_itself() {
        let shape = CacheShape::new(1, 2, 1, 4, 8);
        let mut c = FullPrecisionCache::new(shape).unwrap();
        let v = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 8];
        c.append_attend(0, &[0.5; 8], &[1.0; 4], &v, &mut out).unwrap();
        assert_eq!(&out[..4], &v);
        assert_eq!(&out[4..], &v);
    }

    #[test]
    fn full_and_bad_input_are_errors() {
        let shape = CacheShape::new(1, 1, 1, 4, 1);
        let mut c = FullPrecisionCache::new(shape).unwrap();
        let mut out = [0.0; 4];
        c.append_attend(0, &[0.0; 4], &[0.0; 4], &[0.0; 4], &mut out).unwrap();
        assert!(matches!(c.append_attend(0, &[0.0; 4], &[0.0; 4], &[0.0; 4], &mut out), Err(CacheError::Full { .. })));
        c.clear();
        assert!(matches!(
            c.append_attend(0, &[0.0; 4], &[f32::NAN; 4], &[0.0; 4], &mut out),
            Err(CacheError::NonFinite { .. })
        ));
        assert!(matches!(c.append_attend(0, &[0.0; 3], &[0.0; 4], &[0.0; 4], &mut out), Err(CacheError::Shape { .. })));
        assert!(CacheShape::new(1, 3, 2, 4, 1).validate().is_err());
    }
}
