//! Decode-faithful text metrics: perplexity, KL divergence from the full-precision cache, top-1 agreement.
//!
//! Every number goes through the cache's `append_attend`: a window is one forward whose queries see the cache as
//! step-by-step decoding would (older tokens dequantized through the fused kernel, residual window and sinks exact).
//! [`window_logprobs`] is that parallel evaluator; [`window_logprobs_stepwise`] is its slow twin, feeding one token
//! per forward, and the tests hold them equal to 1e-4 in log-probability on every cache layout.
//!
//! Perplexity follows llama.cpp's `perplexity` protocol: the token stream is cut into non-overlapping windows of
//! `ctx` tokens, the first `ctx / 2` positions are context only, and positions `ctx / 2 .. ctx - 1` each predict the
//! next token (`ctx / 2 - 1` scored tokens per window).
//!
//! The full-precision reference is computed once per window and shared by every sweep point ([`Reference`]).
//! With `topk = 0` it keeps each scored position's whole log-probability row (exact KL, `4 * vocab` bytes a token);
//! otherwise it keeps the `topk` most likely tokens and lumps the rest of the vocabulary into one "other" outcome.
//! KL over that coarsened distribution is a lower bound of the exact KL (the log-sum inequality), and the gap is the
//! KL hidden inside the tail mass, which is small when the tail mass is small; perplexity and top-1 agreement stay
//! exact either way.

use std::time::Instant;

use adaquant_cache::config::{Precision, QuantCacheConfig};
use adaquant_cache::KvCache;
use adaquant_kernels::GroupAxis;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::lm::LanguageModel;

/// Writes the log-softmax of `row` into `out` and returns the log-sum-exp. Sums run in f64.
pub fn log_softmax(row: &[f32], out: &mut [f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lse = m + s.ln() as f32;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = x - lse;
    }
    lse
}

/// Index of the largest element (the first one on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probability rows of `rows` logits rows, in place.
fn log_softmax_rows(logits: &mut [f32], vocab: usize) {
    logits.par_chunks_mut(vocab).for_each(|row| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let lse = m + s.ln() as f32;
        row.iter_mut().for_each(|x| *x -= lse);
    });
}

/// The parallel evaluator: clears `cache`, runs `window` through it in one forward and returns the log-probability
/// rows of positions `first..window.len()`, `[window.len() - first][vocab]`.
pub fn window_logprobs(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    window: &[u32],
    first: usize,
) -> Result<Vec<f32>> {
    cache.clear();
    let mut logits = lm.forward(window, cache, first)?;
    log_softmax_rows(&mut logits, lm.vocab());
    Ok(logits)
}

/// The slow twin of [`window_logprobs`]: one forward per token, exactly as decoding runs.
pub fn window_logprobs_stepwise(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    window: &[u32],
    first: usize,
) -> Result<Vec<f32>> {
    cache.clear();
    let mut out = Vec::with_capacity((window.len() - first.min(window.len())) * lm.vocab());
    for (p, &t) in window.iter().enumerate() {
        let logits = lm.forward(&[t], cache, 0)?;
        if p >= first {
            out.extend_from_slice(&logits);
        }
    }
    log_softmax_rows(&mut out, lm.vocab());
    Ok(out)
}

/// Settings of a perplexity / KL evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextEvalSpec {
    /// Window length in tokens.
    pub ctx: usize,
    /// Number of windows (taken from the start of the token stream).
    pub windows: usize,
    /// Top-k kept of the reference distribution (0 = the whole row, exact KL).
    pub topk: usize,
}

impl TextEvalSpec {
    /// First scored position of a window (llama.cpp: half the window).
    pub fn first(&self) -> usize {
        self.ctx / 2
    }

    /// Scored tokens per window.
    pub fn scored_per_window(&self) -> usize {
        self.ctx - self.first() - 1
    }

    /// The windows of `tokens` this spec evaluates; an error if the stream is too short.
    pub fn windows<'a>(&self, tokens: &'a [u32]) -> Result<Vec<&'a [u32]>> {
        if self.ctx < 4 {
            return Err(EvalError::BadRequest(format!("--ctx {} is too small; use at least 4", self.ctx)));
        }
        if self.windows == 0 {
            return Err(EvalError::BadRequest("--windows must be at least 1".into()));
        }
        let available = tokens.len() / self.ctx;
        if available < self.windows {
            return Err(EvalError::BadRequest(format!(
                "{} windows of {} tokens need {} tokens, the text has {} (at most {available} windows)",
                self.windows,
                self.ctx,
                self.windows * self.ctx,
                tokens.len()
            )));
        }
        Ok(tokens.chunks_exact(self.ctx).take(self.windows).collect())
    }
}

