//! Norm and singular-value studies of the key and value projections (W_K, W_V) and of the key and value caches
//! (K, V) of a Llama-family model, with reports as JSON, Markdown and SVG/PNG plots.
//!
//! The studies behind arXiv 2502.15075's "more bits for keys": per layer and per KV head, Frobenius and spectral
//! norms, full singular-value spectra, spectral gap and effective rank of W_K and W_V and of the K and V caches over
//! calibration text, per-channel key magnitudes, and the error of quantizing each layer's K or V alone. The report
//! states per layer where ||K|| > ||V|| holds and where it does not, and exports sensitivities in the shape the
//! cache crate's budget solver reads.
//!
//! - [`linalg`]: matrix statistics through faer, with an independent Jacobi SVD as the reference.
//! - [`study`]: the weight, activation and quantization studies on plain slices.
//! - [`report`]: `report.json`, `report.md`, `sensitivities-<kind>.json` and the plots.
//! - [`run`](mod@run): the `analyze` command ([`AnalyzeArgs`], [`run()`]).
//! - [`plot`]: small SVG + PNG charts, also used by the evaluation crate.
//!
//! ```no_run
//! use adaquant_analysis::AnalyzeArgs;
//! // Weights only: no forward pass, a few seconds.
//! let args = AnalyzeArgs { weights_only: true, out: Some("results/weights".into()), ..AnalyzeArgs::default() };
//! let folder = adaquant_analysis::run(&args)?;
//! let report = std::fs::read_to_string(folder.join("report.md"))?;
//! assert!(report.contains("W_K"));
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod error;
pub mod linalg;
pub mod plot;
pub mod report;
pub mod run;
pub mod study;

pub use error::{AnalysisError, Result};
pub use run::{run, AnalyzeArgs};
