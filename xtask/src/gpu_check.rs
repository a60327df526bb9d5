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
        if !status.success() {
            bail!("run.sh failed ({status})");
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

/// The script that runs on the GPU machine.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# adaquant GPU check: the CUDA tests, then copy bandwidth and the decode-attention benchmark.
# Needs only an NVIDIA driver: kernels load from the bundled PTX (ADAQUANT_PTX_DIR), no NVRTC or toolkit.
# Usage: bash run.sh [RESULTS_DIR]   (default: ./results next to this script)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/results}"
mkdir -p "$out"
export ADAQUANT_PTX_DIR="$here/ptx"
export RUST_BACKTRACE=1
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv || true; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
for t in "$here"/bin/test-*; do
    name="$(basename "$t")"
    echo "== $name"
    "$t" --test-threads=1 --nocapture > "$out/$name.log" 2>&1
    rc=$?
    grep -E "^test |test result|SKIPPED|panicked" "$out/$name.log"
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $name (exit $rc), log in $out/$name.log"
        status=1
    fi
done
echo "== cuda_bench"
"$here/bin/cuda_bench" --json "$out/bench.jsonl" 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: cuda_bench"; status=1; }
echo "results in $out"
exit $status
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

    #[test]
    fn run_script_runs_every_test_and_the_bench_with_bundled_ptx() {
        assert!(RUN_SH.contains("ADAQUANT_PTX_DIR=\"$here/ptx\""));
        assert!(RUN_SH.contains("bin/test-*"));
        assert!(RUN_SH.contains("cuda_bench\" --json"));
        assert!(RUN_SH.starts_with("#!/usr/bin/env bash"));
    }
}
