//! Fast CPU attention: the fused kernel over packed heads and the f32/f16 baselines.
//!
//! One call handles one KV head and the `n_rep` query heads that share it, so every packed byte is read once per
//! decode step. Two passes: scores for all positions (sink, packed, tail) into a per-thread scratch buffer, a stable
//! softmax, then the value sum. Codes are turned into f32 eight at a time in registers and never written back as
//! dequantized values:
//! - per-channel keys: `s_t = q . min_b + sum_c (q_c * scale_bc) code_ct`, the query scaled once per block;
//! - per-token keys: `s_t = sum_g scale_tg (q_g . code_tg) + min_tg sum(q_g)`;
//! - per-token values: `o += sum_t (p_t scale_tg) code_tg + (p_t min_tg)`;
//! - per-channel values: `o_c += scale_bc (p_b . code_bc) + min_bc sum(p_b)`.
//!
//! Lloyd-Max views (one scale per group, levels looked up from a table) go to the kernels of `codebook`.
//!
//! The portable path (`generic`) runs the same algorithm with scalar loops over codes unpacked block by block into a
//! small byte buffer; the AVX2/FMA path (`avx2`) reads packed bytes straight into vector registers.

use std::cell::RefCell;

use half::f16;

use crate::attn::HeadKv;
use crate::format::GroupAxis;
use crate::pack;
use crate::quant::PackedView;
use crate::simd::{self, SimdLevel};

/// Per-thread scratch buffers reused across calls (scores, scaled queries, accumulators, unpacked codes).
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    qq: Vec<f32>,
    acc: Vec<f32>,
    tmp: Vec<f32>,
    codes: Vec<u8>,
    iq: intdot::IntQuery,
    /// The softmax's maximum score per query row of the last call.
    maxes: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// `n` entries whose old contents stay, for buffers that are written in full before they are read (the scores:
/// no need to zero megabytes at long contexts).
fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    v.truncate(n);
}

/// Attends the `q.len() / d` query heads of one KV head over a checked head. With `stats`, also writes the
/// softmax's maximum score and its sum of `exp(score - max)` per query row (`[max, sum]` pairs), so that attention
/// over parts of the context can be combined.
pub(crate) fn attend_head(
    q: &[f32],
    head: &HeadKv<'_>,
    d: usize,
    scale: f32,
    out: &mut [f32],
    stats: Option<&mut [f32]>,
) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        let level = simd::active();
        #[cfg(target_arch = "x86_64")]
        if level >= SimdLevel::Avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { avx2::attend_head(q, head, d, scale, out, s, stats) };
            return;
        }
        let _ = level;
        generic::attend_head(q, head, d, scale, out, s, stats);
    })
}

/// Baseline attention over f32 keys and values of one KV head.
pub(crate) fn attend_exact_f32(q: &[f32], k: &[f32], v: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let head = HeadKv::exact(k, v);
    attend_head(q, &head, d, scale, out, None);
}

/// Baseline attention over f16 keys and values of one KV head.
pub(crate) fn attend_exact_f16(q: &[f32], k: &[f16], v: &[f16], d: usize, scale: f32, out: &mut [f32]) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        #[cfg(target_arch = "x86_64")]
        if simd::active() >= SimdLevel::Avx2 {
            // SAFETY: AVX2, FMA and F16C were detected at run time (SimdLevel::Avx2 implies all three).
            unsafe { avx2::attend_f16(q, k, v, d, scale, out, s) };
            return;
        }
        generic::attend_f16(q, k, v, d, scale, out, s);
    })
}

/// The middle code `(levels - 1) / 2`. Value sums use centred codes `code - center` and fold `min + center * scale`
/// into the per-group term: with raw codes, the code part and the minimum part of a long value sum are both large
/// and cancel (outputs average many values), which costs several digits in f32.
fn center(bits: crate::format::Bits) -> f32 {
    bits.max_code() as f32 / 2.0
}

