//! Task accuracy through the cache: multiple choice (HellaSwag, ARC-Easy), LAMBADA, passkey retrieval.
//!
//! A continuation is scored by running context and continuation through a freshly cleared cache in one forward:
//! the continuation's keys and values enter the cache after the context's, exactly as in decoding, and every
//! scored position sees the context through the cache's quantized storage. Multiple choice picks the ending with
//! the highest mean log-probability per token (length-normalised, as llama.cpp's `hellaswag` score does).

use std::time::Instant;

use adaquant_cache::KvCache;
use serde::{Deserialize, Serialize};

use crate::data::{passkey_answer_correct, passkey_prompt, ChoiceItem, LastWordItem, SplitMix};
use crate::error::{EvalError, Result};
use crate::lm::LanguageModel;
use crate::metrics::{argmax, log_softmax};

/// Accuracy on one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Tokens run through the model.
    pub tokens: usize,
    pub wall_s: f64,
    /// Items scored while the cache held quantized keys or values (part of the prompt had left the exact window
    /// and the sinks). With 0 the accuracy is the full-precision cache's by construction: the prompts are shorter
    /// than the exact window (`--residual`). `None` in records written before this was counted.
    #[serde(default)]
    pub quantized: Option<usize>,
}

impl TaskResult {
    fn finish(correct: usize, total: usize, tokens: usize, quantized: usize, start: Instant) -> TaskResult {
        TaskResult {
            correct,
            total,
            accuracy: correct as f64 / total.max(1) as f64,
            tokens,
            wall_s: start.elapsed().as_secs_f64(),
            quantized: Some(quantized),
        }
    }
}

/// Whether any layer of `cache` holds packed (quantized) tokens right now.
pub fn holds_quantized(cache: &dyn KvCache) -> bool {
    cache.memory().layers.iter().any(|l| l.k_code_bytes + l.v_code_bytes > 0)
}

/// Splits `context + continuation` into context tokens and continuation tokens the way llama.cpp does: tokenize
/// the whole string and the context, and call the part after their common prefix the continuation. Both start with
/// BOS for models that add BOS.
pub fn split_continuation(lm: &dyn LanguageModel, context: &str, continuation: &str) -> Result<(Vec<u32>, usize)> {
    let ctx = lm.encode(context, lm.add_bos())?;
    let full = lm.encode(&format!("{context}{continuation}"), lm.add_bos())?;
    let common = ctx.iter().zip(&full).take_while(|(a, b)| a == b).count();
    if common == 0 || common >= full.len() {
        return Err(EvalError::BadRequest(format!(
            "cannot score '{continuation}' after a {}-token context: empty context or continuation after tokenization",
            ctx.len()
        )));
    }
    Ok((full, common))
}

/// Score of a continuation: the sum of its tokens' log-probabilities, their count, and whether greedy decoding
/// would have produced every one of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContinuationScore {
    pub logp: f64,
    pub tokens: usize,
    pub greedy: bool,
    /// The cache held quantized tokens when the continuation was scored.
    pub quantized: bool,
}

/// Scores `tokens[start..]` given `tokens[..start]`, through a cleared cache in one forward.
pub fn score_continuation(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    tokens: &[u32],
    start: usize,
) -> Result<ContinuationScore> {
    if start == 0 || start >= tokens.len() {
        return Err(EvalError::BadRequest(format!("continuation start {start} of {} tokens", tokens.len())));
    }
    cache.clear();
    let vocab = lm.vocab();
    let logits = lm.forward(tokens, cache, start - 1)?;
    let mut lp = vec![0.0f32; vocab];
    let (mut sum, mut greedy) = (0.0f64, true);
    for (r, &t) in tokens[start..].iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        log_softmax(row, &mut lp);
        sum += lp[t as usize] as f64;
        greedy &= argmax(row) == t;
    }
    Ok(ContinuationScore { logp: sum, tokens: tokens.len() - start, greedy, quantized: holds_quantized(cache) })
}

/// Multiple-choice accuracy over the first `limit` items (all when `None`).
pub fn multiple_choice(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    items: &[ChoiceItem],
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let start = Instant::now();
    let items = &items[..limit.unwrap_or(items.len()).min(items.len())];
    let (mut correct, mut tokens, mut quantized) = (0, 0, 0);
    for item in items {
        let mut best = (f64::NEG_INFINITY, 0);
        let mut any_quantized = false;
        for (i, ending) in item.endings.iter().enumerate() {
            let (toks, at) = split_continuation(lm, &item.context, ending)?;
            let s = score_continuation(lm, cache, &toks, at)?;
            tokens += toks.len();
            any_quantized |= s.quantized;
            let norm = s.logp / s.tokens as f64;
            if norm > best.0 {
                best = (norm, i);
            }
        }
        correct += (best.1 == item.gold) as usize;
        quantized += any_quantized as usize;
        progress(1);
    }
    Ok(TaskResult::finish(correct, items.len(), tokens, quantized, start))
}

