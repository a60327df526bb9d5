//! The quantized, layer-wise mixed-precision KV cache.
//!
//! Per layer and per KV head, keys and values each live in three parts, in position order:
//! - sinks: the first `sinks` tokens of the sequence, exact forever;
//! - a [`PackedStream`] of quantized tokens (absent for an unquantized side);
//! - an exact tail of the most recent tokens.
//!
//! A token is quantized exactly once, when it leaves the tail: per-token groups leave token by token (the tail then
//! holds exactly `residual` tokens), per-channel groups leave `group` tokens at a time (the tail holds between
//! `residual` and `residual + group - 1`). Nothing is re-quantized or concatenated: the packed streams and the tail
//! grow by appends, and the tail drops flushed tokens by advancing an offset, compacting once the dead prefix is as
//! long as the live part, so an append costs O(new tokens) amortized.
//!
//! Attention is decode-faithful: in a call appending `n` tokens, query `i` sees the cache exactly as it was right
//! after its own token was appended, because the tail still holds, exact, the tokens that this call flushed; the
//! query reads the packed prefix that existed at its position plus the matching slice of the tail. A layer whose
//! keys and values are both unquantized keeps everything in its tails (no separate sinks), which is exactly what
//! [`crate::FullPrecisionCache`] holds and hands to the same kernel, so an all-unquantized cache gives
//! bit-identical outputs.
//!
//! A side whose spec carries a [`adaquant_kernels::Rotation`] is held entirely in a rotated basis (sinks, packed
//! stream and tail): each KV head has its own seeded Hadamard rotation ([`adaquant_kernels::rotate`]), applied to
//! every appended token (keys after RoPE, as the model hands them over) before it is stored. Rotated keys get the
//! queries rotated by the same matrix, once per query and step, so scores are unchanged in exact arithmetic;
//! rotated values give a rotated attention output, rotated back once per query and step. The rotation costs
//! `O(head_dim log head_dim)` per appended token and per query, never per cached token.

use adaquant_kernels::attn::{decode_attention, decode_attention_serial, HeadKv};
use adaquant_kernels::quant::{PackedStream, PackedView};
use adaquant_kernels::rotate::{head_seed, HadamardRotation};
use rayon::prelude::*;

use crate::config::{Precision, QuantCacheConfig};
use crate::{check_append_args, check_kv_args, CacheError, CacheShape, KvCache, LayerMemory, MemoryReport, Result};

/// Bytes of one exact element (the cache holds exact tokens as f32).
pub const EXACT_BYTES: usize = 4;

/// Which side of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kv {
    K,
    V,
}

/// One side (keys or values) of one KV head of one layer.
#[derive(Clone, Debug)]
struct HeadSide {
    /// `[min(tokens, sinks)][head_dim]`.
    sink: Vec<f32>,
    packed: Option<PackedStream>,
    /// `[dead + live][head_dim]`; the first `dead` tokens were flushed into `packed` and are no longer held.
    tail: Vec<f32>,
    dead: usize,
}

impl HeadSide {
    fn live_tail(&self, d: usize) -> &[f32] {
        &self.tail[self.dead * d..]
    }
}

#[derive(Clone, Debug)]
struct Layer {
    /// Per KV head.
    k: Vec<HeadSide>,
    v: Vec<HeadSide>,
    tokens: usize,
    /// Exact leading tokens of this layer: the config's sinks, or 0 when both sides are unquantized.
    sinks: usize,
    /// Per KV head, for sides whose spec rotates.
    k_rot: Option<Vec<HadamardRotation>>,
    v_rot: Option<Vec<HadamardRotation>>,
}

impl Layer {
    fn side(&self, kv: Kv) -> &[HeadSide] {
        match kv {
            Kv::K => &self.k,
            Kv::V => &self.v,
        }
    }

    fn rotations(&self, kv: Kv) -> Option<&[HadamardRotation]> {
        match kv {
            Kv::K => self.k_rot.as_deref(),
            Kv::V => self.v_rot.as_deref(),
        }
    }
}