/// `[max, sum]` per query row into `stats`, when asked for.
fn write_stats(stats: Option<&mut [f32]>, maxes: &[f32], sums: &[f32]) {
    if let Some(st) = stats {
        for (r, (m, s)) in maxes.iter().zip(sums).enumerate() {
            st[2 * r] = *m;
            st[2 * r + 1] = *s;
        }
    }
}

/// Scales the queries by the softmax scale once.
fn scale_queries(q: &[f32], scale: f32, qq: &mut Vec<f32>) {
    qq.clear();
    qq.extend(q.iter().map(|&x| x * scale));
}

/// Portable fused kernel.
mod generic {
    use super::*;

    pub(super) fn attend_head(
        q: &[f32],
        head: &HeadKv<'_>,
        d: usize,
        scale: f32,
        out: &mut [f32],
        s: &mut Scratch,
        stats: Option<&mut [f32]>,
    ) {
        let n_rep = q.len() / d;
        let t_all = head.tokens(d);
        scale_queries(q, scale, &mut s.qq);
        resize(&mut s.scores, n_rep * t_all);
        let mut pos = 0;
        pos += exact_scores(&s.qq, head.sink_k, d, &mut s.scores, t_all, pos);
        if let Some(k) = &head.k {
            if k.spec.is_codebook() {
                super::codebook::generic::packed_scores(&s.qq, k, &mut s.scores, t_all, pos, &mut s.codes);
            } else {
                packed_scores(&s.qq, k, &mut s.scores, t_all, pos, &mut s.codes, &mut s.tmp);
            }
            pos += k.tokens;
        }
        exact_scores(&s.qq, head.tail_k, d, &mut s.scores, t_all, pos);
        let sums = softmax(&mut s.scores, n_rep, t_all, &mut s.maxes);
        resize(&mut s.acc, n_rep * d);
        let mut pos = 0;
        pos += exact_values(&s.scores, t_all, head.sink_v, d, &mut s.acc, pos);
        if let Some(v) = &head.v {
            if v.spec.is_codebook() {
                super::codebook::generic::packed_values(&s.scores, t_all, v, &mut s.acc, pos, &mut s.codes, &mut s.tmp);
            } else {
                packed_values(&s.scores, t_all, v, &mut s.acc, pos, &mut s.codes, &mut s.tmp);
            }
            pos += v.tokens;
        }
        exact_values(&s.scores, t_all, head.tail_v, d, &mut s.acc, pos);
        write_stats(stats, &s.maxes, &sums);
        for r in 0..n_rep {
            let inv = 1.0 / sums[r];
            for (o, a) in out[r * d..(r + 1) * d].iter_mut().zip(&s.acc[r * d..(r + 1) * d]) {
                *o = a * inv;
            }
        }
    }

    pub(super) fn attend_f16(q: &[f32], k: &[f16], v: &[f16], d: usize, scale: f32, out: &mut [f32], s: &mut Scratch) {
        // The portable baseline converts one token at a time into scratch and reuses the f32 path.
        let n_rep = q.len() / d;
        let t_all = k.len() / d;
        scale_queries(q, scale, &mut s.qq);
        resize(&mut s.scores, n_rep * t_all);
        let mut row = vec![0f32; d];
        for t in 0..t_all {
            for (x, h) in row.iter_mut().zip(&k[t * d..(t + 1) * d]) {
                *x = h.to_f32();
            }
            exact_scores(&s.qq, &row, d, &mut s.scores, t_all, t);
        }
        let sums = softmax(&mut s.scores, n_rep, t_all, &mut s.maxes);
        resize(&mut s.acc, n_rep * d);
        for t in 0..t_all {
            for (x, h) in row.iter_mut().zip(&v[t * d..(t + 1) * d]) {
                *x = h.to_f32();
            }
            exact_values(&s.scores, t_all, &row, d, &mut s.acc, t);
        }
        for r in 0..n_rep {
            for (o, a) in out[r * d..(r + 1) * d].iter_mut().zip(&s.acc[r * d..(r + 1) * d]) {
                *o = a / sums[r];
            }
        }
    }