/// LAMBADA accuracy: greedy decoding must reproduce every token of the last word.
pub fn lambada(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    items: &[LastWordItem],
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let start = Instant::now();
    let items = &items[..limit.unwrap_or(items.len()).min(items.len())];
    let (mut correct, mut tokens, mut quantized) = (0, 0, 0);
    for item in items {
        let (toks, at) = split_continuation(lm, &item.context, &format!(" {}", item.target))?;
        let s = score_continuation(lm, cache, &toks, at)?;
        tokens += toks.len();
        correct += s.greedy as usize;
        quantized += s.quantized as usize;
        progress(1);
    }
    Ok(TaskResult::finish(correct, items.len(), tokens, quantized, start))
}

/// Greedy generation of `max_new` tokens after `prompt`, through a cleared cache.
pub fn greedy_generate(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    prompt: &[u32],
    max_new: usize,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(EvalError::BadRequest("empty prompt".into()));
    }
    cache.clear();
    let mut logits = lm.forward(prompt, cache, prompt.len() - 1)?;
    let mut out = Vec::with_capacity(max_new);
    for i in 0..max_new {
        let next = argmax(&logits);
        out.push(next);
        if i + 1 < max_new {
            logits = lm.forward(&[next], cache, 0)?;
        }
    }
    Ok(out)
}

/// Passkey retrieval settings: prompt lengths, needle depths, and trials per (length, depth).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeySpec {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
}

impl Default for PasskeySpec {
    fn default() -> Self {
        PasskeySpec { lengths: vec![1024, 2048, 4096, 8192], depths: vec![0.1, 0.5, 0.9], trials: 1, seed: 7 }
    }
}

