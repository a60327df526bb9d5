//! Stand-ins used when adaquant-kernels is built without the `cuda` feature: the same entry points, each returning
//! [`Error::CudaNotCompiled`]. The handle types cannot be constructed.

use std::sync::Arc;

use super::layout::KernelSpec;
pub use super::layout::{from_dtype_bytes, median, quantized_tokens, stream_stride, to_dtype_bytes};
use crate::error::{Error, Result};
use crate::format::QuantSpec;

/// Environment variable naming a folder that holds `libnvrtc.so*`.
pub const NVRTC_LIB_ENV: &str = "ADAQUANT_NVRTC_LIB";

/// Environment variable naming a folder of precompiled PTX files.
pub const PTX_DIR_ENV: &str = "ADAQUANT_PTX_DIR";

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

/// A CUDA device; never constructed without the `cuda` feature.
#[derive(Debug)]
pub struct CudaKernels {
    _private: (),
}

impl CudaKernels {
    /// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
    pub fn new(_ordinal: usize) -> Result<Arc<CudaKernels>> {
        Err(Error::CudaNotCompiled)
    }
}

/// Shape and precision of a [`DeviceKvCache`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceCacheConfig {
    pub batch: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub k: QuantSpec,
    pub v: QuantSpec,
    pub residual: usize,
    pub sinks: usize,
}

/// A device-resident quantized cache; never constructed without the `cuda` feature.
#[derive(Debug)]
pub struct DeviceKvCache {
    _private: (),
}

impl DeviceKvCache {
    /// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
    pub fn new(_kernels: Arc<CudaKernels>, _cfg: DeviceCacheConfig) -> Result<DeviceKvCache> {
        Err(Error::CudaNotCompiled)
    }
}

/// Device f16 keys and values for the baseline; never constructed without the `cuda` feature.
#[derive(Debug)]
pub struct DeviceF16Kv {
    _private: (),
}

impl DeviceF16Kv {
    /// Always [`Error::CudaNotCompiled`] without the `cuda` feature.
    pub fn new(
        _kernels: Arc<CudaKernels>,
        _batch: usize,
        _n_kv_heads: usize,
        _head_dim: usize,
        _capacity: usize,
    ) -> Result<DeviceF16Kv> {
        Err(Error::CudaNotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_says_cuda_was_not_compiled() {
        assert!(matches!(CudaKernels::new(0), Err(Error::CudaNotCompiled)));
        assert!(matches!(nvrtc_available(), Err(Error::CudaNotCompiled)));
        assert!(matches!(driver_available(), Err(Error::CudaNotCompiled)));
        let spec = KernelSpec::AttnF16 { head_dim: 64 };
        assert!(matches!(compile_ptx(&spec, "compute_80"), Err(Error::CudaNotCompiled)));
    }
}
