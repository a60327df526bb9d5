//! The error type of the analysis crate.

use std::path::PathBuf;

/// What can go wrong in an analysis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalysisError {
    /// A matrix description does not fit its data.
    #[error("matrix `{what}`: {rows} rows x {cols} columns with row stride {stride} needs {needed} values, got {got}")]
    Shape { what: String, rows: usize, cols: usize, stride: usize, needed: usize, got: usize },
    /// A matrix has no rows or no columns.
    #[error("matrix `{what}` is empty ({rows} x {cols}); nothing to analyse")]
    EmptyMatrix { what: String, rows: usize, cols: usize },
    /// A matrix holds NaN or infinity.
    #[error("matrix `{what}` holds a non-finite value at row {row}, column {col}; the model or the capture produced NaN/inf")]
    NonFinite { what: String, row: usize, col: usize },
    /// The singular value decomposition did not converge.
    #[error("the SVD of `{what}` did not converge")]
    SvdNoConvergence { what: String },
    /// The calibration text is shorter than requested.
    #[error("{path} gives only {got} tokens but {wanted} were requested; pass a smaller --tokens or a longer --text")]
    TextTooShort { path: PathBuf, wanted: usize, got: usize },
    /// An input file is missing.
    #[error("{what} not found at {path}; {hint}")]
    Missing { what: String, path: PathBuf, hint: String },
    /// A bad command-line value.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The model failed to load or run.
    #[error("model: {0}")]
    Model(String),
    /// Quantization failed.
    #[error("quantization: {0}")]
    Quant(String),
    /// Writing a result failed.
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Encoding a report failed.
    #[error("cannot encode {path} as JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// Drawing a plot failed.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
}

/// Result of the analysis functions.
pub type Result<T> = std::result::Result<T, AnalysisError>;
