//! CUDA kernels behind the `cuda` feature: the same packed layouts as the CPU, quantize + pack and
//! dequantize + unpack, a device-resident streaming cache, fused decode attention over packed keys and values, and
//! an f16 decode-attention baseline.
//!
//! Kernels are real `.cu` files in this folder, embedded with `include_str!` and compiled at run time by NVRTC
//! through cudarc, specialised by `-D` defines (widths, head dimension) after a preamble generated from the Rust
//! layout definitions ([`layout::preamble`]). Compiled modules are cached per specialisation. cudarc loads the CUDA
//! driver and NVRTC dynamically, so everything builds without CUDA; a missing library is [`Error::Cuda`], checked
//! before cudarc is touched (cudarc panics when a library is absent).
//!
//! Without the `cuda` feature, the same names exist and every constructor returns [`Error::CudaNotCompiled`].
//!
//! [`reference`] holds the host twins every GPU result is compared with; `emulate.h` lets the real kernel sources
//! run on the CPU (`tests/cuda_emulated.rs`), so their indexing is tested on machines without a GPU.
//! `docs/CUDA.md` describes the layout, the tests and the GPU check bundle (`cargo xtask gpu-check`).
//!
//! [`Error::Cuda`]: crate::Error::Cuda
//! [`Error::CudaNotCompiled`]: crate::Error::CudaNotCompiled

pub mod layout;
pub mod reference;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod libs;
#[cfg(feature = "cuda")]
pub use device::*;

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub use dummy::*;
