//! Typed errors of the kernels crate.

use crate::format::{Bits, GroupAxis};

/// Errors returned by the kernels' public functions.
///
/// Shape problems on public APIs are errors, never panics; internal invariants use `debug_assert!`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bit width that adaquant does not pack.
    #[error("unsupported bit width {got}: supported widths are 1, 1.58, 2, 3, 4, 5, 6 and 8")]
    UnsupportedBits { got: String },

    /// The group size does not divide the axis it groups.
    #[error("group size {group} does not divide {what} = {len} ({axis:?} groups); pick a group size that divides it")]
    GroupDoesNotDivide { group: usize, len: usize, what: &'static str, axis: GroupAxis },

    /// A group size of zero.
    #[error("group size must be positive")]
    ZeroGroup,

    /// A buffer has the wrong length for the shape it claims.
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch { what: &'static str, expected: usize, got: usize },

    /// n_q_heads is not a multiple of n_kv_heads.
    #[error("grouped-query attention needs n_q_heads ({n_q_heads}) to be a multiple of n_kv_heads ({n_kv_heads})")]
    BadGqa { n_q_heads: usize, n_kv_heads: usize },

    /// NaN or infinity in the data to quantize or in a query.
    #[error(
        "non-finite value {value} at element {index} of the {what}; NaN and infinities are refused because they would silently corrupt the cache or the attention output"
    )]
    NonFinite { what: &'static str, index: usize, value: f32 },

    /// NaN or infinity in the keys or values that attention reads (exact parts or packed metadata).
    #[error(
        "KV head {kv_head}: non-finite value {value} at element {index} of the {part}; attention over it would be NaN at some SIMD levels and silently ignore it at others"
    )]
    NonFiniteKv { kv_head: usize, part: &'static str, index: usize, value: f32 },

    /// Attention scores or outputs overflowed f32 although the query, keys and values are all finite.
    #[error(
        "KV head {kv_head}: attention overflowed f32 (a score q.k or the weighted value sum is beyond 3.4e38) although every input is finite; rescale the queries, keys or values"
    )]
    AttentionOverflow { kv_head: usize },

    /// Codes out of range for the bit width.
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeOutOfRange { code: u8, index: usize, bits: Bits },

    /// Group metadata does not fit the chosen metadata type (for example a range above 65504 with f16 metadata).
    #[error("group {what} {value} does not fit {dtype:?} metadata; use MetaDtype::F32 or rescale the input")]
    MetaOverflow { what: &'static str, value: f32, dtype: crate::format::MetaDtype },

    /// Attention over a context of zero tokens.
    #[error("attention needs at least one key/value token per KV head; the context is empty")]
    EmptyContext,

    /// Keys and values of one KV head hold different numbers of tokens.
    #[error(
        "KV head {head}: keys hold {k_tokens} tokens but values hold {v_tokens}; both must cover the same positions"
    )]
    KvLengthMismatch { head: usize, k_tokens: usize, v_tokens: usize },

    /// A packed view whose parts disagree with each other.
    #[error("inconsistent packed view: {what}: expected {expected}, got {got}")]
    BadView { what: &'static str, expected: usize, got: usize },

    /// A combination of settings adaquant does not implement.
    #[error("{what} is not supported: {hint}")]
    Unsupported { what: String, hint: &'static str },

    /// A rotation for a head size without a power-of-two factor.
    #[error(
        "a Hadamard rotation (seed {seed}) needs head_dim to have a power-of-two factor of at least 2, got \
         {head_dim}; rotate only models with even head sizes"
    )]
    RotationSize { head_dim: usize, seed: u64 },

    /// A CUDA error (driver, NVRTC, or missing library).
    #[error("cuda: {0}")]
    Cuda(String),

    /// The crate was built without the `cuda` feature.
    #[error("adaquant-kernels was built without the `cuda` feature; rebuild with `--features cuda`")]
    CudaNotCompiled,
}

/// Result alias of the kernels crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
