//! `cargo xtask gpu-check`: builds everything the GPU check needs on this machine (which may have no GPU) into one
//! folder that runs on a GPU machine with nothing but an NVIDIA driver (no Rust toolchain, no CUDA toolkit, no
//! NVRTC):
//!
//! - the CUDA test binaries of `adaquant-kernels` (`tests/cuda_*.rs`, built with `--features cuda`),
//! - the `cuda_bench` example (copy bandwidth, then fused K4V2, K4V4, K8V8 and the f16 baseline at 4K, 32K and
//!   128K context, batch 1 and 16, Llama-3-8B head shapes),
//! - the PTX of every kernel specialisation, compiled here with NVRTC (loaded there through `ADAQUANT_PTX_DIR`),
//! - `run.sh`, which runs the tests and the benchmark and writes logs and `bench.jsonl` to a results folder,
//! - `manifest.json` (git revision, time, sha256 of every file).
//!
//! With `--run`, the bundle is then run here too (for a machine that has both a toolchain and a GPU).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(name = "gpu-check", about = "Build the GPU test and benchmark bundle (and optionally run it)")]
struct Args {
    /// Folder of the bundle (replaced).
    #[arg(long, default_value = "target-gpu/bundle")]
    out: PathBuf,
    /// Virtual architecture of the bundled PTX: compute_90 for H100/H200, compute_80 for A100.
    #[arg(long, default_value = "compute_90")]
    arch: String,
    /// Cargo target folder for the CUDA builds (kept apart from `target/` so feature changes do not rebuild it).
    #[arg(long, default_value = "target-gpu/build")]
    target_dir: PathBuf,
    /// Run the bundle after building it (needs a GPU here).
    #[arg(long)]
    run: bool,
}

/// The CUDA test targets bundled, in the order `run.sh` runs them.
const TESTS: [&str; 4] = ["cuda_preamble", "cuda_reference", "cuda_ptx", "cuda_gpu"];

/// Entry point: `args` are the arguments after `gpu-check`.
pub fn run(args: &[String]) -> Result<()> {
    let args = Args::try_parse_from(std::iter::once("gpu-check".to_string()).chain(args.iter().cloned()))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    let out = root.join(&args.out);
    let target_dir = root.join(&args.target_dir);
    let nvrtc = nvrtc_dir(&root)?;
    eprintln!("gpu-check: NVRTC from {}", nvrtc.display());

    let mut test_bins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (name, path) in cargo_executables(
        &root,
        &target_dir,
        &["test", "-p", "adaquant-kernels", "--features", "cuda", "--release", "--no-run"],
    )? {
        if TESTS.contains(&name.as_str()) {
            test_bins.insert(name, path);
        }
    }
    for t in TESTS {
        if !test_bins.contains_key(t) {
            bail!("cargo built no test executable for {t}");
        }
    }
    let bench = cargo_executables(
        &root,
        &target_dir,
        &["build", "-p", "adaquant-kernels", "--features", "cuda", "--release", "--example", "cuda_bench"],
    )?
    .into_iter()
    .find(|(n, _)| n == "cuda_bench")
    .map(|(_, p)| p)
    .context("cargo built no cuda_bench executable")?;

    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin)?;
    for (i, t) in TESTS.iter().enumerate() {
        copy_exe(&test_bins[*t], &bin.join(format!("test-{i}-{t}")))?;
    }
    copy_exe(&bench, &bin.join("cuda_bench"))?;

    let status = Command::new(&bench)
        .args(["--write-ptx", out.join("ptx").to_str().context("non-UTF-8 bundle path")?, "--arch", &args.arch])
        .env("ADAQUANT_NVRTC_LIB", &nvrtc)
        .status()
        .context("running cuda_bench --write-ptx")?;
    if !status.success() {
        bail!("compiling the PTX failed ({status})");
    }

    let script = out.join("run.sh");
    std::fs::write(&script, RUN_SH)?;
    set_executable(&script)?;
    write_manifest(&root, &out, &args.arch)?;
    let size: u64 = walk(&out)?.iter().map(|p| p.metadata().map_or(0, |m| m.len())).sum();
    println!("gpu-check bundle: {} ({:.1} MB)", out.display(), size as f64 / 1e6);
    println!("on the GPU machine: bash {}/run.sh [RESULTS_DIR]", args.out.display());

    if args.run {
        let status = Command::new("bash").arg(&script).status().context("running run.sh")?;
        match status.code() {
            Some(0) => {}
            Some(2) => bail!(
                "the GPU check was not run: the GPU tests skipped (no usable GPU here); see {}",
                out.join("results/summary.txt").display()
            ),
            _ => bail!("the GPU check failed ({status}); see {}", out.join("results/summary.txt").display()),
        }
    }
    Ok(())
}