/// The smallest number of tokens at which a side with these settings holds a quantized token: per-token groups
/// flush one token as soon as `sinks + residual` are exceeded, per-channel groups wait for a whole group of tokens
/// beyond them (see [`Precision::quantized_tokens`], which [`first_quantized_len_ref`] searches).
pub fn first_quantized_len(axis: GroupAxis, group: usize, residual: usize, sinks: usize) -> usize {
    match axis {
        GroupAxis::PerToken => sinks + residual + 1,
        GroupAxis::PerChannel => sinks + residual + group.max(1),
    }
}

/// Slow twin of [`first_quantized_len`]: the first length at which [`Precision::quantized_tokens`] is non-zero,
/// found by trying every length up to `limit` (`None` when none is).
pub fn first_quantized_len_ref(p: &Precision, residual: usize, sinks: usize, limit: usize) -> Option<usize> {
    (0..=limit).find(|&t| p.quantized_tokens(t, residual, sinks) > 0)
}

/// The smallest cache length at which any layer of `config` holds a quantized key or value (`None` when every
/// side is unquantized).
pub fn config_first_quantized_len(config: &QuantCacheConfig) -> Option<usize> {
    config
        .layers
        .iter()
        .flat_map(|l| [l.k, l.v])
        .filter_map(|p| p.spec().map(|s| first_quantized_len(s.axis, s.group, config.residual, config.sinks)))
        .min()
}

impl TextEvalSpec {
    /// Scored positions per window whose history holds at least one quantized token, for a cache that first
    /// quantizes a token at length `first_len` (`None`: never). Position `p` of a window is scored with `p + 1`
    /// tokens in the cache (decode-faithful), so it sees a quantized token when `p + 1 >= first_len`.
    /// With 0 the cache behaved exactly like the full-precision one: the exact window and sinks covered the whole
    /// window.
    pub fn scored_with_quantized_history(&self, first_len: Option<usize>) -> usize {
        let Some(len) = first_len else { return 0 };
        let end = self.first() + self.scored_per_window();
        end.saturating_sub(self.first().max(len.saturating_sub(1)))
    }
}

/// The reference distribution of the scored positions of one window.
#[derive(Clone, Debug)]
pub enum RefDist {
    /// Whole log-probability rows, `[n][vocab]`.
    Full(Vec<f32>),
    /// The `k` most likely token ids and their log-probabilities, `[n][k]` each.
    TopK { k: usize, ids: Vec<u32>, logp: Vec<f32> },
}

/// Full-precision results of one window.
#[derive(Clone, Debug)]
pub struct WindowRef {
    /// Log-probability of the true next token at each scored position.
    pub target_logp: Vec<f32>,
    /// Most likely next token at each scored position.
    pub argmax: Vec<u32>,
    pub dist: RefDist,
}

/// The full-precision reference shared by every sweep point.
#[derive(Clone, Debug)]
pub struct Reference {
    pub spec: TextEvalSpec,
    pub vocab: usize,
    pub windows: Vec<WindowRef>,
    /// Metrics of the full-precision cache itself (KL 0, top-1 agreement 1).
    pub metrics: TextMetrics,
}

impl Reference {
    /// Bytes held by the stored distributions.
    pub fn bytes(&self) -> usize {
        self.windows
            .iter()
            .map(|w| match &w.dist {
                RefDist::Full(v) => v.len() * 4,
                RefDist::TopK { ids, logp, .. } => ids.len() * 4 + logp.len() * 4,
            })
            .sum()
    }
}

/// Per-point text metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TextMetrics {
    pub ppl: f64,
    /// Standard error of the perplexity (ppl times the standard error of the mean negative log-likelihood).
    pub ppl_stderr: f64,
    pub nll_mean: f64,
    pub kl_mean: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Fraction of scored positions whose most likely token equals the full-precision one.
    pub top1: f64,
    pub scored_tokens: usize,
    /// Tokens run through the model (context and scored).
    pub processed_tokens: usize,
    /// KV bytes held after one whole window, from the cache's own accounting.
    pub kv_bytes: usize,
    /// Bits per stored K/V element after one whole window.
    pub bits_per_element: f64,
    pub wall_s: f64,
    /// Processed tokens per second of wall time (forward, log-softmax and scoring).
    pub tokens_per_s: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn nll_summary(nll: &[f64]) -> (f64, f64, f64) {
    let n = nll.len().max(1) as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    (ppl, ppl * (var / n).sqrt(), mean)
}