/// Rotates (or, with `back`, un-rotates) each head of each `[rows][heads][head_dim]` row with its KV head's
/// rotation; `heads` is a multiple of the number of rotations (query heads share their KV head's rotation).
fn rotate_rows(rots: &[HadamardRotation], x: &mut [f32], heads: usize, d: usize, back: bool) {
    let rep = heads / rots.len();
    for row in x.chunks_exact_mut(heads * d) {
        for (h, xh) in row.chunks_exact_mut(d).enumerate() {
            let r = &rots[h / rep];
            if back {
                r.unrotate(xh);
            } else {
                r.rotate(xh);
            }
        }
    }
}

/// The quantized cache. Build it from a [`QuantCacheConfig`] (or through [`crate::CacheSpec::build`]).
#[derive(Clone, Debug)]
pub struct QuantizedCache {
    shape: CacheShape,
    config: QuantCacheConfig,
    layers: Vec<Layer>,
}

/// Tokens of each part of one side after `tokens` were appended: (sinks, quantized, tail).
pub fn side_split(p: &Precision, tokens: usize, residual: usize, sinks: usize) -> (usize, usize, usize) {
    let s = tokens.min(sinks);
    let q = p.quantized_tokens(tokens, residual, sinks);
    (s, q, tokens - s - q)
}

/// The bytes a [`QuantizedCache`] with `config` holds when layer `l` holds `tokens[l]` tokens: packed codes,
/// metadata and exact f32 elements (sinks and tail), per layer. This is the analytic formula the cache's
/// [`KvCache::memory`] must equal.
pub fn expected_memory(config: &QuantCacheConfig, shape: &CacheShape, tokens: &[usize]) -> MemoryReport {
    let (h, d) = (shape.n_kv_heads, shape.head_dim);
    let side = |p: &Precision, t: usize| -> (usize, usize, usize) {
        let (s, q, tail) = side_split(p, t, config.residual, config.sinks);
        match p.spec() {
            None => (0, 0, t * h * d * EXACT_BYTES),
            Some(spec) => {
                let code = h * spec.bits.packed_bytes(q * d);
                let meta = spec.bytes(q, h, d) - code;
                (code, meta, (s + tail) * h * d * EXACT_BYTES)
            }
        }
    };
    let layers = config
        .layers
        .iter()
        .zip(tokens)
        .map(|(l, &t)| {
            let (kc, km, kf) = side(&l.k, t);
            let (vc, vm, vf) = side(&l.v, t);
            LayerMemory {
                k_code_bytes: kc,
                k_meta_bytes: km,
                k_full_bytes: kf,
                v_code_bytes: vc,
                v_meta_bytes: vm,
                v_full_bytes: vf,
                tokens: t,
            }
        })
        .collect();
    MemoryReport { layers, elements: tokens.iter().map(|t| 2 * t * h * d).sum() }
}

/// Initial room of each buffer, in tokens; buffers grow geometrically from there.
const INITIAL_TOKENS: usize = 256;

