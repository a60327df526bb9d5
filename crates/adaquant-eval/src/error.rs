//! Typed errors of the evaluation crate.

use std::path::PathBuf;

/// Errors of dataset parsing, metrics and sweeps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("cannot read or write {path}: {source} (datasets: run `cargo xtask fetch` or set ADAQUANT_DATA)")]
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

    /// Another process holds the results file (each results file has one writer at a time).
    #[error(
        "results file {path} is in use by another process ({holder}); wait for it to finish, or write elsewhere \
         (another --out, or --shard i/N for a separate results file per shard)"
    )]
    ResultsLocked { path: PathBuf, holder: String },

    /// A results file written with another results version (an older adaquant, whose keys cover less).
    #[error(
        "{path}: {lines} line(s) have results version {found}, this adaquant writes version {want} (0 = written \
         before versions, keyed by the model's file name only, not by the model's and text's contents); they are \
         neither resumed nor mixed with new results. Start fresh with another --out, or keep the old file under a \
         name that does not start with `results` (e.g. `mv {path} {keep_as}`)"
    )]
    OldResults { path: PathBuf, found: u32, want: u32, lines: usize, keep_as: PathBuf },

    /// Two results files record the same key with different numbers.
    #[error(
        "conflicting results for point '{key}': {first} and {second} disagree on {fields}; the same point measured \
         twice must agree. Merge only results of one evaluation, or remove the stale file"
    )]
    MergeConflict { key: String, first: PathBuf, second: PathBuf, fields: String },
}

/// Result alias of the evaluation crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

impl EvalError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EvalError::Io { path: path.into(), source }
    }
}