    /// Scores of full-precision tokens `x` at positions `pos..`; returns the number of tokens.
    pub(super) fn exact_scores(qq: &[f32], x: &[f32], d: usize, scores: &mut [f32], t_all: usize, pos: usize) -> usize {
        let n_rep = qq.len() / d;
        for (t, row) in x.chunks_exact(d).enumerate() {
            for r in 0..n_rep {
                scores[r * t_all + pos + t] = dot(&qq[r * d..(r + 1) * d], row);
            }
        }
        x.len() / d
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for a in acc {
            s += a;
        }
        s
    }

    pub(super) fn packed_scores(
        qq: &[f32],
        view: &PackedView<'_>,
        scores: &mut [f32],
        t_all: usize,
        pos: usize,
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let d = view.head_dim;
        let g = view.spec.group;
        let n_rep = qq.len() / d;
        let bits = view.spec.bits;
        match view.spec.axis {
            GroupAxis::PerChannel => {
                codes.resize(g * d, 0);
                // tmp: scales, minimums, then scaled queries.
                resize(tmp, 2 * d + n_rep * d);
                for b in 0..view.tokens / g {
                    pack::unpack_range(bits, view.codes, b * g * d, codes);
                    let (sm, qs) = tmp.split_at_mut(2 * d);
                    let (sc, mn) = sm.split_at_mut(d);
                    view.scales.read_into(b * d, sc);
                    view.mins.read_into(b * d, mn);
                    for r in 0..n_rep {
                        let qr = &qq[r * d..(r + 1) * d];
                        let mut bias = 0f32;
                        for c in 0..d {
                            qs[r * d + c] = qr[c] * sc[c];
                            bias += qr[c] * mn[c];
                        }
                        let out = &mut scores[r * t_all + pos + b * g..r * t_all + pos + (b + 1) * g];
                        out.fill(bias);
                        for c in 0..d {
                            let w = qs[r * d + c];
                            for (o, &code) in out.iter_mut().zip(&codes[c * g..(c + 1) * g]) {
                                *o += w * code as f32;
                            }
                        }
                    }
                }
            }
            GroupAxis::PerToken => {
                codes.resize(d, 0);
                let ng = d / g;
                // tmp: per-group query sums.
                resize(tmp, n_rep * ng);
                for r in 0..n_rep {
                    for gi in 0..ng {
                        tmp[r * ng + gi] = qq[r * d + gi * g..r * d + (gi + 1) * g].iter().sum();
                    }
                }
                for t in 0..view.tokens {
                    pack::unpack_range(bits, view.codes, t * d, codes);
                    for r in 0..n_rep {
                        let qr = &qq[r * d..(r + 1) * d];
                        let mut s = 0f32;
                        for gi in 0..ng {
                            let mut dq = 0f32;
                            for k in gi * g..(gi + 1) * g {
                                dq += qr[k] * codes[k] as f32;
                            }
                            s += view.scales.get(t * ng + gi) * dq + view.mins.get(t * ng + gi) * tmp[r * ng + gi];
                        }
                        scores[r * t_all + pos + t] = s;
                    }
                }
            }
        }
    }

    /// Turns scores into unnormalised probabilities in place; returns each query's sum, or NaN for a query with a
    /// non-finite score (the caller turns a non-finite output into a typed error).
    pub(super) fn softmax(scores: &mut [f32], n_rep: usize, t_all: usize, maxes: &mut Vec<f32>) -> Vec<f32> {
        maxes.clear();
        (0..n_rep)
            .map(|r| {
                let s = &mut scores[r * t_all..(r + 1) * t_all];
                let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                maxes.push(max);
                // Sum of `x * 0`: NaN exactly when some score is NaN or infinite.
                let probe: f32 = s.iter().map(|&x| x * 0.0).sum();
                let mut sum = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                if probe.is_nan() {
                    f32::NAN
                } else {
                    sum
                }
            })
            .collect()
    }

