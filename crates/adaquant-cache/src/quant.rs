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
//! A sliding-window layer (Gemma 3's local layers, [`CacheShape::windows`]) shows each query only its window and
//! frees what no later query can see, in blocks: whole aligned groups from the front of the packed streams
//! ([`PackedStream::drop_front`], at multiples of [`adaquant_kernels::format::QuantSpec::token_align`]), and the
//! front of an unquantized side's tail. Nothing is re-quantized: a query whose window starts inside a packed group
//! reads the group's visible tokens dequantized into a scratch buffer (the exact leading part of
//! [`HeadKv`], free because a window that starts past the sinks hides them) and the aligned rest packed, so a
//! windowed layer stays decode-faithful and holds less than its window (or its exact window, whichever is longer)
//! plus one drop block.
//!
//! A side whose spec carries a [`adaquant_kernels::Rotation`] is held entirely in a rotated basis (sinks, packed
//! stream and tail): each KV head has its own seeded Hadamard rotation ([`adaquant_kernels::rotate`]), applied to
//! every appended token (keys after RoPE, as the model hands them over) before it is stored. Rotated keys get the
//! queries rotated by the same matrix, once per query and step, so scores are unchanged in exact arithmetic;
//! rotated values give a rotated attention output, rotated back once per query and step. The rotation costs
//! `O(head_dim log head_dim)` per appended token and per query, never per cached token.

use adaquant_kernels::attn::{decode_attention, decode_attention_serial, HeadKv};
use adaquant_kernels::quant::{dequantize, PackedStream, PackedView};
use adaquant_kernels::rotate::{head_seed, HadamardRotation};
use rayon::prelude::*;

use crate::config::{Precision, QuantCacheConfig};
use crate::full::DROP_BLOCK;
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
    /// Tokens of this side freed by a sliding window: for a quantized side, tokens dropped from the front of
    /// `packed` (it holds stream tokens `dropped..`, stream token `i` being position `sinks + i`); for an
    /// unquantized one, tail tokens.
    dropped: usize,
    /// `[dead + live][head_dim]`; the first `dead` tokens were flushed into `packed` (or, for an unquantized side of
    /// a sliding-window layer, dropped) and are no longer held.
    tail: Vec<f32>,
    dead: usize,
    /// Position of `tail[0]`.
    tail_base: usize,
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

/// The front of a sliding-window layer's history that no query after `tokens` tokens can see is freed in blocks of
/// at least this many tokens: [`DROP_BLOCK`] rounded up to the side's cut alignment.
fn drop_block(p: &Precision, head_dim: usize) -> usize {
    let a = p.spec().map_or(1, |s| s.token_align(head_dim));
    DROP_BLOCK.div_ceil(a) * a
}

/// Tokens freed from the front of one side after `tokens` were appended to a layer whose next query sees positions
/// from `visible_from` on (0 for a layer that does not slide): for a quantized side, packed stream tokens; for an
/// unquantized one, tail tokens. `sinks` is the layer's (0 when both sides are unquantized).
pub fn dropped_tokens(
    p: &Precision,
    head_dim: usize,
    tokens: usize,
    residual: usize,
    sinks: usize,
    visible_from: usize,
) -> usize {
    let (_, q, tail) = side_split(p, tokens, residual, sinks);
    let hidden = visible_from.saturating_sub(sinks);
    let b = drop_block(p, head_dim);
    let hidden = match p {
        Precision::Full => hidden.min(tail),
        Precision::Quant(_) => hidden.min(q),
    };
    hidden / b * b
}

