//! The instruction set the build assumes, checked when a program starts.
//!
//! The workspace builds for `x86-64-v3` (`.cargo/config.toml`), so the compiler may use AVX2, FMA, BMI1/2, F16C,
//! LZCNT and MOVBE anywhere, not only in the kernels' SIMD paths: on an older CPU a program would die with an
//! illegal instruction wherever the first one happens to be. [`exit_unless_supported`], called first thing in
//! `main`, stops it instead with a message that names the missing features.
//!
//! The CPU is read with the `cpuid` instruction directly: `is_x86_feature_detected!` answers `true` without
//! asking the CPU for every feature the build enables, which is exactly the case to catch.
//! Only features this build enables are required, so a build for plain `x86-64` passes the check anywhere.
//!
//! Caveat: the check is itself compiled for `x86-64-v3`. It is kept to integer code (`cpuid`, `xgetbv`, bit tests
//! and a table walk, checked in the release binary's disassembly), but nothing stops the compiler from using a
//! VEX-encoded instruction in `main`'s prologue or here; on a CPU without AVX (rather than only without AVX2) that
//! would still fault before the message.

use std::io::Write;

/// The CPUID words that report the features the build may require, and whether the OS saves AVX state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    /// Leaf 1, ECX.
    pub leaf1_ecx: u32,
    /// Leaf 7 (sub-leaf 0), EBX; zero when the CPU has no leaf 7.
    pub leaf7_ebx: u32,
    /// Leaf 0x8000_0001, ECX; zero when the CPU has no such leaf.
    pub ext1_ecx: u32,
    /// XCR0 enables the SSE and AVX register state (bits 1 and 2): without it, AVX instructions fault.
    pub os_avx: bool,
}

#[derive(Clone, Copy)]
enum Word {
    Leaf1Ecx,
    Leaf7Ebx,
    Ext1Ecx,
}

/// A feature of `x86-64-v2` or `x86-64-v3`: its name (as rustc's `target_feature`), where CPUID reports it,
/// whether it uses the AVX register state, and whether this build enables it.
struct Feature {
    name: &'static str,
    word: Word,
    bit: u32,
    avx_state: bool,
    enabled: bool,
}

macro_rules! feature {
    ($name:tt, $word:ident, $bit:expr, $avx:expr) => {
        Feature {
            name: $name,
            word: Word::$word,
            bit: $bit,
            avx_state: $avx,
            enabled: cfg!(all(target_arch = "x86_64", target_feature = $name)),
        }
    };
}

/// Every feature of `x86-64-v2` and `x86-64-v3` beyond the x86-64 baseline (SSE2), in CPUID order.
const FEATURES: [Feature; 15] = [
    feature!("sse3", Leaf1Ecx, 0, false),
    feature!("ssse3", Leaf1Ecx, 9, false),
    feature!("fma", Leaf1Ecx, 12, true),
    feature!("cmpxchg16b", Leaf1Ecx, 13, false),
    feature!("sse4.1", Leaf1Ecx, 19, false),
    feature!("sse4.2", Leaf1Ecx, 20, false),
    feature!("movbe", Leaf1Ecx, 22, false),
    feature!("popcnt", Leaf1Ecx, 23, false),
    feature!("xsave", Leaf1Ecx, 26, false),
    feature!("avx", Leaf1Ecx, 28, true),
    feature!("f16c", Leaf1Ecx, 29, true),
    feature!("bmi1", Leaf7Ebx, 3, false),
    feature!("avx2", Leaf7Ebx, 5, true),
    feature!("bmi2", Leaf7Ebx, 8, false),
    feature!("lzcnt", Ext1Ecx, 5, false),
];

impl Cpu {
    /// The words of this CPU (all zero off x86-64).
    #[inline(never)]
    pub fn detect() -> Cpu {
        #[cfg(target_arch = "x86_64")]
        {
            let (max_leaf, ..) = cpuid(0);
            let (_, _, leaf1_ecx, _) = cpuid(1);
            let leaf7_ebx = if max_leaf >= 7 { cpuid(7).1 } else { 0 };
            let (max_ext, ..) = cpuid(0x8000_0000);
            let ext1_ecx = if max_ext >= 0x8000_0001 { cpuid(0x8000_0001).2 } else { 0 };
            // XGETBV exists only where the OS has turned it on (OSXSAVE, leaf 1 ECX bit 27).
            let os_avx = leaf1_ecx & (1 << 27) != 0 && xcr0() & 0b110 == 0b110;
            Cpu { leaf1_ecx, leaf7_ebx, ext1_ecx, os_avx }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Cpu::default()
    }

    fn has(&self, f: &Feature) -> bool {
        let word = match f.word {
            Word::Leaf1Ecx => self.leaf1_ecx,
            Word::Leaf7Ebx => self.leaf7_ebx,
            Word::Ext1Ecx => self.ext1_ecx,
        };
        word & (1 << f.bit) != 0 && (!f.avx_state || self.os_avx)
    }

    /// Whether this CPU has every feature this build enables.
    pub fn supports_build(&self) -> bool {
        FEATURES.iter().all(|f| !f.enabled || self.has(f))
    }

    /// The features this build enables that this CPU lacks (or whose registers the OS does not save).
    pub fn missing(&self) -> Vec<&'static str> {
        FEATURES.iter().filter(|f| f.enabled && !self.has(f)).map(|f| f.name).collect()
    }
}

