//! Finding the CUDA driver and NVRTC libraries before cudarc touches them: cudarc panics when a library is
//! absent, adaquant returns [`Error::Cuda`] with what to do instead.
//!
//! NVRTC is looked up in `$ADAQUANT_NVRTC_LIB` first (a folder such as `.nvrtc/nvidia/cuda_nvrtc/lib`, which
//! `.ci/install-nvrtc.sh` fills from the PyPI wheel `nvidia-cuda-nvrtc-cu12`): its libraries are loaded by full path,
//! after which the dynamic loader resolves cudarc's `libnvrtc.so.12` to the same, already loaded, object. Otherwise
//! the usual search applies (`LD_LIBRARY_PATH`, the loader cache).

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Environment variable naming a folder that holds `libnvrtc.so*`.
pub const NVRTC_LIB_ENV: &str = "ADAQUANT_NVRTC_LIB";

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
}

const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Loads a shared library by full path and keeps it loaded for the life of the process.
fn preload(path: &Path) -> bool {
    let Some(s) = path.to_str() else { return false };
    let Ok(c) = CString::new(s) else { return false };
    // SAFETY: `c` is a valid NUL-terminated path; dlopen has no other preconditions, and a library that stays
    // loaded (the handle is never closed) cannot be unloaded under cudarc.
    let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    !handle.is_null()
}

fn libraries_in(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && n.contains(".so") && !n.contains(".alt."))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Checks that NVRTC can be loaded; the first call also preloads it from `$ADAQUANT_NVRTC_LIB`.
pub fn nvrtc_available() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let mut note = String::new();
            if let Some(dir) = std::env::var_os(NVRTC_LIB_ENV).filter(|d| !d.is_empty()) {
                let dir = PathBuf::from(dir);
                // The builtins library first: libnvrtc loads it by name when it compiles.
                let builtins = libraries_in(&dir, "libnvrtc-builtins");
                let main = libraries_in(&dir, "libnvrtc.so");
                let ok = builtins.iter().all(|p| preload(p)) && main.iter().any(|p| preload(p));
                if !ok {
                    note = format!(" ({NVRTC_LIB_ENV}={} holds no loadable libnvrtc.so*)", dir.display());
                }
            }
            // SAFETY: probing only opens candidate libraries with libloading and drops them.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "the NVRTC library (libnvrtc.so.12) was not found{note}; run `bash .ci/install-nvrtc.sh` and set \
                     {NVRTC_LIB_ENV} to the folder it prints, or add that folder to LD_LIBRARY_PATH"
                ))
            }
        })
        .clone()
        .map_err(Error::Cuda)
}

/// Checks that the CUDA driver library (libcuda.so.1) can be loaded.
pub fn driver_available() -> Result<()> {
    static STATE: OnceLock<bool> = OnceLock::new();
    // SAFETY: probing only opens candidate libraries with libloading and drops them.
    if *STATE.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
        Ok(())
    } else {
        Err(Error::Cuda(
            "the CUDA driver library (libcuda.so.1) was not found: this machine has no NVIDIA driver, or its \
             folder is missing from LD_LIBRARY_PATH"
                .into(),
        ))
    }
}
