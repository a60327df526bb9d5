//! The CUDA implementation (feature `cuda`): NVRTC compilation, the module cache, device buffers and launches.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cudarc::nvrtc::{CompileError, CompileOptions};

use super::layout::KernelSpec;
pub use super::libs::{driver_available, nvrtc_available, NVRTC_LIB_ENV};
use crate::error::{Error, Result};

/// Compiles one specialisation to PTX for a virtual architecture such as `compute_80`, keeping NVRTC's log in
/// the error.
pub fn compile_ptx(spec: &KernelSpec, arch: &'static str) -> Result<String> {
    nvrtc_available()?;
    let opts = CompileOptions {
        options: spec.nvrtc_options(),
        arch: Some(arch),
        name: Some(spec.file().to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(spec.program(), opts).map_err(|e| compile_error(spec, arch, e))?;
    Ok(ptx.to_src())
}

fn compile_error(spec: &KernelSpec, arch: &str, e: CompileError) -> Error {
    match e {
        CompileError::CompileError { nvrtc, log, options } => Error::Cuda(format!(
            "NVRTC failed to compile {} for {arch} ({nvrtc:?}, options {options:?}):\n{}",
            spec.name(),
            log.to_string_lossy()
        )),
        other => Error::Cuda(format!("NVRTC failed on {} for {arch}: {other:?}", spec.name())),
    }
}
