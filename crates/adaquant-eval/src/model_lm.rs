//! [`LanguageModel`] for the real Llama-family model of `adaquant-model`.

use adaquant_analysis::linalg::{singular_values, View};
use adaquant_cache::{CacheShape, KvCache};
use adaquant_model::{ForwardOptions, LogitsRange, Model};

use crate::error::{EvalError, Result};
use crate::lm::{frobenius, LanguageModel, WeightNorm};

fn model_err(e: impl std::fmt::Display) -> EvalError {
    EvalError::Model(e.to_string())
}

impl LanguageModel for Model {
    fn vocab(&self) -> usize {
        self.config.vocab
    }

    fn cache_shape(&self, max_seq_len: usize) -> CacheShape {
        Model::cache_shape(self, max_seq_len)
    }

    fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache, from: usize) -> Result<Vec<f32>> {
        if from > tokens.len() {
            return Err(EvalError::BadRequest(format!("logits from {from} past {} tokens", tokens.len())));
        }
        let range = if from == tokens.len() { LogitsRange::None } else { LogitsRange::From(from) };
        let logits = Model::forward(self, tokens, cache, &mut ForwardOptions::new(range)).map_err(model_err)?;
        if from == tokens.len() {
            return Ok(Vec::new());
        }
        let want = (tokens.len() - from) * self.config.vocab;
        if logits.data.len() != want || logits.first_pos != from {
            return Err(EvalError::Model(format!(
                "forward returned {} logits from position {}, expected {want} from {from}",
                logits.data.len(),
                logits.first_pos
            )));
        }
        Ok(logits.data)
    }

    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.tokenizer().encode(text, add_bos).map_err(model_err)
    }

    fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer().decode(tokens).map_err(model_err)
    }

    fn add_bos(&self) -> bool {
        self.tokenizer().add_bos()
    }

    fn max_context(&self) -> usize {
        self.config.max_seq_len
    }

    fn kv_weight_norms(&self, kind: WeightNorm) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        let norm = |w: &[f32], b: Option<&[f32]>, rows: usize, cols: usize, what: &str| -> Result<f64> {
            match kind {
                WeightNorm::Frobenius => Ok(frobenius(w)),
                WeightNorm::FrobeniusWithBias => Ok(frobenius(w).hypot(b.map_or(0.0, frobenius))),
                WeightNorm::Spectral => singular_values(View::new(w, rows, cols), what)
                    .map(|s| s.first().copied().unwrap_or(0.0))
                    .map_err(model_err),
            }
        };
        let run = || -> Result<(Vec<f64>, Vec<f64>)> {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for l in 0..self.config.n_layers {
                let w = self.layer_weights(l);
                let rows = w.n_kv_heads * w.head_dim;
                k.push(norm(w.wk, w.bk, rows, w.hidden, "W_K")?);
                v.push(norm(w.wv, w.bv, rows, w.hidden, "W_V")?);
            }
            Ok((k, v))
        };
        Some(run())
    }
}
