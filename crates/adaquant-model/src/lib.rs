//! Checkpoint loading (GGUF, safetensors), the tokenizer, and a Llama-family forward pass whose attention goes
//! through an [`adaquant_cache::KvCache`].
//!
//! ```no_run
//! use adaquant_cache::FullPrecisionCache;
//! use adaquant_model::{ForwardOptions, LogitsRange, Model};
//!
//! let model = Model::load(&adaquant_model::paths::default_model())?;
//! let tokens = model.tokenizer().encode("The capital of France is", false)?;
//! let mut cache = FullPrecisionCache::new(model.cache_shape(512))?;
//! let logits = model.forward(&tokens, &mut cache, &mut ForwardOptions::new(LogitsRange::Last))?;
//! let next = logits.argmax(0);
//! println!("{}", model.tokenizer().decode(&[next])?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod error;
pub mod gemm;
pub mod generate;
pub mod gguf;
mod hf;
pub mod linalg;
pub mod model;
pub mod paths;
pub mod perplexity;
pub mod qgemm;
pub mod quant;
pub mod spm;
pub mod tokenizer;

pub use config::{Activation, Arch, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use model::{
    default_weights_mode, set_default_weights_mode, ForwardOptions, LayerHook, LayerTaps, LayerWeights,
    LayerWeightsView, Logits, LogitsRange, Model, Weights, WeightsMode,
};
pub use tokenizer::Tokenizer;
