//! Evaluation of KV-cache bit allocations: perplexity, KL divergence and top-1 agreement against the
//! full-precision cache, multiple-choice and last-word accuracy, passkey retrieval, and resumable, shardable
//! sweeps over allocation grids with Markdown tables and plots. The `adaquant` program lives in `src/main.rs`.
//!
//! Every metric is decode-faithful: it drives the cache through `KvCache::append_attend`, so a scored position
//! sees older tokens exactly as decoding would (quantized ones dequantized, the residual window and sinks exact).
//!
//! ```
//! use adaquant_cache::FullPrecisionCache;
//! use adaquant_eval::lm::{LanguageModel, ToyLm};
//! use adaquant_eval::metrics::{build_reference, TextEvalSpec};
//!
//! let lm = ToyLm::small(1);
//! let tokens: Vec<u32> = (0..64).map(|i| (i * 5 % 63) as u32).collect();
//! let spec = TextEvalSpec { ctx: 32, windows: 2, topk: 0 };
//! let windows = spec.windows(&tokens).unwrap();
//! let mut cache = FullPrecisionCache::new(lm.cache_shape(32)).unwrap();
//! let reference = build_reference(&lm, &mut cache, &windows, &spec, &mut |_| {}).unwrap();
//! assert_eq!(reference.metrics.scored_tokens, 2 * 15);
//! assert!(reference.metrics.ppl > 1.0);
//! ```

pub mod bench;
pub mod cli;
pub mod data;
pub mod error;
pub mod lm;
pub mod metrics;
pub mod model_lm;
pub mod progress;
pub mod ranges;
pub mod report;
pub mod results;
pub mod sweep;
pub mod tasks;

pub use error::{EvalError, Result};
