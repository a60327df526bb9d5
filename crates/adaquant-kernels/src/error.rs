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

    /// NaN or infinity in the data to quantize.
    #[error(
        "non-finite value {value} at element {index} of the {what}; quantizing it would silently corrupt the cache"
    )]
    NonFinite { what: &'static str, index: usize, value: f32 },

    /// Codes out of range for the bit width.
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeOutOfRange { code: u8, index: usize, bits: Bits },

    /// A CUDA error (driver, NVRTC, or missing library).
    #[error("cuda: {0}")]
    Cuda(String),

    /// The crate was built without the `cuda` feature.
    #[error("adaquant-kernels was built without the `cuda` feature; rebuild with `--features cuda`")]
    CudaNotCompiled,
}

/// Result alias of the kernels crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
