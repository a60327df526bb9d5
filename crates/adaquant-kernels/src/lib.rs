//! Packed low-bit KV formats, group-wise quantization and fused decode attention that reads packed bytes.
//!
//! This crate knows nothing of models: it takes slices plus sizes.
//! See `docs/ARCHITECTURE.md` at the repository root for the layout rules.

pub mod error;
pub mod format;

pub use error::{Error, Result};
pub use format::{Bits, GroupAxis, MetaDtype, QuantSpec, ZeroPoint};
pub mod cuda;
