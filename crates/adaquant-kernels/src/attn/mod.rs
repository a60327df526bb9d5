//! One decode step of grouped-query attention over a KV cache made of full-precision sink tokens, packed history and
//! a full-precision tail, plus f32 and f16 baselines over unquantized keys and values.
//!
//! The fused kernel ([`decode_attention`]) never materializes the dequantized history (DESIGN.md, performance
//! principles): scores come straight from codes with the per-group scale folded into the query, and the value sum
//! folds scale and minimum into the probabilities. [`decode_attention_ref`] is its reference twin: it dequantizes
//! everything and runs plain attention in f64.

mod cpu;
mod reference;

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::{check_finite, MetaView, PackedView};

pub use reference::attention_ref;

/// How the fused kernel scores packed per-token min-max keys.
///
/// The integer kernels quantize the scaled query once per step per key group and multiply the key codes in integer
/// arithmetic (`vpdpbusd`, AVX-512 VNNI), as llama.cpp does for its quantized K cache: `IntDot8` with an 8-bit query
/// (`dq = max|q_g| / 127`, llama.cpp's choice), `IntDot` (the default) with a 15-bit query held as two 8-bit digits
/// (`dq = max|q_g| / 16256`, two integer products per code). Per group the score error is at most
/// `scale * dq / 2 * sum |code - max_code / 2|`. `Exact` is the f32 kernel (the reference the fused kernel is
/// tested against to 1e-5). Keys the integer kernels do not take (per-channel groups, Lloyd-Max levels, codes of
/// fewer than 4 bits or of 5 or 6 bits, groups whose codes do not fill 16-byte chunks) and CPUs without VNNI use
/// `Exact` whatever the setting. On SmolLM2's WikiText-2 windows the two-digit query moves a K4V2 cache's
/// next-token distributions by a mean KL of 1.7e-5 against `Exact`, the 8-bit one by 8e-4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnKernel {
    /// f32 products of the query with every code.
    Exact,
    /// 8-bit query per key group, integer products with the codes.
    IntDot8,
    /// 15-bit query per key group in two 8-bit digits, integer products with the codes.
    IntDot,
}

impl AttnKernel {
    /// Stable lower-case name (`exact`, `int8`, `int`), as `ADAQUANT_ATTN` takes it.
    pub fn name(self) -> &'static str {
        match self {
            AttnKernel::Exact => "exact",
            AttnKernel::IntDot8 => "int8",
            AttnKernel::IntDot => "int",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            AttnKernel::Exact => 1,
            AttnKernel::IntDot8 => 2,
            AttnKernel::IntDot => 3,
        }
    }
}

/// 0: not yet read from the environment; otherwise `AttnKernel::to_u8`.
static ATTN_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The key-score kernel asked for: [`set_attn_kernel`]'s choice, else `ADAQUANT_ATTN` (`exact`, `int8` or `int`;
/// unset or anything else: `int`).
pub fn attn_kernel() -> AttnKernel {
    use std::sync::atomic::Ordering;
    let mut v = ATTN_KERNEL.load(Ordering::Relaxed);
    if v == 0 {
        let from_env = match std::env::var("ADAQUANT_ATTN").ok().as_deref().map(str::trim) {
            Some("exact") => AttnKernel::Exact,
            Some("int8") => AttnKernel::IntDot8,
            _ => AttnKernel::IntDot,
        };
        // Another thread may have chosen meanwhile; keep its choice.
        let _ = ATTN_KERNEL.compare_exchange(0, from_env.to_u8(), Ordering::Relaxed, Ordering::Relaxed);
        v = ATTN_KERNEL.load(Ordering::Relaxed);
    }
    match v {
        1 => AttnKernel::Exact,
        2 => AttnKernel::IntDot8,
        _ => AttnKernel::IntDot,
    }
}

/// Chooses the key-score kernel for the whole process (`None`: back to `ADAQUANT_ATTN`).
pub fn set_attn_kernel(kernel: Option<AttnKernel>) {
    ATTN_KERNEL.store(kernel.map_or(0, AttnKernel::to_u8), std::sync::atomic::Ordering::Relaxed);
}