/// `cpuid` with sub-leaf 0, through inline assembly so that the four words stay in registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: `cpuid` exists on every x86-64 CPU and only writes the four registers named here; RBX is reserved
    // by LLVM, so it is saved in a scratch register and swapped back.
    unsafe {
        std::arch::asm!(
            "mov {saved:r}, rbx",
            "cpuid",
            "xchg {saved:r}, rbx",
            saved = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        );
    }
    (eax, ebx, ecx, edx)
}

/// The low word of XCR0 (`xgetbv` with ECX = 0). Only call where OSXSAVE is set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn xcr0() -> u32 {
    let (lo, _hi): (u32, u32);
    // SAFETY: the caller has checked OSXSAVE, so `xgetbv` is enabled; it only writes EAX and EDX.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nostack, nomem, preserves_flags));
    }
    lo
}

/// Writes why `program` cannot run on `cpu`, naming the missing features, in one line and a hint.
pub fn write_message(w: &mut dyn Write, program: &str, cpu: &Cpu) -> std::io::Result<()> {
    let missing = cpu.missing();
    write!(w, "{program}: this CPU lacks ")?;
    for (i, name) in missing.iter().enumerate() {
        w.write_all(if i == 0 { b"" } else { b", " })?;
        w.write_all(name.as_bytes())?;
    }
    writeln!(w, ", which this build of adaquant uses throughout: it is compiled for x86-64-v3 (.cargo/config.toml).")?;
    writeln!(
        w,
        "Run it on an x86-64-v3 CPU (Intel Haswell, AMD Excavator or Zen, or newer), or in a VM that passes AVX2, \
         FMA and BMI2 through to the guest."
    )
}

/// Exits with status 1 and a message naming the missing features when this CPU lacks one that the build enables.
///
/// Call it first thing in `main`, before anything else runs: it is kept out of line and small (see the module
/// notes for what it cannot guard against).
#[inline(never)]
pub fn exit_unless_supported(program: &str) {
    let cpu = Cpu::detect();
    if !cpu.supports_build() {
        unsupported(program, &cpu);
    }
}

#[cold]
#[inline(never)]
fn unsupported(program: &str, cpu: &Cpu) -> ! {
    let _ = write_message(&mut std::io::stderr().lock(), program, cpu);
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_bit() -> Cpu {
        Cpu { leaf1_ecx: u32::MAX, leaf7_ebx: u32::MAX, ext1_ecx: u32::MAX, os_avx: true }
    }

    fn enabled() -> Vec<&'static str> {
        FEATURES.iter().filter(|f| f.enabled).map(|f| f.name).collect()
    }

    #[test]
    fn the_table_follows_the_build_flags() {
        // The workspace builds for x86-64-v3, which enables every feature of the table; a name rustc does not
        // know (say `sse4_1`) would read as disabled and never be checked.
        if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
            assert_eq!(enabled(), FEATURES.iter().map(|f| f.name).collect::<Vec<_>>());
        } else {
            assert!(!enabled().contains(&"avx2"));
        }
    }

    #[test]
    fn this_machine_runs_the_build() {
        // The test binary is built with the same flags and already runs here.
        let cpu = Cpu::detect();
        assert!(cpu.supports_build(), "missing {:?} on {cpu:?}", cpu.missing());
        assert!(cpu.missing().is_empty());
    }

    #[test]
    fn a_cpu_without_avx2_misses_exactly_what_the_build_needs() {
        assert!(every_bit().supports_build());
        assert!(Cpu::default().missing() == enabled());
        // Sandy Bridge: AVX and everything of v2, but no FMA, F16C, MOVBE, BMI, AVX2 or LZCNT.
        let v2_and_avx = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 26) | (1 << 28);
        let sandy = Cpu { leaf1_ecx: v2_and_avx, leaf7_ebx: 0, ext1_ecx: 0, os_avx: true };
        let want: Vec<&str> = ["fma", "movbe", "f16c", "bmi1", "avx2", "bmi2", "lzcnt"]
            .into_iter()
            .filter(|f| enabled().contains(f))
            .collect();
        assert_eq!(sandy.missing(), want);
        assert_eq!(sandy.supports_build(), want.is_empty());
        // Every bit set, but the OS does not save the AVX registers: every AVX-state feature is missing.
        let no_os = Cpu { os_avx: false, ..every_bit() };
        let want: Vec<&str> = ["fma", "avx", "f16c", "avx2"].into_iter().filter(|f| enabled().contains(f)).collect();
        assert_eq!(no_os.missing(), want);
    }

    #[test]
    fn the_message_names_the_missing_features_and_the_build() {
        let cpu = Cpu { leaf7_ebx: 0, ..every_bit() };
        let mut out = Vec::new();
        write_message(&mut out, "adaquant", &cpu).unwrap();
        let text = String::from_utf8(out).unwrap();
        let missing = cpu.missing();
        assert!(text.starts_with(&format!("adaquant: this CPU lacks {},", missing.join(", "))), "{text}");
        if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
            assert!(text.contains("lacks bmi1, avx2, bmi2,"), "{text}");
        }
        assert!(text.contains("x86-64-v3 (.cargo/config.toml)"), "{text}");
        assert_eq!(text.lines().count(), 2);
    }
}
