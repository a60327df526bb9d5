//! Run-time choice of the SIMD level of the fast paths, and a way to force a lower one.
//!
//! The fast kernels detect AVX2 and FMA (and AVX-512 where a kernel has such a path) once at run time. Tests and
//! benchmarks compare levels in one binary by calling [`set_simd_override`]; the environment variable
//! `ADAQUANT_SIMD` (`scalar`, `avx2` or `avx512`) sets the initial override for whole programs.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// A SIMD level of the fast kernels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust, no target features beyond the build's.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64).
    Avx2,
    /// AVX-512 F/BW/VL with FMA (x86-64).
    Avx512,
}

impl SimdLevel {
    /// Stable lower-case name (`scalar`, `avx2`, `avx512`).
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn from_u8(x: u8) -> Option<SimdLevel> {
        match x {
            1 => Some(SimdLevel::Scalar),
            2 => Some(SimdLevel::Avx2),
            3 => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    fn to_u8(o: Option<SimdLevel>) -> u8 {
        match o {
            None => 0,
            Some(SimdLevel::Scalar) => 1,
            Some(SimdLevel::Avx2) => 2,
            Some(SimdLevel::Avx512) => 3,
        }
    }
}

/// The best level this CPU supports.
pub fn detected() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            if avx512 {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    })
}

/// 0: no override; otherwise `SimdLevel::to_u8`. 255: not yet initialised from the environment.
static OVERRIDE: AtomicU8 = AtomicU8::new(255);

fn override_level() -> Option<SimdLevel> {
    let mut v = OVERRIDE.load(Ordering::Relaxed);
    if v == 255 {
        let from_env = match std::env::var("ADAQUANT_SIMD").ok().as_deref().map(str::trim) {
            Some("scalar") => Some(SimdLevel::Scalar),
            Some("avx2") => Some(SimdLevel::Avx2),
            Some("avx512") => Some(SimdLevel::Avx512),
            _ => None,
        };
        v = SimdLevel::to_u8(from_env);
        // Another thread may have set an override meanwhile; keep it.
        let _ = OVERRIDE.compare_exchange(255, v, Ordering::Relaxed, Ordering::Relaxed);
        v = OVERRIDE.load(Ordering::Relaxed);
    }
    SimdLevel::from_u8(v)
}

/// Caps the level of every fast path at `level` (`None` removes the cap). The cap is process-wide.
pub fn set_simd_override(level: Option<SimdLevel>) {
    OVERRIDE.store(SimdLevel::to_u8(level), Ordering::Relaxed);
}

/// The level the fast paths use now: the detected level, capped by the override.
#[inline]
pub fn active() -> SimdLevel {
    match override_level() {
        Some(cap) => cap.min(detected()),
        None => detected(),
    }
}