/// The kernel that per-token min-max groups get on this CPU now: [`attn_kernel`] where the CPU has AVX-512 VNNI
/// at the active SIMD level, `Exact` elsewhere (what a results file should record).
pub fn effective_attn_kernel() -> AttnKernel {
    if cpu::int_capable() {
        attn_kernel()
    } else {
        AttnKernel::Exact
    }
}

/// The kernel that scores keys of this spec on this CPU now: an integer one only where [`attn_kernel`] asks for
/// it, the keys qualify and the CPU has AVX-512 VNNI at the active SIMD level.
pub fn key_kernel_for(spec: &crate::format::QuantSpec, head_dim: usize) -> AttnKernel {
    match cpu::int_keys(spec, head_dim) {
        0 => AttnKernel::Exact,
        1 => AttnKernel::IntDot8,
        _ => AttnKernel::IntDot,
    }
}

/// Everything one KV head holds, in position order: keys = `sink_k ++ k (packed) ++ tail_k`; values =
/// `sink_v ++ v (packed) ++ tail_v`. Exact parts are `[tokens][head_dim]` f32. K and V may have different
/// packed/tail splits (for example per-channel keys flush in blocks of G tokens, per-token values token by token)
/// but the same total length; sinks are the same for both.
#[derive(Clone, Copy, Debug)]
pub struct HeadKv<'a> {
    pub sink_k: &'a [f32],
    pub sink_v: &'a [f32],
    pub k: Option<PackedView<'a>>,
    pub v: Option<PackedView<'a>>,
    pub tail_k: &'a [f32],
    pub tail_v: &'a [f32],
}

impl<'a> HeadKv<'a> {
    /// A head held entirely in full precision (no packed part, no sinks).
    pub fn exact(k: &'a [f32], v: &'a [f32]) -> HeadKv<'a> {
        HeadKv { sink_k: &[], sink_v: &[], k: None, v: None, tail_k: k, tail_v: v }
    }

    /// A head held entirely in packed form (no sinks, no exact tail).
    pub fn packed(k: PackedView<'a>, v: PackedView<'a>) -> HeadKv<'a> {
        HeadKv { sink_k: &[], sink_v: &[], k: Some(k), v: Some(v), tail_k: &[], tail_v: &[] }
    }

    /// Total tokens of keys (equal to values' for a valid head).
    pub fn tokens(&self, head_dim: usize) -> usize {
        (self.sink_k.len() + self.tail_k.len()) / head_dim.max(1) + self.k.map_or(0, |v| v.tokens)
    }

    /// Checks the parts against each other and returns the total number of tokens.
    pub fn check(&self, head: usize, head_dim: usize) -> Result<usize> {
        let d = head_dim;
        let whole = |what: &'static str, x: &[f32]| -> Result<usize> {
            if !x.len().is_multiple_of(d) {
                return Err(Error::ShapeMismatch { what, expected: x.len() / d * d, got: x.len() });
            }
            Ok(x.len() / d)
        };
        let sink = whole("sink keys ([tokens][head_dim])", self.sink_k)?;
        let sink_v = whole("sink values ([tokens][head_dim])", self.sink_v)?;
        if sink != sink_v {
            return Err(Error::KvLengthMismatch { head, k_tokens: sink, v_tokens: sink_v });
        }
        let tail_k = whole("tail keys ([tokens][head_dim])", self.tail_k)?;
        let tail_v = whole("tail values ([tokens][head_dim])", self.tail_v)?;
        let packed = |view: &Option<PackedView<'_>>| -> Result<usize> {
            match view {
                None => Ok(0),
                Some(v) => {
                    if v.head_dim != d {
                        return Err(Error::BadView { what: "head_dim of a packed view", expected: d, got: v.head_dim });
                    }
                    v.check()?;
                    Ok(v.tokens)
                }
            }
        };
        let k_tokens = sink + packed(&self.k)? + tail_k;
        let v_tokens = sink + packed(&self.v)? + tail_v;
        if k_tokens != v_tokens {
            return Err(Error::KvLengthMismatch { head, k_tokens, v_tokens });
        }
        if k_tokens == 0 {
            return Err(Error::EmptyContext);
        }
        Ok(k_tokens)
    }
}

