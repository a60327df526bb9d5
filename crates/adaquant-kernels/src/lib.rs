//! Packed low-bit KV formats, group-wise quantization and fused decode attention that reads packed bytes.
//!
//! This crate knows nothing of models: it takes slices plus sizes.
//! See `docs/ARCHITECTURE.md` at the repository root for the layout rules.
//!
//! ```
//! use adaquant_kernels::{attn, quant, Bits, GroupAxis, QuantSpec};
//!
//! let (tokens, d) = (64, 64);
//! let k: Vec<f32> = (0..tokens * d).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
//! let v: Vec<f32> = (0..tokens * d).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
//! // Keys: 4 bits, groups of 64 tokens per channel. Values: 2 bits, groups of 64 channels per token.
//! let ks = quant::quantize(&QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel), d, &k)?;
//! let vs = quant::quantize(&QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken), d, &v)?;
//! assert_eq!(ks.bytes(), ks.spec().bytes(tokens, 1, d));
//! let head = attn::HeadKv::packed(ks.view(), vs.view());
//! let q = vec![0.1f32; 3 * d]; // Three query heads share this KV head.
//! let mut out = vec![0f32; 3 * d];
//! attn::decode_attention(&q, &[head], d, 1.0 / (d as f32).sqrt(), &mut out)?;
//! # Ok::<(), adaquant_kernels::Error>(())
//! ```

pub mod attn;
pub mod baseline;
pub mod error;
pub mod format;
pub mod pack;
pub mod quant;
pub mod rotate;
pub mod simd;
pub mod skip;

pub use attn::{decode_attention, decode_attention_ref, decode_attention_serial, HeadKv};
pub use error::{Error, Result};
pub use format::{Bits, GroupAxis, Levels, MetaDtype, QuantSpec, Rotation, ZeroPoint};
pub use quant::{MetaBuf, MetaView, PackedStream, PackedView};
pub mod cuda;