/// The bytes a [`QuantizedCache`] with `config` holds when layer `l` holds `tokens[l]` tokens: packed codes,
/// metadata and exact f32 elements (sinks and tail), per layer. This is the analytic formula the cache's
/// [`KvCache::memory`] must equal.
pub fn expected_memory(config: &QuantCacheConfig, shape: &CacheShape, tokens: &[usize]) -> MemoryReport {
    let (h, d) = (shape.n_kv_heads, shape.head_dim);
    // (code, metadata, exact bytes, tokens held) of one side.
    let side = |p: &Precision, t: usize, sinks: usize, from: usize| -> (usize, usize, usize, usize) {
        let (s, q, tail) = side_split(p, t, config.residual, sinks);
        let gone = dropped_tokens(p, d, t, config.residual, sinks, from);
        match p.spec() {
            None => (0, 0, (t - gone) * h * d * EXACT_BYTES, t - gone),
            Some(spec) => {
                let q = q - gone;
                let code = h * spec.bits.packed_bytes(q * d);
                let meta = spec.bytes(q, h, d) - code;
                (code, meta, (s + tail) * h * d * EXACT_BYTES, t - gone)
            }
        }
    };
    let (layers, elements): (Vec<LayerMemory>, Vec<usize>) = config
        .layers
        .iter()
        .zip(tokens)
        .enumerate()
        .map(|(i, (l, &t))| {
            let sinks = if l.k == Precision::Full && l.v == Precision::Full { 0 } else { config.sinks };
            let from = if shape.window(i).is_some() { shape.window_start(i, t) } else { 0 };
            let (kc, km, kf, kt) = side(&l.k, t, sinks, from);
            let (vc, vm, vf, vt) = side(&l.v, t, sinks, from);
            let m = LayerMemory {
                k_code_bytes: kc,
                k_meta_bytes: km,
                k_full_bytes: kf,
                v_code_bytes: vc,
                v_meta_bytes: vm,
                v_full_bytes: vf,
                tokens: kt.max(vt),
            };
            (m, (kt + vt) * h * d)
        })
        .unzip();
    MemoryReport { layers, elements: elements.iter().sum() }
}

/// Initial room of each buffer, in tokens; buffers grow geometrically from there.
const INITIAL_TOKENS: usize = 256;