/// Checks the shapes of one decode step and returns the number of query heads per KV head.
fn check_step(q: &[f32], n_kv: usize, head_dim: usize, out: &[f32]) -> Result<usize> {
    if head_dim == 0 {
        return Err(Error::ShapeMismatch { what: "head_dim (must be positive)", expected: 1, got: 0 });
    }
    if !q.len().is_multiple_of(head_dim) || q.is_empty() {
        return Err(Error::ShapeMismatch {
            what: "query ([n_q_heads][head_dim])",
            expected: (q.len() / head_dim).max(1) * head_dim,
            got: q.len(),
        });
    }
    if out.len() != q.len() {
        return Err(Error::ShapeMismatch { what: "output ([n_q_heads][head_dim])", expected: q.len(), got: out.len() });
    }
    let n_q = q.len() / head_dim;
    if n_kv == 0 || !n_q.is_multiple_of(n_kv) {
        return Err(Error::BadGqa { n_q_heads: n_q, n_kv_heads: n_kv });
    }
    check_finite("query", q)?;
    Ok(n_q / n_kv)
}

/// The first non-finite element of one KV head's keys and values: (part, index, value).
fn first_non_finite(head: &HeadKv<'_>) -> Option<(&'static str, usize, f32)> {
    let exact = |part: &'static str, x: &[f32]| x.iter().position(|v| !v.is_finite()).map(|i| (part, i, x[i]));
    let meta = |part: &'static str, m: MetaView<'_>| {
        (0..m.len()).map(|i| (i, m.get(i))).find(|(_, v)| !v.is_finite()).map(|(i, v)| (part, i, v))
    };
    let packed = |scales: &'static str, mins: &'static str, view: &Option<PackedView<'_>>| {
        view.as_ref().and_then(|v| meta(scales, v.scales).or_else(|| meta(mins, v.mins)))
    };
    exact("sink keys", head.sink_k)
        .or_else(|| packed("packed key scales", "packed key minimums", &head.k))
        .or_else(|| exact("tail keys", head.tail_k))
        .or_else(|| exact("sink values", head.sink_v))
        .or_else(|| packed("packed value scales", "packed value minimums", &head.v))
        .or_else(|| exact("tail values", head.tail_v))
}

/// The first non-finite element of the unquantized keys and values of one KV head of a baseline.
fn first_non_finite_exact(k: &[f32], v: &[f32]) -> Option<(&'static str, usize, f32)> {
    let find = |part: &'static str, x: &[f32]| x.iter().position(|e| !e.is_finite()).map(|i| (part, i, x[i]));
    find("keys", k).or_else(|| find("values", v))
}