/// KL(ref || quant) at one position, from the stored reference row and the quantized log-probability row.
pub fn kl_at(dist: &RefDist, row_index: usize, quant_logp: &[f32]) -> f64 {
    match dist {
        RefDist::Full(all) => {
            let vocab = quant_logp.len();
            let p = &all[row_index * vocab..(row_index + 1) * vocab];
            p.iter().zip(quant_logp).map(|(&lp, &lq)| (lp as f64).exp() * (lp as f64 - lq as f64)).sum::<f64>().max(0.0)
        }
        RefDist::TopK { k, ids, logp } => {
            let ids = &ids[row_index * k..(row_index + 1) * k];
            let lps = &logp[row_index * k..(row_index + 1) * k];
            let (mut kl, mut p_in, mut q_in) = (0.0f64, 0.0f64, 0.0f64);
            for (&id, &lp) in ids.iter().zip(lps) {
                let lq = quant_logp[id as usize] as f64;
                let p = (lp as f64).exp();
                kl += p * (lp as f64 - lq);
                p_in += p;
                q_in += lq.exp();
            }
            let p_rest = (1.0 - p_in).max(0.0);
            let q_rest = (1.0 - q_in).max(1e-30);
            if p_rest > 0.0 {
                kl += p_rest * (p_rest.ln() - q_rest.ln());
            }
            kl.max(0.0)
        }
    }
}

/// Runs the full-precision cache over every window and stores what the sweep points are compared against.
pub fn build_reference(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    windows: &[&[u32]],
    spec: &TextEvalSpec,
    progress: &mut dyn FnMut(usize),
) -> Result<Reference> {
    let start = Instant::now();
    let (vocab, first, scored) = (lm.vocab(), spec.first(), spec.scored_per_window());
    let mut refs = Vec::with_capacity(windows.len());
    let mut nll = Vec::with_capacity(windows.len() * scored);
    let mut mem = None;
    for w in windows {
        let lp = window_logprobs(lm, cache, w, first)?;
        mem.get_or_insert_with(|| cache.memory());
        let mut target_logp = Vec::with_capacity(scored);
        let mut am = Vec::with_capacity(scored);
        for r in 0..scored {
            let row = &lp[r * vocab..(r + 1) * vocab];
            target_logp.push(row[w[first + r + 1] as usize]);
            am.push(argmax(row));
        }
        nll.extend(target_logp.iter().map(|&x| -(x as f64)));
        let dist = if spec.topk == 0 || spec.topk >= vocab {
            let mut lp = lp;
            lp.truncate(scored * vocab);
            RefDist::Full(lp)
        } else {
            let k = spec.topk;
            let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..scored)
                .into_par_iter()
                .map(|r| {
                    let row = &lp[r * vocab..(r + 1) * vocab];
                    let mut idx: Vec<u32> = (0..vocab as u32).collect();
                    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                    idx.truncate(k);
                    let l = idx.iter().map(|&i| row[i as usize]).collect();
                    (idx, l)
                })
                .collect();
            let mut ids = Vec::with_capacity(scored * k);
            let mut logp = Vec::with_capacity(scored * k);
            for (i, l) in rows {
                ids.extend(i);
                logp.extend(l);
            }
            RefDist::TopK { k, ids, logp }
        };
        refs.push(WindowRef { target_logp, argmax: am, dist });
        progress(w.len());
    }
    let (ppl, ppl_stderr, nll_mean) = nll_summary(&nll);
    let mem = mem.unwrap_or_default();
    let wall_s = start.elapsed().as_secs_f64();
    let processed: usize = windows.iter().map(|w| w.len()).sum();
    let metrics = TextMetrics {
        ppl,
        ppl_stderr,
        nll_mean,
        kl_mean: 0.0,
        kl_p99: 0.0,
        kl_max: 0.0,
        top1: 1.0,
        scored_tokens: nll.len(),
        processed_tokens: processed,
        kv_bytes: mem.total_bytes(),
        bits_per_element: mem.bits_per_element(),
        wall_s,
        tokens_per_s: processed as f64 / wall_s.max(1e-9),
    };
    Ok(Reference { spec: spec.clone(), vocab, windows: refs, metrics })
}

