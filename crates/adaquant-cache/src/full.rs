//! The full-precision cache: f32 storage (or f16 storage, to measure the usual baseline's bytes).

use adaquant_kernels::attn::{attention_f16, decode_attention, decode_attention_serial, HeadKv};
use half::f16;
use rayon::prelude::*;

use crate::{check_append_args, CacheError, CacheShape, KvCache, LayerMemory, MemoryReport, Result};

/// Element type of a [`FullPrecisionCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullDtype {
    F32,
    /// Keys and values stored as f16 (what most inference engines hold).
    F16,
}

/// Per KV head `[t][head_dim]` storage.
#[derive(Clone, Debug)]
enum Store {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
}

#[derive(Clone, Debug)]
struct Layer {
    store: Store,
    /// Tokens appended since the last clear (positions `0..tokens`).
    tokens: usize,
    /// Tokens dropped from the front of a sliding-window layer: the store holds positions `dropped..tokens`.
    dropped: usize,
}

/// A sliding-window layer drops its oldest tokens in blocks of this many, so that dropping costs O(1) per token.
pub(crate) const DROP_BLOCK: usize = 64;

/// A cache that keeps every key and value unquantized, one `[t][head_dim]` buffer per KV head.
///
/// Attention is the kernels' exact path ([`decode_attention`] over exact heads for f32, [`attention_f16`] for
/// f16); [`causal_attention_ref`] is its reference twin.
#[derive(Clone, Debug)]
pub struct FullPrecisionCache {
    shape: CacheShape,
    dtype: FullDtype,
    layers: Vec<Layer>,
}

fn drop_front<T>(x: &mut Vec<T>, n: usize) {
    x.drain(..n.min(x.len()));
}

/// Appends the rows of one side (`x` is `[n][n_kv_heads][head_dim]`) to per-head buffers.
pub(crate) fn scatter_heads<T>(heads: &mut [Vec<T>], x: &[f32], d: usize, conv: impl Fn(f32) -> T) {
    let h = heads.len();
    for (hi, buf) in heads.iter_mut().enumerate() {
        buf.extend(x.chunks(h * d).flat_map(|row| row[hi * d..(hi + 1) * d].iter().map(|&e| conv(e))));
    }
}