/// The error for KV head `kv_head` whose outputs came out non-finite: the first non-finite input, or an overflow.
fn explain(kv_head: usize, found: Option<(&'static str, usize, f32)>) -> Error {
    match found {
        Some((part, index, value)) => Error::NonFiniteKv { kv_head, part, index, value },
        None => Error::AttentionOverflow { kv_head },
    }
}

/// Checks the outputs of a fused or baseline step, KV head by KV head in order, so that the error names the first
/// bad head whatever the thread schedule. Non-finite inputs and overflowing scores reach the output at every SIMD
/// level (the softmax turns a non-finite score into a NaN row sum), so this one pass over `n_q_heads * head_dim`
/// values replaces checking every key and value on every step; the inputs are searched only to explain an error.
fn check_outputs(
    out: &[f32],
    n_rep: usize,
    d: usize,
    find: impl Fn(usize) -> Option<(&'static str, usize, f32)>,
) -> Result<()> {
    // Summing `x * 0` is NaN exactly when some element is non-finite, and it vectorizes.
    let probe: f32 = out.iter().map(|&v| v * 0.0).sum();
    if !probe.is_nan() {
        return Ok(());
    }
    let h = out.chunks(n_rep * d).position(|o| o.iter().any(|v| !v.is_finite())).unwrap_or(0);
    Err(explain(h, find(h)))
}

fn check_heads(heads: &[HeadKv<'_>], head_dim: usize) -> Result<()> {
    for (h, head) in heads.iter().enumerate() {
        head.check(h, head_dim)?;
    }
    Ok(())
}

/// One decode step of grouped-query attention: `q` is `[n_q_heads][head_dim]`, `heads.len()` is `n_kv_heads`,
/// `out` is `[n_q_heads][head_dim]`. Query head `i` attends to KV head `i / (n_q_heads / n_kv_heads)`.
/// Reference twin of [`decode_attention`]: dequantizes each head, then plain attention in f64.
pub fn decode_attention_ref(
    q: &[f32],
    heads: &[HeadKv<'_>],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_step(q, heads.len(), head_dim, out)?;
    check_heads(heads, head_dim)?;
    for (h, head) in heads.iter().enumerate() {
        if let Some(found) = first_non_finite(head) {
            return Err(explain(h, Some(found)));
        }
    }
    let d = head_dim;
    for (h, head) in heads.iter().enumerate() {
        let (k, v) = reference::materialize(head, d)?;
        let rows = h * n_rep * d..(h + 1) * n_rep * d;
        attention_ref(&q[rows.clone()], &[&k], &[&v], d, softmax_scale, &mut out[rows])?;
    }
    Ok(())
}

/// One decode step of grouped-query attention over packed KV heads, fused (codes are never dequantized into a
/// buffer), SIMD chosen at run time, rayon over KV heads. Same arguments as [`decode_attention_ref`].
pub fn decode_attention(
    q: &[f32],
    heads: &[HeadKv<'_>],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_step(q, heads.len(), head_dim, out)?;
    check_heads(heads, head_dim)?;
    let d = head_dim;
    let split = split_heads(heads, d);
    if let Some(parts) = &split {
        let mut po = vec![0f32; parts.len() * n_rep * d];
        let mut ps = vec![0f32; parts.len() * n_rep * 2];
        po.par_chunks_mut(n_rep * d).zip(ps.par_chunks_mut(n_rep * 2)).zip(parts.par_iter()).for_each(
            |((o, st), (h, part))| {
                cpu::attend_head(&q[h * n_rep * d..(h + 1) * n_rep * d], part, d, softmax_scale, o, Some(st));
            },
        );
        merge_parts(parts, &po, &ps, n_rep, d, out);
    } else {
        q.par_chunks(n_rep * d).zip(out.par_chunks_mut(n_rep * d)).zip(heads.par_iter()).for_each(
            |((qh, oh), head)| {
                cpu::attend_head(qh, head, d, softmax_scale, oh, None);
            },
        );
    }
    check_outputs(out, n_rep, d, |h| first_non_finite(&heads[h]))
}

/// The fused kernel of [`decode_attention`] without rayon, for callers that parallelise over queries themselves.
pub fn decode_attention_serial(
    q: &[f32],
    heads: &[HeadKv<'_>],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_step(q, heads.len(), head_dim, out)?;
    check_heads(heads, head_dim)?;
    let d = head_dim;
    let split = split_heads(heads, d);
    if let Some(parts) = &split {
        let mut po = vec![0f32; parts.len() * n_rep * d];
        let mut ps = vec![0f32; parts.len() * n_rep * 2];
        for ((o, st), (h, part)) in po.chunks_mut(n_rep * d).zip(ps.chunks_mut(n_rep * 2)).zip(parts) {
            cpu::attend_head(&q[h * n_rep * d..(h + 1) * n_rep * d], part, d, softmax_scale, o, Some(st));
        }
        merge_parts(parts, &po, &ps, n_rep, d, out);
    } else {
        for ((qh, oh), head) in q.chunks(n_rep * d).zip(out.chunks_mut(n_rep * d)).zip(heads) {
            cpu::attend_head(qh, head, d, softmax_scale, oh, None);
        }
    }
    check_outputs(out, n_rep, d, |h| first_non_finite(&heads[h]))
}

/// Context positions per part above which a KV head's attention is split into parts (at most [`MAX_PARTS`]) that
/// run as separate tasks and are combined by their softmax statistics (flash-decoding's split of the context): a
/// model with fewer KV heads than twice the threads would otherwise leave threads idle (SmolLM2: 3 KV heads on 2
/// threads). The split depends only on the heads, never on the thread count, so results do not either.
pub const PART_TOKENS: usize = 1024;

/// The most parts one KV head is split into.
pub const MAX_PARTS: usize = 8;

/// The parts of every head, in head order: `(head index, part)`, or `None` when no head is split. A head shorter than `2 * PART_TOKENS` packed (or,
/// without packed parts, exact) tokens stays whole. Cut points lie where both sides are packed, on multiples of
/// both sides' [`crate::QuantSpec::token_align`], or anywhere inside exact tails.
fn split_heads<'a>(heads: &[HeadKv<'a>], d: usize) -> Option<Vec<(usize, HeadKv<'a>)>> {
    // Most calls split nothing: decide that before allocating.
    if heads.iter().all(|head| plan(head, d).2 < 2) {
        return None;
    }
    let mut parts = Vec::with_capacity(heads.len());
    for (h, head) in heads.iter().enumerate() {
        let (limit, align, n, total) = plan(head, d);
        let cuts: Vec<usize> = (1..n).map(|j| j * limit / n / align * align).filter(|&c| c > 0).collect();
        if cuts.is_empty() {
            parts.push((h, *head));
            continue;
        }
        let mut mine = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for end in cuts.iter().copied().chain([total]) {
            if end <= start {
                continue;
            }
            let (Some((k, tail_k)), Some((v, tail_v))) =
                (cut(head.k, head.tail_k, d, start, end), cut(head.v, head.tail_v, d, start, end))
            else {
                // Not reached for checked heads (cut points are aligned); attend the head whole rather than fail.
                mine.clear();
                break;
            };
            let (sink_k, sink_v) = if start == 0 { (head.sink_k, head.sink_v) } else { (&[][..], &[][..]) };
            mine.push((h, HeadKv { sink_k, sink_v, k, v, tail_k, tail_v }));
            start = end;
        }
        if mine.is_empty() {
            parts.push((h, *head));
        } else {
            parts.append(&mut mine);
        }
    }
    (parts.len() > heads.len()).then_some(parts)
}

/// How one head would be cut: the stretch after the sinks where both sides can be cut, the alignment there, the
/// number of parts and the tokens after the sinks.
fn plan(head: &HeadKv<'_>, d: usize) -> (usize, usize, usize, usize) {
    let total = head.tokens(d) - head.sink_k.len() / d;
    let (limit, align) = match (&head.k, &head.v) {
        (None, None) => (total, 1),
        (k, v) => {
            let lim = [k, v].iter().filter_map(|x| x.as_ref().map(|x| x.tokens)).min().unwrap_or(total);
            let al = [k, v].iter().filter_map(|x| x.as_ref().map(|x| x.spec.token_align(d))).fold(1, lcm);
            (lim, al)
        }
    };
    (limit, align, (limit / PART_TOKENS).min(MAX_PARTS), total)
}

fn lcm(a: usize, b: usize) -> usize {
    a / crate::format::gcd(a, b) * b
}

/// Positions `a..b` (after the sinks) of one side: a packed view of `packed` tokens followed by an exact tail.
/// Cut points inside the packed view are aligned by the caller; `None` if a view refuses one.
type Side<'a> = (Option<PackedView<'a>>, &'a [f32]);
fn cut<'a>(packed: Option<PackedView<'a>>, tail: &'a [f32], d: usize, a: usize, b: usize) -> Option<Side<'a>> {
    let p = packed.map_or(0, |v| v.tokens);
    let view = match packed {
        Some(v) if a < p => Some(v.try_suffix(a).and_then(|s| s.try_prefix(b.min(p) - a)).ok()?),
        _ => None,
    };
    Some((view, tail.get((a.max(p) - p) * d..(b.max(p) - p) * d)?))
}

/// Combines the parts' outputs (each normalized by its own softmax sum) by their statistics: with `m` the largest
/// maximum, part `i` weighs `w_i = sum_i exp(max_i - m)`, and a head's output is `sum_i w_i o_i / sum_i w_i`, parts
/// in position order.
fn merge_parts(parts: &[(usize, HeadKv<'_>)], po: &[f32], ps: &[f32], n_rep: usize, d: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < parts.len() {
        let h = parts[i].0;
        let n = parts[i..].iter().take_while(|p| p.0 == h).count();
        for r in 0..n_rep {
            let stat = |j: usize| (ps[(i + j) * n_rep * 2 + 2 * r], ps[(i + j) * n_rep * 2 + 2 * r + 1]);
            let m = (0..n).map(|j| stat(j).0).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(h * n_rep + r) * d..(h * n_rep + r + 1) * d];
            o.fill(0.0);
            let mut total = 0f32;
            for j in 0..n {
                let (mj, sj) = stat(j);
                let w = sj * (mj - m).exp();
                total += w;
                let src = &po[((i + j) * n_rep + r) * d..((i + j) * n_rep + r + 1) * d];
                for (a, b) in o.iter_mut().zip(src) {
                    *a += w * b;
                }
            }
            let inv = 1.0 / total;
            for a in o.iter_mut() {
                *a *= inv;
            }
        }
        i += n;
    }
}

fn check_baseline<T>(q: &[f32], keys: &[&[T]], values: &[&[T]], head_dim: usize, out: &[f32]) -> Result<usize> {
    let n_rep = check_step(q, keys.len(), head_dim, out)?;
    if values.len() != keys.len() {
        return Err(Error::ShapeMismatch { what: "value heads", expected: keys.len(), got: values.len() });
    }
    for (h, (k, v)) in keys.iter().zip(values).enumerate() {
        if !k.len().is_multiple_of(head_dim) {
            return Err(Error::ShapeMismatch {
                what: "keys ([tokens][head_dim])",
                expected: k.len() / head_dim * head_dim,
                got: k.len(),
            });
        }
        if k.len() != v.len() {
            return Err(Error::KvLengthMismatch {
                head: h,
                k_tokens: k.len() / head_dim,
                v_tokens: v.len() / head_dim,
            });
        }
        if k.is_empty() {
            return Err(Error::EmptyContext);
        }
    }
    Ok(n_rep)
}

/// Baseline decode attention over unquantized f32 keys and values (`[tokens][head_dim]` per KV head), with the same
/// care as the fused kernel (SIMD, two passes, rayon over KV heads).
pub fn attention_f32(
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_baseline(q, keys, values, head_dim, out)?;
    let d = head_dim;
    q.par_chunks(n_rep * d).zip(out.par_chunks_mut(n_rep * d)).zip(keys.par_iter().zip(values.par_iter())).for_each(
        |((qh, oh), (k, v))| {
            cpu::attend_exact_f32(qh, k, v, d, softmax_scale, oh);
        },
    );
    check_outputs(out, n_rep, d, |h| first_non_finite_exact(keys[h], values[h]))
}

/// Baseline decode attention over unquantized f16 keys and values (`[tokens][head_dim]` per KV head); see
/// [`attention_f32`].
pub fn attention_f16(
    q: &[f32],
    keys: &[&[f16]],
    values: &[&[f16]],
    head_dim: usize,
    softmax_scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let n_rep = check_baseline(q, keys, values, head_dim, out)?;
    let d = head_dim;
    q.par_chunks(n_rep * d).zip(out.par_chunks_mut(n_rep * d)).zip(keys.par_iter().zip(values.par_iter())).for_each(
        |((qh, oh), (k, v))| {
            cpu::attend_exact_f16(qh, k, v, d, softmax_scale, oh);
        },
    );
    check_outputs(out, n_rep, d, |h| {
        let find =
            |part: &'static str, x: &[f16]| x.iter().position(|v| !v.is_finite()).map(|i| (part, i, x[i].to_f32()));
        find("keys", keys[h]).or_else(|| find("values", values[h]))
    })
}
