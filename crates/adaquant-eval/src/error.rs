//! Typed errors of the evaluation crate.

use std::path::PathBuf;

/// Errors of dataset parsing, metrics and sweeps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A dataset file could not be read.
    #[error("cannot read {path}: {source}; run `cargo xtask fetch` or set ADAQUANT_DATA")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A dataset file is malformed at a given line (1-based).
    #[error("{path}:{line}: {msg}")]
    Malformed { path: String, line: usize, msg: String },

    /// A request that cannot be satisfied by the data (too few tokens, empty dataset, bad ranges).
    #[error("{0}")]
    BadRequest(String),

    /// A model forward or tokenizer call failed.
    #[error("model: {0}")]
    Model(String),

    /// A cache could not be built or used.
    #[error(transparent)]
    Cache(#[from] adaquant_cache::CacheError),

    /// A results file could not be written or parsed.
    #[error("results {path}: {msg}")]
    Results { path: String, msg: String },
}

/// Result alias of the evaluation crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io { path: path.into(), source }
    }
}
