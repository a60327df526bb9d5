//! Perplexity in llama.cpp's protocol: the text is tokenized as a whole, cut into non-overlapping windows of
//! `window` tokens, each window runs from an empty cache, and in each window the logits of positions
//! `window/2 .. window-1` score the tokens that follow them (`window/2 - 1` predictions per window).
//!
//! BOS follows llama.cpp's rule, the one rule of adaquant's evaluator and analysis: for a model that adds BOS
//! (GGUF `tokenizer.ggml.add_bos_token`, e.g. Gemma), the text is tokenized with BOS in front and BOS replaces
//! the first token of every window; for a model that does not (SmolLM2), no BOS appears anywhere.

use adaquant_cache::KvCache;

use crate::{ForwardOptions, LogitsRange, Model, ModelError, Result, Tokenizer};

/// The BOS token that starts every window of text evaluation: `Some` for models that add BOS, `None` otherwise.
pub fn window_bos(tokenizer: &Tokenizer) -> Option<u32> {
    if tokenizer.add_bos() {
        tokenizer.bos_id()
    } else {
        None
    }
}

/// Replaces the first token of every whole `window`-token window of `tokens` with `bos` (llama.cpp's rule).
pub fn put_bos_at_window_starts(tokens: &mut [u32], window: usize, bos: u32) {
    if window == 0 {
        return;
    }
    for w in tokens.chunks_exact_mut(window) {
        w[0] = bos;
    }
}

/// `text` as the token stream of text evaluation in `window`-token windows: tokenized whole, BOS in front and at
/// the start of every window for models that add BOS.
pub fn text_tokens(tokenizer: &Tokenizer, text: &str, window: usize) -> Result<Vec<u32>> {
    let bos = window_bos(tokenizer);
    let mut ids = tokenizer.encode(text, bos.is_some())?;
    if let Some(b) = bos {
        put_bos_at_window_starts(&mut ids, window, b);
    }
    Ok(ids)
}

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
/// which is cleared before every window. For a model that adds BOS, each window's first token is BOS
/// (see [`text_tokens`]).
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
    let bos = window_bos(model.tokenizer());
    let mut input = Vec::with_capacity(window);
    for w in 0..windows {
        let chunk = &tokens[w * window..(w + 1) * window];
        input.clear();
        input.extend_from_slice(chunk);
        if let Some(b) = bos {
            input[0] = b;
        }
        cache.clear();
        let logits = model.forward(&input, cache, &mut ForwardOptions::new(LogitsRange::From(first)))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bos_replaces_the_first_token_of_every_whole_window() {
        let mut t: Vec<u32> = (10..21).collect();
        put_bos_at_window_starts(&mut t, 4, 2);
        assert_eq!(t, [2, 11, 12, 13, 2, 15, 16, 17, 18, 19, 20]);
    }
}
