//! Typed errors of the cache crate.

/// Errors of cache construction, appends and allocation policies.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Appending would pass the cache's maximum context.
    #[error("KV cache full: layer {layer} holds {held} tokens, appending {adding} would pass the maximum of {max}; build the cache with a larger max_seq_len")]
    Full { layer: usize, held: usize, adding: usize, max: usize },

    /// A configuration that cannot work (bad group size, unknown width, budget out of reach, ...).

    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),

    /// A buffer whose length does not match the cache shape.
    #[error("{what}: expected a multiple of / exactly {expected} elements, got {got}")]
    Shape { what: &'static str, expected: usize, got: usize },

    /// NaN or infinity in keys, values or queries.
    #[error("non-finite value in {what} of layer {layer} at element {index}; the model produced NaN/inf activations")]
    NonFinite { what: &'static str, layer: usize, index: usize },

    /// A key or value too large for an f16 cache (it would be stored as infinity).
    #[error("{what} of layer {layer}: element {index} is {value}, beyond the f16 range (about 65504) of this f16 cache; use an f32 cache or rescale")]
    F16Overflow { what: &'static str, layer: usize, index: usize, value: f32 },

    /// An error from the kernels.
    #[error(transparent)]
    Kernel(#[from] adaquant_kernels::Error),

    /// A field of a configuration (ours or the authors' kvq shape) with an invalid value.
    #[error("config field `{field}`: {msg}")]
    Field { field: String, msg: String },

    /// An allocation problem that has no answer (budget below the narrowest width, mismatched inputs, ...).
    #[error("allocation: {0}")]
    Allocation(String),

    /// A configuration file that could not be read or parsed.
    #[error("config {path}: {msg}")]
    ConfigFile { path: String, msg: String },
}

/// Result alias of the cache crate.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;