impl QuantizedCache {
    /// An empty cache; checks `config` against `shape`.
    pub fn new(shape: CacheShape, config: QuantCacheConfig) -> Result<Self> {
        config.validate(&shape)?;
        let (h, d) = (shape.n_kv_heads, shape.head_dim);
        let room = INITIAL_TOKENS.min(shape.max_seq_len);
        let side = |p: &Precision| -> Result<Vec<HeadSide>> {
            (0..h)
                .map(|_| {
                    Ok(HeadSide {
                        sink: Vec::with_capacity(config.sinks.min(shape.max_seq_len) * d),
                        packed: p.spec().map(|s| PackedStream::with_capacity(*s, d, room)).transpose()?,
                        tail: Vec::with_capacity((config.residual + INITIAL_TOKENS).min(shape.max_seq_len) * d),
                        dead: 0,
                    })
                })
                .collect()
        };
        let rotations = |p: &Precision, layer: usize, side: usize| -> Result<Option<Vec<HadamardRotation>>> {
            let Some(r) = p.spec().and_then(|s| s.rotation) else { return Ok(None) };
            (0..h)
                .map(|head| HadamardRotation::new(d, head_seed(r.seed, layer, side, head)).map_err(Into::into))
                .collect::<Result<Vec<_>>>()
                .map(Some)
        };
        let layers = config
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let both_full = l.k == Precision::Full && l.v == Precision::Full;
                let sinks = if both_full { 0 } else { config.sinks };
                Ok(Layer {
                    k: side(&l.k)?,
                    v: side(&l.v)?,
                    tokens: 0,
                    sinks,
                    k_rot: rotations(&l.k, i, 0)?,
                    v_rot: rotations(&l.v, i, 1)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(QuantizedCache { shape, config, layers })
    }

    /// The configuration.
    pub fn config(&self) -> &QuantCacheConfig {
        &self.config
    }

    /// The packed stream of one side of one KV head (`None` for unquantized sides).
    pub fn packed(&self, layer: usize, kv: Kv, head: usize) -> Option<PackedView<'_>> {
        self.layers.get(layer)?.side(kv).get(head)?.packed.as_ref().map(PackedStream::view)
    }

    /// The rotation of one side of one KV head (`None` for sides that are not rotated).
    pub fn rotation(&self, layer: usize, kv: Kv, head: usize) -> Option<&HadamardRotation> {
        self.layers.get(layer)?.rotations(kv)?.get(head)
    }

    /// The exact parts of one side of one KV head: (sinks, tail), each `[tokens][head_dim]`, as stored (rotated
    /// when the side rotates; see [`Self::rotation`]). A layer whose both sides are unquantized keeps everything in
    /// the tail.
    pub fn exact_parts(&self, layer: usize, kv: Kv, head: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let s = self.layers.get(layer)?.side(kv).get(head)?;
        Some((s.sink.clone(), s.live_tail(self.shape.head_dim).to_vec()))
    }

    /// Appends keys and values (`[n][n_kv_heads][head_dim]` each) to `layer` without attending: the same cache
    /// contents as [`KvCache::append_attend`], for filling a cache (benchmarks, replaying a captured context).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        check_kv_args(&self.shape, layer, k, v)?;
        self.append_impl(layer, k, v, None)
    }