/// Decode-faithful attention of the `n` queries of positions `start..start + n` over exact per-head f32 keys and
/// values holding positions `first..` (at least up to `start + n`): query `i` sees positions
/// `shape.window_start(layer, start + i) ..= start + i` (all earlier ones unless the layer slides).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_exact_f32(
    shape: &CacheShape,
    layer: usize,
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    first: usize,
    start: usize,
    q: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let d = shape.head_dim;
    let heads_at = |pos: usize| -> Vec<HeadKv<'_>> {
        let lo = (shape.window_start(layer, pos) - first) * d;
        let hi = (pos + 1 - first) * d;
        k.iter().zip(v).map(|(k, v)| HeadKv::exact(&k[lo..hi], &v[lo..hi])).collect()
    };
    let row = shape.q_row();
    if q.len() == row {
        decode_attention(q, &heads_at(start), d, shape.softmax_scale, out)?;
    } else {
        q.par_chunks(row).zip(out.par_chunks_mut(row)).enumerate().try_for_each(|(i, (qi, oi))| {
            decode_attention_serial(qi, &heads_at(start + i), d, shape.softmax_scale, oi)
        })?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attend_exact_f16(
    shape: &CacheShape,
    layer: usize,
    k: &[Vec<f16>],
    v: &[Vec<f16>],
    first: usize,
    start: usize,
    q: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let d = shape.head_dim;
    let row = shape.q_row();
    q.par_chunks(row).zip(out.par_chunks_mut(row)).enumerate().try_for_each(|(i, (qi, oi))| {
        let pos = start + i;
        let (lo, hi) = ((shape.window_start(layer, pos) - first) * d, (pos + 1 - first) * d);
        let ks: Vec<&[f16]> = k.iter().map(|x| &x[lo..hi]).collect();
        let vs: Vec<&[f16]> = v.iter().map(|x| &x[lo..hi]).collect();
        attention_f16(qi, &ks, &vs, d, shape.softmax_scale, oi)
    })?;
    Ok(())
}

impl FullPrecisionCache {
    /// An empty f32 cache.
    pub fn new(shape: CacheShape) -> Result<Self> {
        Self::with_dtype(shape, FullDtype::F32)
    }

    /// An empty cache with the given element type.
    pub fn with_dtype(shape: CacheShape, dtype: FullDtype) -> Result<Self> {
        shape.validate()?;
        let h = shape.n_kv_heads;
        let store = match dtype {
            FullDtype::F32 => Store::F32 { k: vec![Vec::new(); h], v: vec![Vec::new(); h] },
            FullDtype::F16 => Store::F16 { k: vec![Vec::new(); h], v: vec![Vec::new(); h] },
        };
        let layers = vec![Layer { store, tokens: 0, dropped: 0 }; shape.n_layers];
        Ok(FullPrecisionCache { shape, dtype, layers })
    }

    /// Appends keys and values (`[n][n_kv_heads][head_dim]` each) to `layer` without attending, for filling a
    /// cache (benchmarks, replaying a captured context).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let n = crate::check_kv_args(&self.shape, layer, k, v)?;
        self.store(layer, n, k, v)?;
        self.slide(layer);
        Ok(())
    }

    fn store(&mut self, layer: usize, n: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let d = self.shape.head_dim;
        let l = &mut self.layers[layer];
        if l.tokens + n > self.shape.max_seq_len {
            return Err(CacheError::Full { layer, held: l.tokens, adding: n, max: self.shape.max_seq_len });
        }
        match &mut l.store {
            Store::F32 { k: ks, v: vs } => {
                scatter_heads(ks, k, d, |x| x);
                scatter_heads(vs, v, d, |x| x);
            }
            Store::F16 { k: ks, v: vs } => {
                // Checked before anything is stored: an f16 cache never holds an infinity made by rounding.
                for (what, x) in [("k", k), ("v", v)] {
                    if let Some(index) = x.iter().position(|&e| f16::from_f32(e).is_infinite()) {
                        return Err(CacheError::F16Overflow { what, layer, index, value: x[index] });
                    }
                }
                scatter_heads(ks, k, d, f16::from_f32);
                scatter_heads(vs, v, d, f16::from_f32);
            }
        }
        l.tokens += n;
        Ok(())
    }

    /// Drops the tokens of `layer` from `tokens` on (undoes a store whose attention failed).
    fn truncate(&mut self, layer: usize, tokens: usize) {
        let l = &mut self.layers[layer];
        let len = (tokens - l.dropped) * self.shape.head_dim;
        match &mut l.store {
            Store::F32 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(|x| x.truncate(len)),
            Store::F16 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(|x| x.truncate(len)),
        }
        l.tokens = tokens;
    }

    /// Drops the oldest tokens of a sliding-window layer that no later query can see, in whole blocks, so that
    /// the layer holds fewer than `window + DROP_BLOCK` tokens between calls.
    fn slide(&mut self, layer: usize) {
        let Some(w) = self.shape.window(layer) else { return };
        let d = self.shape.head_dim;
        let l = &mut self.layers[layer];
        // The next query (position `tokens`) sees positions from `tokens + 1 - w` on.
        let needed_from = (l.tokens + 1).saturating_sub(w);
        let excess = needed_from.saturating_sub(l.dropped);
        if excess < DROP_BLOCK {
            return;
        }
        let drop = excess - excess % DROP_BLOCK;
        match &mut l.store {
            Store::F32 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(|x| drop_front(x, drop * d)),
            Store::F16 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(|x| drop_front(x, drop * d)),
        }
        l.dropped += drop;
    }

    /// Keys of one KV head of `layer`, `[t][head_dim]`, widened to f32 (for a sliding-window layer, the tokens
    /// still held: the last ones, at least the window).
    pub fn keys(&self, layer: usize, head: usize) -> Vec<f32> {
        match &self.layers[layer].store {
            Store::F32 { k, .. } => k[head].clone(),
            Store::F16 { k, .. } => k[head].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Values of one KV head of `layer`, `[t][head_dim]`, widened to f32.
    pub fn values(&self, layer: usize, head: usize) -> Vec<f32> {
        match &self.layers[layer].store {
            Store::F32 { v, .. } => v[head].clone(),
            Store::F16 { v, .. } => v[head].iter().map(|x| x.to_f32()).collect(),
        }
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
        if n == 0 {
            return Ok(());
        }
        let start = self.layers[layer].tokens;
        self.store(layer, n, k, v)?;
        let first = self.layers[layer].dropped;
        let attended = match &self.layers[layer].store {
            Store::F32 { k, v } => attend_exact_f32(&self.shape, layer, k, v, first, start, q, out),
            Store::F16 { k, v } => attend_exact_f16(&self.shape, layer, k, v, first, start, q, out),
        };
        if attended.is_err() {
            // An append either completes or leaves the cache as it was.
            self.truncate(layer, start);
            return attended;
        }
        self.slide(layer);
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let layers: Vec<LayerMemory> = self
            .layers
            .iter()
            .map(|l| {
                let (kb, vb) = match &l.store {
                    Store::F32 { k, v } => (k.iter().map(|x| x.len() * 4).sum(), v.iter().map(|x| x.len() * 4).sum()),
                    Store::F16 { k, v } => (k.iter().map(|x| x.len() * 2).sum(), v.iter().map(|x| x.len() * 2).sum()),
                };
                LayerMemory { k_full_bytes: kb, v_full_bytes: vb, tokens: l.tokens - l.dropped, ..Default::default() }
            })
            .collect();
        let elements = self.layers.iter().map(|l| 2 * (l.tokens - l.dropped) * self.shape.kv_row()).sum();
        MemoryReport { layers, elements }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            l.tokens = 0;
            l.dropped = 0;
            match &mut l.store {
                Store::F32 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(Vec::clear),
                Store::F16 { k, v } => k.iter_mut().chain(v.iter_mut()).for_each(Vec::clear),
            }
        }
    }

    fn describe(&self) -> String {
        match self.dtype {
            FullDtype::F32 => "f32".into(),
            FullDtype::F16 => "f16".into(),
        }
    }

    fn snapshot(&self) -> Option<Box<dyn KvCache>> {
        Some(Box::new(self.clone()))
    }
}

/// Reference twin of the full-precision attention: causal attention of the queries of positions
/// `start..start + n` over token-major `k`/`v` (`[t][kv_head][head_dim]`, at least `start + n` tokens), plain
/// loops in f64 with a max-subtracted softmax.
pub fn causal_attention_ref(shape: &CacheShape, k: &[f32], v: &[f32], start: usize, q: &[f32], out: &mut [f32]) {
    let (hq, hkv, d) = (shape.n_q_heads, shape.n_kv_heads, shape.head_dim);
    let group = hq / hkv;
    let kv_row = hkv * d;
    for (idx, o) in out.chunks_mut(d).enumerate() {
        let (i, h) = (idx / hq, idx % hq);
        let kvh = h / group;
        let qv = &q[idx * d..(idx + 1) * d];
        let len = start + i + 1;
        let scores: Vec<f64> = (0..len)
            .map(|t| {
                let kr = &k[t * kv_row + kvh * d..t * kv_row + (kvh + 1) * d];
                qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * shape.softmax_scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = p.iter().sum();
        for (c, oc) in o.iter_mut().enumerate() {
            let acc: f64 = p.iter().enumerate().map(|(t, &pt)| pt * v[t * kv_row + kvh * d + c] as f64).sum();
            *oc = (acc / sum) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn fast_attention_matches_the_reference() {
        for dtype in [FullDtype::F32, FullDtype::F16] {
            let shape = CacheShape::new(1, 6, 2, 24, 128);
            let n = 53;
            let mut seed = 3;
            let q: Vec<f32> = (0..n * shape.q_row()).map(|_| 3.0 * lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..n * shape.kv_row()).map(|_| 3.0 * lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..n * shape.kv_row()).map(|_| lcg(&mut seed)).collect();
            let mut c = FullPrecisionCache::with_dtype(shape.clone(), dtype).unwrap();
            let mut out = vec![0.0; q.len()];
            c.append_attend(
                0,
                &q[..10 * shape.q_row()],
                &k[..10 * shape.kv_row()],
                &v[..10 * shape.kv_row()],
                &mut out[..10 * shape.q_row()],
            )
            .unwrap();
            c.append_attend(
                0,
                &q[10 * shape.q_row()..],
                &k[10 * shape.kv_row()..],
                &v[10 * shape.kv_row()..],
                &mut out[10 * shape.q_row()..],
            )
            .unwrap();
            let round = |x: &f32| if dtype == FullDtype::F16 { f16::from_f32(*x).to_f32() } else { *x };
            let (kr, vr): (Vec<f32>, Vec<f32>) = (k.iter().map(round).collect(), v.iter().map(round).collect());
            let mut reference = vec![0.0; q.len()];
            causal_attention_ref(&shape, &kr, &vr, 0, &q, &mut reference);
            let worst = out.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{dtype:?}: {worst}");
            let rows: Vec<f32> = (0..n).flat_map(|t| kr[t * 48 + 24..t * 48 + 48].to_vec()).collect();
            assert_eq!(c.keys(0, 1), rows);
        }
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