/// The NVRTC library folder: `$ADAQUANT_NVRTC_LIB`, or what `.ci/install-nvrtc.sh` installs and prints.
fn nvrtc_dir(root: &Path) -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ADAQUANT_NVRTC_LIB").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let out = Command::new("bash")
        .arg(root.join(".ci/install-nvrtc.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running .ci/install-nvrtc.sh")?;
    if !out.status.success() {
        bail!(".ci/install-nvrtc.sh failed ({})", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let dir = text.lines().last().context(".ci/install-nvrtc.sh printed no folder")?;
    Ok(PathBuf::from(dir.trim()))
}

/// Runs a cargo build with `--message-format=json` and returns (target name, executable) of every artifact.
fn cargo_executables(root: &Path, target_dir: &Path, cargo_args: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(root)
        .args(cargo_args)
        .arg("--message-format=json-render-diagnostics")
        .env("CARGO_TARGET_DIR", target_dir)
        // Smaller binaries to carry: no debug info in the bundled release builds.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting cargo {}", cargo_args.join(" ")))?;
    let mut found = Vec::new();
    let stdout = child.stdout.take().context("cargo stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", cargo_args.join(" "));
    }
    Ok(found)
}

fn copy_exe(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_executable(to)
}

#[cfg(unix)]
fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(not(unix))]
fn set_executable(_p: &Path) -> Result<()> {
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn write_manifest(root: &Path, out: &Path, arch: &str) -> Result<()> {
    let rev = Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mut files = serde_json::Map::new();
    for p in walk(out)? {
        let bytes = std::fs::read(&p)?;
        let rel = p.strip_prefix(out)?.to_string_lossy().into_owned();
        files.insert(rel, serde_json::Value::String(format!("{:x}", Sha256::digest(&bytes))));
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let manifest = serde_json::json!({
        "git_rev": rev,
        "created_unix": created,
        "ptx_arch": arch,
        "files": files,
    });
    std::fs::write(out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    Ok(())
}

/// The script that runs on the GPU machine. Exit status 0: passed (the GPU tests ran and passed, the benchmark
/// ran); 1: failed; 2: not run (a GPU test skipped, so there was no usable GPU, and the benchmark was not started).
const RUN_SH: &str = r#"#!/usr/bin/env bash
# adaquant GPU check: the CUDA tests, then copy bandwidth and the decode-attention benchmark.
# Needs only an NVIDIA driver: kernels load from the bundled PTX (ADAQUANT_PTX_DIR), no NVRTC or toolkit.
# Usage: bash run.sh [RESULTS_DIR]   (default: ./results next to this script)
# Ends with one verdict, also the last line of RESULTS_DIR/summary.txt, and its exit status:
#   GPU check: passed    (0) every test passed, the GPU tests skipped none, and the benchmark ran
#   GPU check: FAILED    (1) a test binary or the benchmark failed
#   GPU check: not run   (2) a GPU test skipped (no usable GPU here), so the benchmark was not started either
# A test binary whose tests skipped is "not run", never "passed" (cuda_ptx skips without NVRTC, which a GPU
# machine need not have; CI compiles every kernel to PTX instead).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/results}"
mkdir -p "$out"
export ADAQUANT_PTX_DIR="$here/ptx"
export RUST_BACKTRACE=1
summary="$out/summary.txt"
: > "$summary"
failed=0
gpu_skips=0
gpu_reason=""
verdict() { echo "$1" | tee -a "$summary"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv || true; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
for t in "$here"/bin/test-*; do
    name="$(basename "$t")"
    echo "== $name"
    "$t" --test-threads=1 --nocapture > "$out/$name.log" 2>&1
    rc=$?
    grep -E "^test |test result|SKIPPED|panicked" "$out/$name.log"
    skips="$(grep -c "SKIPPED " "$out/$name.log")"
    if [ "$rc" -ne 0 ]; then
        verdict "$name: FAILED (exit $rc), log in $out/$name.log"
        failed=1
    elif [ "$skips" -gt 0 ]; then
        verdict "$name: not run ($skips skipped; log in $out/$name.log)"
    else
        verdict "$name: passed"
    fi
    case "$name" in
        *cuda_gpu*)
            gpu_skips="$skips"
            gpu_reason="$(grep -m 1 -o "SKIPPED .*" "$out/$name.log")"
            ;;
    esac
done
if [ "$gpu_skips" -gt 0 ]; then
    verdict "cuda_bench: not run (no usable GPU)"
else
    echo "== cuda_bench"
    "$here/bin/cuda_bench" --json "$out/bench.jsonl" 2>&1 | tee "$out/bench.txt"
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then
        verdict "cuda_bench: ran, results in $out/bench.jsonl"
    else
        verdict "cuda_bench: FAILED, log in $out/bench.txt"
        failed=1
    fi
fi
echo "results in $out"
if [ "$failed" -ne 0 ]; then
    verdict "GPU check: FAILED"
    exit 1
elif [ "$gpu_skips" -gt 0 ]; then
    verdict "GPU check: not run ($gpu_skips of the GPU tests skipped: $gpu_reason)"
    exit 2
fi
verdict "GPU check: passed"
exit 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_with_defaults_and_reject_unknown_flags() {
        let a = Args::try_parse_from(["gpu-check"]).unwrap();
        assert_eq!(a.arch, "compute_90");
        assert_eq!(a.out, PathBuf::from("target-gpu/bundle"));
        assert!(!a.run);
        let b = Args::try_parse_from(["gpu-check", "--arch", "compute_80", "--run"]).unwrap();
        assert_eq!(b.arch, "compute_80");
        assert!(b.run);
        assert!(Args::try_parse_from(["gpu-check", "--bogus"]).is_err());
    }

    /// A bundle of shell scripts standing in for the test binaries and the benchmark: each test binary prints
    /// what libtest prints with `--nocapture`; the bench leaves a mark that it ran.
    fn fake_bundle(name: &str, gpu_log: &str, gpu_rc: i32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("adaquant-gpu-check-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let script = |path: &Path, body: &str| {
            std::fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
            set_executable(path).unwrap();
        };
        script(&dir.join("bin/test-0-cuda_preamble"), "echo 'test defines ... ok'; echo 'test result: ok. 1 passed'");
        script(
            &dir.join("bin/test-1-cuda_ptx"),
            "echo 'test every_kernel ... SKIPPED every_kernel: NVRTC not found'; echo ok; echo 'test result: ok. 1 passed'",
        );
        script(&dir.join("bin/test-3-cuda_gpu"), &format!("printf '%s\\n' \"{gpu_log}\"; exit {gpu_rc}"));
        script(&dir.join("bin/cuda_bench"), "touch \"$(dirname \"$0\")/../bench-ran\"; echo 'copy 3000 GB/s'");
        std::fs::write(dir.join("run.sh"), RUN_SH).unwrap();
        dir
    }

    fn run_bundle(dir: &Path) -> (Option<i32>, String) {
        let out = Command::new("bash").arg(dir.join("run.sh")).arg(dir.join("results")).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn a_bundle_run_without_a_gpu_says_not_run_never_passed() {
        let dir = fake_bundle(
            "no-gpu",
            "test gpu_attention ... SKIPPED gpu_attention: the CUDA driver library (libcuda.so.1) was not found\nok\n\
             test result: ok. 1 passed",
            0,
        );
        let (code, stdout) = run_bundle(&dir);
        assert_eq!(code, Some(2), "{stdout}");
        assert!(stdout.contains("test-3-cuda_gpu: not run (1 skipped"), "{stdout}");
        assert!(stdout.contains("test-1-cuda_ptx: not run (1 skipped"), "{stdout}");
        assert!(stdout.contains("test-0-cuda_preamble: passed"), "{stdout}");
        assert!(stdout.contains("cuda_bench: not run (no usable GPU)"), "{stdout}");
        assert!(!dir.join("bench-ran").exists(), "the benchmark must not start without a GPU");
        let summary = std::fs::read_to_string(dir.join("results/summary.txt")).unwrap();
        let last = summary.lines().last().unwrap();
        assert!(
            last.starts_with("GPU check: not run (1 of the GPU tests skipped: SKIPPED gpu_attention: the CUDA"),
            "{last}"
        );
        assert!(!summary.contains("GPU check: passed"), "{summary}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bundle_run_on_a_gpu_passes_only_when_everything_ran() {
        let dir = fake_bundle("gpu", "test gpu_attention ... ok\ntest result: ok. 1 passed", 0);
        let (code, stdout) = run_bundle(&dir);
        assert_eq!(code, Some(0), "{stdout}");
        assert!(stdout.contains("test-3-cuda_gpu: passed"), "{stdout}");
        assert!(dir.join("bench-ran").exists());
        assert_eq!(stdout.lines().last(), Some("GPU check: passed"), "{stdout}");
        std::fs::remove_dir_all(&dir).unwrap();

        let dir =
            fake_bundle("gpu-fails", "test gpu_attention ... FAILED\ntest result: FAILED. 0 passed; 1 failed", 101);
        let (code, stdout) = run_bundle(&dir);
        assert_eq!(code, Some(1), "{stdout}");
        assert!(stdout.contains("test-3-cuda_gpu: FAILED (exit 101)"), "{stdout}");
        assert_eq!(stdout.lines().last(), Some("GPU check: FAILED"), "{stdout}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_script_runs_every_test_and_the_bench_with_bundled_ptx() {
        assert!(RUN_SH.contains("ADAQUANT_PTX_DIR=\"$here/ptx\""));
        assert!(RUN_SH.contains("bin/test-*"));
        assert!(RUN_SH.contains("cuda_bench\" --json"));
        assert!(RUN_SH.starts_with("#!/usr/bin/env bash"));
    }
}