/// Passkey retrieval accuracy: the first number greedily generated after the prompt must be the key.
pub fn passkey(
    lm: &dyn LanguageModel,
    cache: &mut dyn KvCache,
    spec: &PasskeySpec,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let start = Instant::now();
    let mut rng = SplitMix(spec.seed);
    let (mut correct, mut total, mut tokens, mut quantized) = (0, 0, 0, 0);
    for &len in &spec.lengths {
        for &depth in &spec.depths {
            for _ in 0..spec.trials {
                let key = rng.range(10_000, 100_000) as u32;
                let mut count = |s: &str| lm.encode(s, false).map(|t| t.len());
                // Leave room for the generated tokens inside the model's context.
                let target = len.min(lm.max_context().saturating_sub(16));
                let p = passkey_prompt(target, depth, key, &mut count)?;
                let prompt = lm.encode(&p.text, lm.add_bos())?;
                let gen = greedy_generate(lm, cache, &prompt, 8)?;
                quantized += holds_quantized(cache) as usize;
                let text = lm.decode(&gen)?;
                correct += passkey_answer_correct(&text, key) as usize;
                total += 1;
                tokens += prompt.len() + gen.len();
                progress(1);
            }
        }
    }
    Ok(TaskResult::finish(correct, total, tokens, quantized, start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::ToyLm;
    use adaquant_cache::FullPrecisionCache;

    #[test]
    fn task_prompts_start_with_bos_for_models_that_add_it() {
        let plain = ToyLm::small(3);
        let bos = ToyLm::small(3).with_bos();
        let (a, at_a) = split_continuation(&plain, "the cat sat on", " the mat").unwrap();
        let (b, at_b) = split_continuation(&bos, "the cat sat on", " the mat").unwrap();
        assert_eq!(b[0], 0);
        assert_eq!((b[1..].to_vec(), at_b - 1), (a, at_a));
    }

    #[test]
    fn continuation_scores_match_a_manual_stepwise_sum() {
        let lm = ToyLm::small(5);
        let mut c = FullPrecisionCache::new(lm.cache_shape(128)).unwrap();
        let (toks, at) = split_continuation(&lm, "the cat sat on", " the mat").unwrap();
        assert_eq!(at, "the cat sat on".len());
        let s = score_continuation(&lm, &mut c, &toks, at).unwrap();
        // Reference: decode token by token and add up the continuation's log-probabilities.
        c.clear();
        let (mut sum, mut greedy) = (0.0f64, true);
        let mut lp = vec![0.0; lm.vocab];
        for (p, &t) in toks.iter().enumerate() {
            let logits = lm.forward(&[t], &mut c, 0).unwrap();
            if p + 1 < toks.len() && p + 1 >= at {
                log_softmax(&logits, &mut lp);
                sum += lp[toks[p + 1] as usize] as f64;
                greedy &= argmax(&logits) == toks[p + 1];
            }
        }
        assert!((s.logp - sum).abs() < 1e-4, "{} vs {sum}", s.logp);
        assert_eq!(s.greedy, greedy);
        assert_eq!(s.tokens, toks.len() - at);
    }

    #[test]
    fn multiple_choice_picks_the_most_likely_ending() {
        let lm = ToyLm::small(11);
        let mut c = FullPrecisionCache::new(lm.cache_shape(128)).unwrap();
        let endings: Vec<String> = [" aaaa", " bq", " zzzzzz", " mno"].iter().map(|s| s.to_string()).collect();
        let norms: Vec<f64> = endings
            .iter()
            .map(|e| {
                let (t, at) = split_continuation(&lm, "pick one:", e).unwrap();
                let s = score_continuation(&lm, &mut c, &t, at).unwrap();
                s.logp / s.tokens as f64
            })
            .collect();
        let best = (0..4).max_by(|&a, &b| norms[a].total_cmp(&norms[b])).unwrap();
        let worst = (0..4).min_by(|&a, &b| norms[a].total_cmp(&norms[b])).unwrap();
        let items = vec![
            ChoiceItem { context: "pick one:".into(), endings: endings.clone(), gold: best },
            ChoiceItem { context: "pick one:".into(), endings, gold: worst },
        ];
        let r = multiple_choice(&lm, &mut c, &items, None, &mut |_| {}).unwrap();
        assert_eq!((r.correct, r.total), (1, 2));
        let r = multiple_choice(&lm, &mut c, &items, Some(1), &mut |_| {}).unwrap();
        assert_eq!((r.correct, r.total), (1, 1));
    }

    #[test]
    fn lambada_counts_greedy_matches() {
        let lm = ToyLm::small(2);
        let mut c = FullPrecisionCache::new(lm.cache_shape(256)).unwrap();
        let items = vec![
            LastWordItem { context: "some context here".into(), target: "x".into() },
            LastWordItem { context: "other words".into(), target: "wrong-word".into() },
            LastWordItem { context: "abc".into(), target: "d".into() },
        ];
        // The expected count comes from the per-item scorer, which is checked against stepwise decoding above.
        let expect: usize = items
            .iter()
            .map(|it| {
                let (t, at) = split_continuation(&lm, &it.context, &format!(" {}", it.target)).unwrap();
                score_continuation(&lm, &mut c, &t, at).unwrap().greedy as usize
            })
            .sum();
        let r = lambada(&lm, &mut c, &items, None, &mut |_| {}).unwrap();
        assert_eq!(r.correct, expect);
        assert_eq!(r.total, 3);
        assert!(r.tokens > 0);
    }

    #[test]
    fn greedy_generation_equals_argmax_of_teacher_forced_logits() {
        let lm = ToyLm::small(4);
        let mut c = FullPrecisionCache::new(lm.cache_shape(128)).unwrap();
        let prompt = lm.encode("hello", false).unwrap();
        let gen = greedy_generate(&lm, &mut c, &prompt, 6).unwrap();
        let mut all = prompt.clone();
        all.extend(&gen);
        c.clear();
        let logits = lm.forward(&all, &mut c, prompt.len() - 1).unwrap();
        for (i, &g) in gen.iter().enumerate() {
            assert_eq!(argmax(&logits[i * lm.vocab..(i + 1) * lm.vocab]), g);
        }
        assert!(greedy_generate(&lm, &mut c, &[], 3).is_err());
    }

    #[test]
    fn quantized_items_are_counted_only_past_the_exact_window() {
        use adaquant_cache::CacheSpec;
        let lm = ToyLm::small(3);
        let items = vec![
            LastWordItem { context: "a short one".into(), target: "x".into() },
            LastWordItem {
                context: "a much longer context that runs on and on for many more tokens".into(),
                target: "y".into(),
            },
        ];
        let lens: Vec<usize> = items
            .iter()
            .map(|it| split_continuation(&lm, &it.context, &format!(" {}", it.target)).unwrap().0.len())
            .collect();
        assert!(lens[0] < lens[1]);
        // An exact window between the two prompt lengths: only the longer prompt reaches the packed part.
        let residual = (lens[0] + lens[1]) / 2;
        for (spec, expect) in [
            (format!("k4v2-g16-r{residual}"), 1),
            ("k4v2-g16-r0".to_string(), 2),
            (format!("k4v2-g16-r{}", lens[1] + 1), 0),
            ("f32".to_string(), 0),
        ] {
            let mut c = spec.parse::<CacheSpec>().unwrap().build(lm.cache_shape(256)).unwrap();
            let r = lambada(&lm, c.as_mut(), &items, None, &mut |_| {}).unwrap();
            assert_eq!(r.quantized, Some(expect), "{spec} with prompts of {lens:?} tokens");
        }
        let mut full = FullPrecisionCache::new(lm.cache_shape(256)).unwrap();
        assert!(!holds_quantized(&full));
        lm.forward(&[1, 2, 3], &mut full, 2).unwrap();
        assert!(!holds_quantized(&full));
    }

    #[test]
    fn passkey_runs_every_trial() {
        let lm = ToyLm::small(6);
        let mut c = FullPrecisionCache::new(lm.cache_shape(2048)).unwrap();
        let spec = PasskeySpec { lengths: vec![400, 900], depths: vec![0.0, 0.5], trials: 2, seed: 1 };
        let mut seen = 0;
        let r = passkey(&lm, &mut c, &spec, &mut |n| seen += n).unwrap();
        assert_eq!((r.total, seen), (8, 8));
        assert!(r.correct <= r.total);
        assert!(r.tokens > 8 * 300);
    }
}
