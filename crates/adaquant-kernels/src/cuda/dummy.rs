//! Stand-ins used when adaquant-kernels is built without the `cuda` feature: the same names, and every entry point
//! returns [`Error::CudaNotCompiled`].

use super::layout::KernelSpec;
use crate::error::{Error, Result};

/// Environment variable naming a folder that holds `libnvrtc.so*`.
pub const NVRTC_LIB_ENV: &str = "ADAQUANT_NVRTC_LIB";

/// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
pub fn nvrtc_available() -> Result<()> {
    Err(Error::CudaNotCompiled)
}

/// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
pub fn driver_available() -> Result<()> {
    Err(Error::CudaNotCompiled)
}

/// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
pub fn compile_ptx(_spec: &KernelSpec, _arch: &'static str) -> Result<String> {
    Err(Error::CudaNotCompiled)
}