    pub(super) fn exact_values(p: &[f32], t_all: usize, x: &[f32], d: usize, acc: &mut [f32], pos: usize) -> usize {
        let n_rep = acc.len() / d;
        for (t, row) in x.chunks_exact(d).enumerate() {
            for r in 0..n_rep {
                let w = p[r * t_all + pos + t];
                for (a, &v) in acc[r * d..(r + 1) * d].iter_mut().zip(row) {
                    *a += w * v;
                }
            }
        }
        x.len() / d
    }

    pub(super) fn packed_values(
        p: &[f32],
        t_all: usize,
        view: &PackedView<'_>,
        acc: &mut [f32],
        pos: usize,
        codes: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let d = view.head_dim;
        let g = view.spec.group;
        let n_rep = acc.len() / d;
        let bits = view.spec.bits;
        let c0 = center(bits);
        match view.spec.axis {
            GroupAxis::PerToken => {
                codes.resize(d, 0);
                let ng = d / g;
                for t in 0..view.tokens {
                    pack::unpack_range(bits, view.codes, t * d, codes);
                    for r in 0..n_rep {
                        let pt = p[r * t_all + pos + t];
                        let ar = &mut acc[r * d..(r + 1) * d];
                        for gi in 0..ng {
                            let s = view.scales.get(t * ng + gi);
                            let w = pt * s;
                            let bias = pt * (view.mins.get(t * ng + gi) + c0 * s);
                            for k in gi * g..(gi + 1) * g {
                                ar[k] += w * (codes[k] as f32 - c0) + bias;
                            }
                        }
                    }
                }
            }
            GroupAxis::PerChannel => {
                codes.resize(g * d, 0);
                resize(tmp, 2 * d);
                for b in 0..view.tokens / g {
                    pack::unpack_range(bits, view.codes, b * g * d, codes);
                    let (sc, mn) = tmp.split_at_mut(d);
                    view.scales.read_into(b * d, sc);
                    view.mins.read_into(b * d, mn);
                    for r in 0..n_rep {
                        let pb = &p[r * t_all + pos + b * g..r * t_all + pos + (b + 1) * g];
                        let psum: f32 = pb.iter().sum();
                        for c in 0..d {
                            let mut dot = 0f32;
                            for (&pj, &code) in pb.iter().zip(&codes[c * g..(c + 1) * g]) {
                                dot += pj * (code as f32 - c0);
                            }
                            acc[r * d + c] += sc[c] * dot + (mn[c] + c0 * sc[c]) * psum;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod codebook;
mod intdot;

/// Whether this CPU runs the integer kernels at the active SIMD level (AVX-512 VNNI).
pub(crate) fn int_capable() -> bool {
    simd::active() >= SimdLevel::Avx512 && intdot::vnni()
}

/// Whether per-token values of `spec` go to the integer value tile now: under `AttnKernel::IntDot`, on AVX-512
/// VNNI and VBMI.
pub(crate) fn int_values(spec: &crate::format::QuantSpec, head_dim: usize) -> bool {
    crate::attn::attn_kernel() == crate::attn::AttnKernel::IntDot
        && int_capable()
        && intdot::vbmi()
        && intdot::takes_values(spec, head_dim)
}

/// The query digits of the integer-dot kernel that scores keys of `spec` now, 0 for the exact kernel (see
/// [`crate::attn::AttnKernel`]).
pub(crate) fn int_keys(spec: &crate::format::QuantSpec, head_dim: usize) -> usize {
    let digits = match crate::attn::attn_kernel() {
        crate::attn::AttnKernel::Exact => return 0,
        crate::attn::AttnKernel::IntDot8 => 1,
        crate::attn::AttnKernel::IntDot => 2,
    };
    if int_capable() && intdot::takes_spec(spec, head_dim) {
        digits
    } else {
        0
    }
}