/// Evaluates one cache configuration against the reference: perplexity, KL and top-1 agreement.
pub fn evaluate_text(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    windows: &[&[u32]],
    reference: &Reference,
    progress: &mut dyn FnMut(usize),
) -> Result<TextMetrics> {
    if windows.len() != reference.windows.len() {
        return Err(EvalError::BadRequest(format!(
            "{} windows but the reference holds {}",
            windows.len(),
            reference.windows.len()
        )));
    }
    let start = Instant::now();
    let spec = &reference.spec;
    let (vocab, first, scored) = (lm.vocab(), spec.first(), spec.scored_per_window());
    let mut nll = Vec::with_capacity(windows.len() * scored);
    let mut kls = Vec::with_capacity(windows.len() * scored);
    let mut agree = 0usize;
    let mut mem = None;
    for (w, wr) in windows.iter().zip(&reference.windows) {
        let lp = window_logprobs(lm, cache, w, first)?;
        mem.get_or_insert_with(|| cache.memory());
        let per: Vec<(f64, f64, bool)> = (0..scored)
            .into_par_iter()
            .map(|r| {
                let row = &lp[r * vocab..(r + 1) * vocab];
                let nll = -(row[w[first + r + 1] as usize] as f64);
                (nll, kl_at(&wr.dist, r, row), argmax(row) == wr.argmax[r])
            })
            .collect();
        for (n, k, a) in per {
            nll.push(n);
            kls.push(k);
            agree += a as usize;
        }
        progress(w.len());
    }
    let (ppl, ppl_stderr, nll_mean) = nll_summary(&nll);
    let kl_mean = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
    kls.sort_by(f64::total_cmp);
    let mem = mem.unwrap_or_default();
    let wall_s = start.elapsed().as_secs_f64();
    let processed: usize = windows.iter().map(|w| w.len()).sum();
    Ok(TextMetrics {
        ppl,
        ppl_stderr,
        nll_mean,
        kl_mean,
        kl_p99: percentile(&kls, 0.99),
        kl_max: kls.last().copied().unwrap_or(0.0),
        top1: agree as f64 / nll.len().max(1) as f64,
        scored_tokens: nll.len(),
        processed_tokens: processed,
        kv_bytes: mem.total_bytes(),
        bits_per_element: mem.bits_per_element(),
        wall_s,
        tokens_per_s: processed as f64 / wall_s.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ToyLm;
    use adaquant_cache::FullPrecisionCache;

    fn stream(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
        let mut r = crate::data::SplitMix(seed);
        (0..n).map(|_| r.range(0, vocab as u64) as u32).collect()
    }

    #[test]
    fn log_softmax_normalises() {
        let row = [1.0f32, 2.0, 3.0, -50.0];
        let mut out = [0.0; 4];
        let lse = log_softmax(&row, &mut out);
        let total: f64 = out.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lse - (1f32.exp() + 2f32.exp() + 3f32.exp() + (-50f32).exp()).ln()).abs() < 1e-5);
        assert_eq!(argmax(&row), 2);
    }

    #[test]
    fn windows_follow_the_llama_cpp_protocol() {
        let spec = TextEvalSpec { ctx: 8, windows: 2, topk: 0 };
        let tokens: Vec<u32> = (0..20).collect();
        let w = spec.windows(&tokens).unwrap();
        assert_eq!(w, vec![&tokens[0..8], &tokens[8..16]]);
        assert_eq!((spec.first(), spec.scored_per_window()), (4, 3));
        assert!(TextEvalSpec { ctx: 8, windows: 3, topk: 0 }.windows(&tokens).is_err());
        assert!(TextEvalSpec { ctx: 2, windows: 1, topk: 0 }.windows(&tokens).is_err());
    }

    #[test]
    fn quantized_history_counts_match_the_cache_and_a_brute_force_count() {
        use adaquant_cache::config::{LayerPrecision, Precision};
        use adaquant_cache::CacheSpec;
        use adaquant_kernels::Bits;
        // Closed form against the search over Precision::quantized_tokens, on awkward sizes.
        for (axis, group) in [(GroupAxis::PerToken, 16), (GroupAxis::PerChannel, 16), (GroupAxis::PerChannel, 7)] {
            let p = Precision::Quant(adaquant_kernels::QuantSpec::new(Bits::B4, group, axis));
            for residual in [0, 1, 13, 32, 100] {
                for sinks in [0, 3] {
                    let want = first_quantized_len_ref(&p, residual, sinks, 400);
                    assert_eq!(Some(first_quantized_len(axis, group, residual, sinks)), want, "{axis:?} g{group}");
                }
            }
        }
        // The count per window against a token-by-token run of a real cache: position p is scored after p + 1
        // appends, and counts when the cache then holds packed codes.
        let lm = ToyLm::small(4);
        let shape = lm.cache_shape(64);
        for (residual, sinks, ctx) in [(8, 0, 40), (19, 2, 40), (128, 0, 40), (0, 0, 41), (20, 0, 40)] {
            let layer = LayerPrecision::new(Precision::per_token(Bits::B4, 16), Precision::Full);
            let spec = CacheSpec::Uniform { layer, residual, sinks };
            let config = spec.quant_config(shape.n_layers).unwrap().unwrap();
            let text = TextEvalSpec { ctx, windows: 1, topk: 0 };
            let mut cache = spec.build(shape.clone()).unwrap();
            let mut brute = 0;
            for p in 0..ctx - 1 {
                lm.forward(&[(p % 60) as u32], cache.as_mut(), 0).unwrap();
                if p >= text.first() && crate::tasks::holds_quantized(cache.as_ref()) {
                    brute += 1;
                }
            }
            let n = text.scored_with_quantized_history(config_first_quantized_len(&config));
            assert_eq!(n, brute, "residual {residual} sinks {sinks} ctx {ctx}");
        }
        let text = TextEvalSpec { ctx: 100, windows: 1, topk: 0 };
        assert_eq!(text.scored_with_quantized_history(None), 0);
        assert_eq!(text.scored_with_quantized_history(Some(129)), 0, "the issue's --ctx 100 --residual 128");
        assert_eq!(text.scored_with_quantized_history(Some(1)), text.scored_per_window());
    }

    #[test]
    fn full_precision_point_matches_reference_and_topk_kl_is_a_lower_bound() {
        let lm = ToyLm::small(3);
        let tokens = stream(3 * 40, 64, 9);
        let spec = TextEvalSpec { ctx: 40, windows: 3, topk: 0 };
        let windows = spec.windows(&tokens).unwrap();
        let mut fp = FullPrecisionCache::new(lm.cache_shape(64)).unwrap();
        let r = build_reference(&lm, &mut fp, &windows, &spec, &mut |_| {}).unwrap();
        assert_eq!(r.metrics.scored_tokens, 3 * 19);
        let m = evaluate_text(&lm, &mut fp, &windows, &r, &mut |_| {}).unwrap();
        assert!(m.kl_mean.abs() < 1e-9 && m.top1 == 1.0, "{m:?}");
        assert!((m.ppl - r.metrics.ppl).abs() < 1e-9);
        assert_eq!(m.kv_bytes, 40 * 2 * 2 * 16 * 2 * 4);

        // A perturbed distribution: KL from the full rows, and the top-k lower bound below it.
        let row_p: Vec<f32> = {
            let raw: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) * 0.4).collect();
            let mut o = vec![0.0; 64];
            log_softmax(&raw, &mut o);
            o
        };
        let row_q: Vec<f32> = {
            let raw: Vec<f32> = (0..64).map(|i| ((i * 37 % 11) as f32) * 0.35 + (i % 3) as f32 * 0.2).collect();
            let mut o = vec![0.0; 64];
            log_softmax(&raw, &mut o);
            o
        };
        let exact = kl_at(&RefDist::Full(row_p.clone()), 0, &row_q);
        let mut prev = 0.0;
        for k in [1usize, 4, 16, 63] {
            let mut idx: Vec<u32> = (0..64).collect();
            idx.sort_by(|&a, &b| row_p[b as usize].total_cmp(&row_p[a as usize]));
            idx.truncate(k);
            let logp = idx.iter().map(|&i| row_p[i as usize]).collect();
            let bound = kl_at(&RefDist::TopK { k, ids: idx, logp }, 0, &row_q);
            assert!(bound <= exact + 1e-6 && bound >= prev - 1e-6, "k {k}: {bound} vs {exact}");
            prev = bound;
        }
        assert!((prev - exact).abs() < 1e-6, "k = vocab - 1 is exact: {prev} vs {exact}");
    }
}