impl QuantizedCache {
    /// An empty cache; checks `config` against `shape`.
    pub fn new(shape: CacheShape, config: QuantCacheConfig) -> Result<Self> {
        config.validate(&shape)?;
        let (h, d) = (shape.n_kv_heads, shape.head_dim);
        let room = INITIAL_TOKENS.min(shape.max_seq_len);
        let side = |p: &Precision, sinks: usize| -> Result<Vec<HeadSide>> {
            (0..h)
                .map(|_| {
                    Ok(HeadSide {
                        sink: Vec::with_capacity(config.sinks.min(shape.max_seq_len) * d),
                        packed: p.spec().map(|s| PackedStream::with_capacity(*s, d, room)).transpose()?,
                        dropped: 0,
                        tail: Vec::with_capacity((config.residual + INITIAL_TOKENS).min(shape.max_seq_len) * d),
                        dead: 0,
                        tail_base: sinks,
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
                    k: side(&l.k, sinks)?,
                    v: side(&l.v, sinks)?,
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

    /// The packed stream of one side of one KV head as held (`None` for unquantized sides; for a sliding-window
    /// layer, the tokens not yet freed).
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
            // Query `i` reads the cache as it was right after its own token, seen through its window.
            let attend_at = |i: usize, qi: &[f32], oi: &mut [f32], serial: bool| -> Result<()> {
                let t = t0 + i + 1;
                let lo = shape.window_start(layer, t - 1);
                // Each head's reads with their leads (empty, and unallocated, unless the window starts inside a
                // packed block), owned here so the heads can borrow them.
                let reads: Vec<HeadRead> = kh
                    .iter()
                    .zip(vh)
                    .map(|(ks, vs)| {
                        let (pk, pv) = plan((&prec.k, &prec.v), (ks, vs), t, lo, residual, sinks, d);
                        let leads = (pk.lead(ks, d)?, pv.lead(vs, d)?);
                        Ok(((pk, pv), leads))
                    })
                    .collect::<Result<_>>()?;
                let heads: Vec<HeadKv<'_>> = kh
                    .iter()
                    .zip(vh)
                    .zip(&reads)
                    .map(|((ks, vs), ((pk, pv), (sk, sv)))| {
                        Ok(HeadKv {
                            sink_k: pk.exact_head(ks, sk, d),
                            sink_v: pv.exact_head(vs, sv, d),
                            k: pk.packed_view(ks)?,
                            v: pv.packed_view(vs)?,
                            tail_k: &ks.tail[pk.tail.clone()],
                            tail_v: &vs.tail[pv.tail.clone()],
                        })
                    })
                    .collect::<Result<_>>()?;
                let scale = shape.softmax_scale;
                if serial {
                    decode_attention_serial(qi, &heads, d, scale, oi)?;
                } else {
                    decode_attention(qi, &heads, d, scale, oi)?;
                }
                Ok(())
            };
            if n == 1 {
                attend_at(0, q, out, false)?;
            } else {
                let row = shape.q_row();
                q.par_chunks(row)
                    .zip(out.par_chunks_mut(row))
                    .enumerate()
                    .try_for_each(|(i, (qi, oi))| attend_at(i, qi, oi, true))?;
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
        if shape.window(layer).is_some() {
            let from = shape.window_start(layer, l.tokens);
            slide(&mut l.k, &prec.k, l.tokens, residual, sinks, from, d)?;
            slide(&mut l.v, &prec.v, l.tokens, residual, sinks, from, d)?;
        }
        Ok(())
    }

    /// One side of one KV head as held now, `[tokens][head_dim]`: sinks, then the dequantized packed stream
    /// (reference dequantizer), then the tail; rotated sides are rotated back (reference transform), so this is the
    /// history in the model's basis. For a layer that does not slide this is what the next query sees; a
    /// sliding-window layer may still hold up to a drop block of tokens before its window.
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
            s.tail_base += s.dead;
            s.dead = 0;
        }
    }
}

/// Frees what no query after `tokens` tokens can see (it sees positions from `from` on) on one side of a
/// sliding-window layer: whole aligned blocks from the front of the packed streams, or of an unquantized side's
/// tail ([`dropped_tokens`] says how many).
fn slide(
    heads: &mut [HeadSide],
    p: &Precision,
    tokens: usize,
    residual: usize,
    sinks: usize,
    from: usize,
    d: usize,
) -> Result<()> {
    let gone = dropped_tokens(p, d, tokens, residual, sinks, from);
    for s in heads {
        match &mut s.packed {
            Some(stream) => {
                if gone > s.dropped {
                    stream.drop_front(gone - s.dropped)?;
                    s.dropped = gone;
                }
            }
            None => {
                // The live tail starts at position `sinks + gone`.
                let dead = (sinks + gone).saturating_sub(s.tail_base);
                if dead > s.dead {
                    let more = dead - s.dead;
                    retire(std::slice::from_mut(s), d, more);
                    s.dropped = gone;
                }
            }
        }
    }
    Ok(())
}

/// What one query reads of one side, from the packed stream and the tail as they are during its call (this call's
/// flushed tokens still physically in the tail). In the kernel's order:
/// - `sinks`: the visible sinks (token range of `sink`), or, for a sliding-window layer whose window starts past
///   them, a `lead` read exact: the held stream tokens `lead_packed` dequantized, then the tail elements
///   `lead_tail`. The lead runs from the window's start to the first cut point of both sides, so it has the same
///   length for keys and values, as the kernel's exact leading part must;
/// - `packed`: held stream tokens read packed, starting at a cut point;
/// - `tail`: the visible rest of the tail, as a range of elements of `tail`.
struct SideRead {
    sinks: std::ops::Range<usize>,
    lead_packed: std::ops::Range<usize>,
    lead_tail: std::ops::Range<usize>,
    packed: std::ops::Range<usize>,
    tail: std::ops::Range<usize>,
}

/// One KV head's key and value reads by one query, with their leads (see [`SideRead::lead`]).
type HeadRead = ((SideRead, SideRead), (Vec<f32>, Vec<f32>));

/// The reads of one KV head's keys and values by the query that sees positions `lo..t` (`lo` = 0 unless the layer
/// slides).
#[allow(clippy::too_many_arguments)]
fn plan(
    prec: (&Precision, &Precision),
    held: (&HeadSide, &HeadSide),
    t: usize,
    lo: usize,
    residual: usize,
    sinks: usize,
    d: usize,
) -> (SideRead, SideRead) {
    // Stream token `i` is position `sinks + i` on both sides; `first` is where the window starts.
    let first = lo.saturating_sub(sinks);
    let sides = [(prec.0, held.0), (prec.1, held.1)];
    let split = sides.map(|(p, _)| side_split(p, t, residual, sinks));
    // The first stream token at or after `first` where both sides can be cut: a multiple of each side's
    // alignment, or past its packed tokens. (The dropped stream tokens are multiples of the alignments.)
    let fits = |c: usize| {
        sides
            .iter()
            .zip(&split)
            .all(|((p, _), &(_, q, _))| c >= q || p.spec().is_none_or(|spec| c.is_multiple_of(spec.token_align(d))))
    };
    let mut cut = first;
    while !fits(cut) {
        cut += 1;
    }
    let read = |(_, s): (&Precision, &HeadSide), (ns, q, _): (usize, usize, usize)| -> SideRead {
        // Stream tokens dropped (an unquantized side has no stream, and its drops are tail tokens).
        let pb = if s.packed.is_some() { s.dropped } else { 0 };
        let tail_at = |from: usize, to: usize| {
            if from >= to {
                0..0
            } else {
                (from - s.tail_base) * d..(to - s.tail_base) * d
            }
        };
        let tail_from = (ns + q).max(sinks + cut).min(t);
        if first == 0 {
            return SideRead {
                sinks: lo.min(ns)..ns,
                lead_packed: 0..0,
                lead_tail: 0..0,
                packed: 0..q - pb,
                tail: tail_at(tail_from, t),
            };
        }
        SideRead {
            sinks: ns..ns,
            lead_packed: first.min(q) - pb..cut.min(q) - pb,
            lead_tail: tail_at(sinks + first.max(q), sinks + cut),
            packed: cut.min(q) - pb..q - pb,
            tail: tail_at(tail_from, t),
        }
    };
    (read(sides[0], split[0]), read(sides[1], split[1]))
}

impl SideRead {
    /// The lead (empty when there is none): its stream tokens dequantized, then its tail tokens.
    fn lead(&self, s: &HeadSide, d: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        if !self.lead_packed.is_empty() {
            let stream = s.packed.as_ref().expect("only quantized sides have packed tokens");
            // Dequantize from the cut point at or before the lead, then keep the lead.
            let align = stream.spec().token_align(d);
            let from = self.lead_packed.start / align * align;
            let view = stream.view().try_prefix(self.lead_packed.end)?.try_suffix(from)?;
            out = vec![0.0; view.tokens * d];
            dequantize(&view, &mut out)?;
            out.drain(..(self.lead_packed.start - from) * d);
        }
        out.extend_from_slice(&s.tail[self.lead_tail.clone()]);
        Ok(out)
    }

    /// The exact leading part the kernel reads: the visible sinks, or the lead.
    fn exact_head<'a>(&self, s: &'a HeadSide, lead: &'a [f32], d: usize) -> &'a [f32] {
        if self.sinks.is_empty() {
            lead
        } else {
            &s.sink[self.sinks.start * d..self.sinks.end * d]
        }
    }

    fn packed_view<'a>(&self, s: &'a HeadSide) -> Result<Option<PackedView<'a>>> {
        s.packed.as_ref().map(|p| Ok(p.view().try_prefix(self.packed.end)?.try_suffix(self.packed.start)?)).transpose()
    }
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
                let (kt, vt) = (l.tokens - l.k[0].dropped, l.tokens - l.v[0].dropped);
                LayerMemory {
                    k_code_bytes: kc,
                    k_meta_bytes: km,
                    k_full_bytes: kf,
                    v_code_bytes: vc,
                    v_meta_bytes: vm,
                    v_full_bytes: vf,
                    tokens: kt.max(vt),
                }
            })
            .collect();
        let elements =
            self.layers.iter().map(|l| (2 * l.tokens - l.k[0].dropped - l.v[0].dropped) * self.shape.kv_row()).sum();
        MemoryReport { layers, elements }
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            l.tokens = 0;
            for s in l.k.iter_mut().chain(l.v.iter_mut()) {
                s.sink.clear();
                s.tail.clear();
                s.dead = 0;
                s.tail_base = l.sinks;
                s.dropped = 0;
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
