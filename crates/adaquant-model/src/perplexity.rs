//! Perplexity in llama.cpp's protocol: the text is tokenized as a whole (no BOS), cut into non-overlapping
//! windows of `window` tokens, each window runs from an empty cache, and in each window the logits of positions
//! `window/2 .. window-1` score the tokens that follow them (`window/2 - 1` predictions per window).

use adaquant_cache::KvCache;

use crate::{ForwardOptions, LogitsRange, Model, ModelError, Result};

/// The outcome of a perplexity run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Perplexity {
    pub windows: usize,
    pub window: usize,
    /// Predictions scored.
    pub scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// Standard error of the perplexity, `ppl * stderr(nll)` (llama.cpp's "+/-").
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood of each window.
    pub window_nll: Vec<f64>,
}

/// Scores `tokens` in non-overlapping `window`-token windows (at most `max_windows`), through `cache`,
/// which is cleared before every window.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    window: usize,
    max_windows: Option<usize>,
    cache: &mut dyn KvCache,
) -> Result<Perplexity> {
    if window < 4 {
        return Err(ModelError::InvalidInput(format!("perplexity window {window} is too short (at least 4 tokens)")));
    }
    let available = tokens.len() / window;
    let windows = max_windows.map_or(available, |m| m.min(available));
    if windows == 0 {
        return Err(ModelError::InvalidInput(format!("{} tokens do not fill one {window}-token window", tokens.len())));
    }
    let first = window / 2;
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut window_nll = Vec::with_capacity(windows);
    for w in 0..windows {
        let chunk = &tokens[w * window..(w + 1) * window];
        cache.clear();
        let logits = model.forward(chunk, cache, &mut ForwardOptions::new(LogitsRange::From(first)))?;
        let mut wsum = 0.0;
        for j in first..window - 1 {
            let nll = logits.nll(j - first, chunk[j + 1]);
            wsum += nll;
            sum_sq += nll * nll;
        }
        let n = window - 1 - first;
        sum += wsum;
        count += n;
        window_nll.push(wsum / n as f64);
    }
    cache.clear();
    let mean = sum / count as f64;
    let var = (sum_sq / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let ppl_stderr = if count > 1 { ppl * (var / (count - 1) as f64).sqrt() } else { 0.0 };
    Ok(Perplexity { windows, window, scored: count, mean_nll: mean, ppl, ppl_stderr, window_nll })
}
