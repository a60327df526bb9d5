//! How a test gives way when something it needs is absent: the real model and datasets, NVRTC, g++ or a GPU.
//!
//! By default [`skip`] prints `SKIPPED <test>: <reason>` and returns, so `cargo test` passes on a bare machine.
//! Where the thing is known to be present, `ADAQUANT_REQUIRE_<NEED>=1` (see [`Need::env_var`]) turns the skip into
//! a test failure with the same message: CI sets it, so a broken fetch or install cannot pass as a row of skips.
//! `ADAQUANT_SKIP_LOG=<file>` also appends every skip line to that file, so a run can count its skips.

use std::ffi::OsStr;
use std::io::Write;

/// Environment variable naming a file that collects the `SKIPPED` lines of every test process.
pub const SKIP_LOG_ENV: &str = "ADAQUANT_SKIP_LOG";

/// What a test may lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The real model and datasets (`cargo xtask fetch`).
    Data,
    /// A loadable NVRTC library (`.ci/install-nvrtc.sh`).
    Nvrtc,
    /// A C++ compiler `g++` (the emulated CUDA kernels).
    Gxx,
    /// A CUDA driver and device.
    Gpu,
}

impl Need {
    /// The variable that makes lacking this a failure: `ADAQUANT_REQUIRE_DATA`, `_NVRTC`, `_GXX` or `_GPU`.
    pub fn env_var(self) -> &'static str {
        match self {
            Need::Data => "ADAQUANT_REQUIRE_DATA",
            Need::Nvrtc => "ADAQUANT_REQUIRE_NVRTC",
            Need::Gxx => "ADAQUANT_REQUIRE_GXX",
            Need::Gpu => "ADAQUANT_REQUIRE_GPU",
        }
    }

    /// Whether the environment requires this (its variable is set to anything but empty or `0`).
    pub fn required(self) -> bool {
        flag_set(std::env::var_os(self.env_var()).as_deref())
    }
}

/// Whether a `ADAQUANT_REQUIRE_*` value asks for a requirement: anything but unset, empty or `0`.
pub fn flag_set(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// The outcome of a test lacking `need`: `Ok(line)` to print and skip, `Err(message)` to fail with.
pub fn decide(need: Need, test: &str, reason: &str, required: bool) -> Result<String, String> {
    if required {
        Err(format!(
            "{test}: {reason}\n{} is set, so a test that cannot run fails instead of printing SKIPPED",
            need.env_var()
        ))
    } else {
        Ok(format!("SKIPPED {test}: {reason}"))
    }
}

/// Prints `SKIPPED <test>: <reason>` (and logs it to `$ADAQUANT_SKIP_LOG`), or panics with the same message when
/// the environment requires `need`. The caller returns from the test right after.
#[track_caller]
pub fn skip(need: Need, test: &str, reason: &str) {
    match decide(need, test, reason, need.required()) {
        Ok(line) => {
            eprintln!("{line}");
            if let Some(log) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
                // One write per line: concurrent test processes append whole lines.
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
                if let Err(e) = appended {
                    panic!("{line}\ncould not append it to {SKIP_LOG_ENV}={}: {e}", log.to_string_lossy());
                }
            }
        }
        Err(message) => panic!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requirement_is_any_value_but_empty_or_zero() {
        assert!(!flag_set(None));
        assert!(!flag_set(Some(OsStr::new(""))));
        assert!(!flag_set(Some(OsStr::new("0"))));
        assert!(flag_set(Some(OsStr::new("1"))));
        assert!(flag_set(Some(OsStr::new("true"))));
    }

    #[test]
    fn a_required_need_fails_with_the_skip_message() {
        let reason = "data/models/m.gguf not found";
        let line = decide(Need::Data, "t", reason, false).unwrap();
        assert_eq!(line, "SKIPPED t: data/models/m.gguf not found");
        let failure = decide(Need::Data, "t", reason, true).unwrap_err();
        assert!(failure.starts_with("t: data/models/m.gguf not found\n"), "{failure}");
        assert!(failure.contains("ADAQUANT_REQUIRE_DATA is set"), "{failure}");
        assert!(decide(Need::Nvrtc, "t", reason, true).unwrap_err().contains("ADAQUANT_REQUIRE_NVRTC"));
        assert!(decide(Need::Gxx, "t", reason, true).unwrap_err().contains("ADAQUANT_REQUIRE_GXX"));
        assert!(decide(Need::Gpu, "t", reason, true).unwrap_err().contains("ADAQUANT_REQUIRE_GPU"));
    }
}