    fn append_impl(&mut self, layer: usize, k: &[f32], v: &[f32], attend: Option<(&[f32], &mut [f32])>) -> Result<()> {
        if let Some(w) = self.shape.window(layer) {
            if self.seq_len(layer) + k.len() / self.shape.kv_row() > w {
                return Err(CacheError::WindowNotSupported { layer, window: w, cache: "quantized".into() });
            }
        }
        let shape = &self.shape;
        let n = k.len() / shape.kv_row();
        let residual = self.config.residual;
        let prec = self.config.layers[layer];
        let l = &mut self.layers[layer];
        let t0 = l.tokens;
        if t0 + n > shape.max_seq_len {
            return Err(CacheError::Full { layer, held: t0, adding: n, max: shape.max_seq_len });
        }
        if n == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let sinks = l.sinks;
        // Rotated sides store rotated tokens; queries meet rotated keys in the same basis.
        let (k_rotated, v_rotated, q_rotated);
        let (k, v) = (
            match &l.k_rot {
                Some(r) => {
                    k_rotated = rotated(r, k, shape.n_kv_heads, d);
                    &k_rotated[..]
                }
                None => k,
            },
            match &l.v_rot {
                Some(r) => {
                    v_rotated = rotated(r, v, shape.n_kv_heads, d);
                    &v_rotated[..]
                }
                None => v,
            },
        );
        let attend = match (attend, &l.k_rot) {
            (Some((q, out)), Some(r)) => {
                q_rotated = rotated(r, q, shape.n_q_heads, d);
                Some((&q_rotated[..], out))
            }
            (a, _) => a,
        };
        let qk0 = prec.k.quantized_tokens(t0, residual, sinks);
        let qv0 = prec.v.quantized_tokens(t0, residual, sinks);
        let flush_k = prec.k.quantized_tokens(t0 + n, residual, sinks) - qk0;
        let flush_v = prec.v.quantized_tokens(t0 + n, residual, sinks) - qv0;
        // An append either completes or leaves the layer exactly as it was. A push can fail part-way (metadata
        // overflow in one head, after other heads grew) and attention can fail after every head grew (overflowing
        // scores), so the lengths are recorded first and restored on any error; nothing is retired before
        // attention succeeds.
        let marks = (Mark::of(&l.k), Mark::of(&l.v));
        let grow_and_attend = || -> Result<()> {
            append_side(&mut l.k, k, t0, sinks, d, flush_k)?;
            append_side(&mut l.v, v, t0, sinks, d, flush_v)?;
            let Some((q, out)) = attend else { return Ok(()) };
            let (kh, vh) = (&l.k, &l.v);
            let heads_at = |i: usize| -> Vec<HeadKv<'_>> {
                let t = t0 + i + 1;
                kh.iter()
                    .zip(vh)
                    .map(|(ks, vs)| {
                        let ck = cut(&prec.k, t, qk0, ks.dead, residual, sinks, d);
                        let cv = cut(&prec.v, t, qv0, vs.dead, residual, sinks, d);
                        HeadKv {
                            sink_k: &ks.sink[..ck.sinks * d],
                            sink_v: &vs.sink[..cv.sinks * d],
                            k: ks.packed.as_ref().map(|p| p.view().prefix(ck.packed)),
                            v: vs.packed.as_ref().map(|p| p.view().prefix(cv.packed)),
                            tail_k: &ks.tail[ck.tail],
                            tail_v: &vs.tail[cv.tail],
                        }
                    })
                    .collect()
            };
            let scale = shape.softmax_scale;
            if n == 1 {
                decode_attention(q, &heads_at(0), d, scale, out)?;
            } else {
                let row = shape.q_row();
                q.par_chunks(row)
                    .zip(out.par_chunks_mut(row))
                    .enumerate()
                    .try_for_each(|(i, (qi, oi))| decode_attention_serial(qi, &heads_at(i), d, scale, oi))?;
            }
            if let Some(r) = &l.v_rot {
                rotate_rows(r, out, shape.n_q_heads, d, true);
            }
            Ok(())
        };
        if let Err(e) = grow_and_attend() {
            marks.0.restore(&mut l.k);
            marks.1.restore(&mut l.v);
            return Err(e);
        }
        l.tokens += n;
        retire(&mut l.k, d, flush_k);
        retire(&mut l.v, d, flush_v);
        Ok(())
    }

    /// One side of one KV head as attention sees it now, `[tokens][head_dim]`: sinks, then the dequantized packed
    /// stream (reference dequantizer), then the tail; rotated sides are rotated back (reference transform), so this
    /// is the history in the model's basis.
    pub fn materialize(&self, layer: usize, kv: Kv, head: usize) -> Result<Vec<f32>> {
        let (sink, tail) = self
            .exact_parts(layer, kv, head)
            .ok_or_else(|| CacheError::InvalidConfig(format!("no layer {layer} / kv head {head} in this cache")))?;
        let mut out = sink;
        if let Some(view) = self.packed(layer, kv, head) {
            let start = out.len();
            out.resize(start + view.tokens * view.head_dim, 0.0);
            adaquant_kernels::quant::dequantize_ref(&view, &mut out[start..])?;
        }
        out.extend_from_slice(&tail);
        if let Some(r) = self.rotation(layer, kv, head) {
            out = r.unrotate_ref(&out);
        }
        Ok(out)
    }
}

/// The lengths of one side's parts before an append (the same for every KV head of the side).
struct Mark {
    sink: usize,
    tail: usize,
    packed: usize,
}

impl Mark {
    fn of(heads: &[HeadSide]) -> Mark {
        let h = &heads[0];
        Mark { sink: h.sink.len(), tail: h.tail.len(), packed: h.packed.as_ref().map_or(0, PackedStream::tokens) }
    }

    /// Puts every head of the side back to these lengths, bytes included (undoes a failed append).
    fn restore(&self, heads: &mut [HeadSide]) {
        for s in heads {
            s.sink.truncate(self.sink);
            s.tail.truncate(self.tail);
            if let Some(p) = &mut s.packed {
                // The recorded length held whole groups before the append, so truncating to it cannot fail.
                let undone = p.truncate(self.packed);
                debug_assert!(undone.is_ok(), "{undone:?}");
            }
        }
    }
}

/// A rotated copy of `[rows][heads][head_dim]` rows.
fn rotated(rots: &[HadamardRotation], x: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    rotate_rows(rots, &mut y, heads, d, false);
    y
}

