//! Norm and singular-value studies of the key and value projections (W_K, W_V) and of the key and value caches
//! (K, V) of a Llama-family model, with reports as JSON, Markdown and SVG/PNG plots.
//!
//! The [`plot`] module is independent of the rest and is also used by the evaluation crate.

pub mod plot;
pub mod error;
pub mod linalg;
pub mod report;
pub mod run;
pub mod study;

pub use error::{AnalysisError, Result};
pub use run::{run, AnalyzeArgs};