/// Appends `n` tokens of one side (`x` is `[n][n_kv_heads][head_dim]`) to every head: sinks first, the rest to the
/// tail, then flushes `flush` tokens from the front of the live tail into the packed stream (quantized once).
/// Returns nothing; the flushed tokens stay physically in the tail until [`retire`] so that this call's queries
/// can still read them exact.
fn append_side(heads: &mut [HeadSide], x: &[f32], t0: usize, sinks: usize, d: usize, flush: usize) -> Result<()> {
    let h = heads.len();
    let n = x.len() / (h * d);
    let work = |(hi, s): (usize, &mut HeadSide)| -> Result<()> {
        for i in 0..n {
            let row = &x[(i * h + hi) * d..(i * h + hi + 1) * d];
            if t0 + i < sinks {
                s.sink.extend_from_slice(row);
            } else {
                s.tail.extend_from_slice(row);
            }
        }
        if flush > 0 {
            let p = s.packed.as_mut().expect("only quantized sides flush");
            p.push(&s.tail[s.dead * d..(s.dead + flush) * d])?;
        }
        Ok(())
    };
    if n * h >= 64 && flush > 0 {
        heads.par_iter_mut().enumerate().try_for_each(work)
    } else {
        heads.iter_mut().enumerate().try_for_each(work)
    }
}

/// Drops `flush` flushed tokens from the front of every tail, compacting once the dead prefix is at least as long
/// as the live part (amortized O(1) per token).
fn retire(heads: &mut [HeadSide], d: usize, flush: usize) {
    for s in heads {
        s.dead += flush;
        let live = s.tail.len() / d - s.dead;
        if s.dead > 0 && s.dead >= live {
            s.tail.copy_within(s.dead * d.., 0);
            s.tail.truncate(live * d);
            s.dead = 0;
        }
    }
}

/// What one query of one side reads: packed prefix length and the tail slice range (in elements of `tail`).
struct SideCut {
    sinks: usize,
    packed: usize,
    tail: std::ops::Range<usize>,
}

fn cut(p: &Precision, t: usize, t0_quant: usize, dead: usize, residual: usize, sinks: usize, d: usize) -> SideCut {
    let (s, q, tail) = side_split(p, t, residual, sinks);
    // The live tail (before this call's flush) starts at position sinks + t0_quant.
    let start = dead + (s + q).saturating_sub(sinks + t0_quant);
    SideCut { sinks: s, packed: q, tail: start * d..(start + tail) * d }
}

impl KvCache for QuantizedCache {
    fn shape(&self) -> &CacheShape {
        &self.shape
    }

    fn seq_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.tokens)
    }

    fn append_attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()> {
        check_append_args(&self.shape, layer, q, k, v, out)?;
        self.append_impl(layer, k, v, Some((q, out)))
    }

    fn memory(&self) -> MemoryReport {
        let d = self.shape.head_dim;
        let sum = |hs: &[HeadSide]| {
            hs.iter().fold((0, 0, 0), |(c, m, f), s| {
                let (pc, pm) = s.packed.as_ref().map_or((0, 0), |p| (p.code_bytes(), p.meta_bytes()));
                (c + pc, m + pm, f + (s.sink.len() + s.live_tail(d).len()) * EXACT_BYTES)
            })
        };
        let layers: Vec<LayerMemory> = self
            .layers
            .iter()
            .map(|l| {
                let (kc, km, kf) = sum(&l.k);
                let (vc, vm, vf) = sum(&l.v);
                LayerMemory {
                    k_code_bytes: kc,
                    k_meta_bytes: km,
                    k_full_bytes: kf,
                    v_code_bytes: vc,
                    v_meta_bytes: vm,
                    v_full_bytes: vf,
                    tokens: l.tokens,
                }
            })
            .collect();
        let elements = self.layers.iter().map(|l| 2 * l.tokens * self.shape.kv_row()).sum();
        MemoryReport { layers, elements }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            l.tokens = 0;
            for s in l.k.iter_mut().chain(l.v.iter_mut()) {
                s.sink.clear();
                s.tail.clear();
                s.dead = 0;
                if let Some(p) = &mut s.packed {
                    p.clear();
                }
            }
        }
    }

    fn describe(&self) -> String {
        self.config.describe()
    }

    fn snapshot(&self) -> Option<Box<dyn KvCache>> {
        Some(Box::new(self.clone()))
    }
}
