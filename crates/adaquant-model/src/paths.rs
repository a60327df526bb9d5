//! Where adaquant finds models and datasets.
//!
//! The data folder is laid out like the repository's `data/` after `cargo xtask fetch` (`models/<file>.gguf`,
//! `wikitext-2-raw/wiki.test.raw`, `hellaswag/...`, `arc_easy/...`, `lambada_openai/...`).
//! It is found at run time, never from the build tree, so an installed or copied binary works too:
//! 1. `$ADAQUANT_DATA` when it is set (and then nothing else is tried);
//! 2. `./data` in the working directory;
//! 3. a `data/` folder beside the executable or up to three folders above it (so `target/release/adaquant` and the
//!    test binaries under `target/debug/deps/` find the repository's `data/`).
//!
//! When none exists the default is `./data`, and [`data_search`] says where adaquant looked.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// File name of Gemma 3 270M (base, Q4_K_M), the second real model (`cargo xtask fetch` places it).
pub const GEMMA3_270M_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The variable that names the data folder.
pub const DATA_ENV: &str = "ADAQUANT_DATA";

const BESIDE_EXE: &str = "beside the executable";

/// How many folders above the executable's own folder are searched for `data/`.
const EXE_LEVELS: usize = 3;

/// The repository root of the build tree (where the workspace `Cargo.toml` lived at compile time). Not used to find
/// data: a binary copied elsewhere must not point into the build tree.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// One folder adaquant considers as its data folder, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataCandidate {
    /// Where the candidate comes from: `$ADAQUANT_DATA`, `./data` or `beside the executable`.
    pub source: &'static str,
    pub path: PathBuf,
}

/// The candidate data folders in search order, from an explicit environment value, working directory and
/// executable path (the testable core of [`data_root`]).
///
/// A set, non-empty `ADAQUANT_DATA` is the only candidate: an explicit choice never falls back silently.
pub fn data_candidates_from(env: Option<OsString>, cwd: Option<&Path>, exe: Option<&Path>) -> Vec<DataCandidate> {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return vec![DataCandidate { source: "$ADAQUANT_DATA", path: PathBuf::from(p) }];
    }
    let mut out =
        vec![DataCandidate { source: "./data", path: cwd.map_or_else(|| PathBuf::from("data"), |d| d.join("data")) }];
    if let Some(dir) = exe.and_then(Path::parent) {
        for d in dir.ancestors().take(EXE_LEVELS + 1) {
            let path = d.join("data");
            if !out.iter().any(|c| c.path == path) {
                out.push(DataCandidate { source: BESIDE_EXE, path });
            }
        }
    }
    out
}

/// The candidate data folders of this process, in search order.
pub fn data_candidates() -> Vec<DataCandidate> {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    data_candidates_from(std::env::var_os(DATA_ENV), cwd.as_deref(), exe.as_deref())
}

/// Picks the data folder among candidates: the first that `usable` accepts, else the first candidate.
pub fn pick_data_root(candidates: &[DataCandidate], usable: impl Fn(&DataCandidate) -> bool) -> PathBuf {
    candidates
        .iter()
        .find(|c| usable(c))
        .or_else(|| candidates.first())
        .map_or_else(|| PathBuf::from("data"), |c| c.path.clone())
}

/// Whether a candidate exists as a data folder. A folder found beside the executable must also look like one
/// (`manifest.json` or `models/` inside), so an unrelated `/data` mount above an installed binary is not taken.
pub fn is_data_folder(c: &DataCandidate) -> bool {
    c.path.is_dir()
        && (c.source != BESIDE_EXE || c.path.join("manifest.json").is_file() || c.path.join("models").is_dir())
}

/// The data folder: `$ADAQUANT_DATA`, else `./data`, else a `data/` folder beside the executable (see the module
/// documentation).
pub fn data_root() -> PathBuf {
    pick_data_root(&data_candidates(), is_data_folder)
}

/// Where adaquant looked for its data folder, for error messages, e.g. `$ADAQUANT_DATA unset; ./data: /w/data
/// (missing); beside the executable: /opt/x/data (missing), /opt/data (found)`.
pub fn data_search() -> String {
    let mut parts: Vec<String> = Vec::new();
    if std::env::var_os(DATA_ENV).is_none_or(|v| v.is_empty()) {
        parts.push("$ADAQUANT_DATA unset".into());
    }
    let mut last_source = "";
    for c in data_candidates() {
        let entry = format!("{} ({})", c.path.display(), if is_data_folder(&c) { "found" } else { "missing" });
        if c.source == last_source {
            if let Some(p) = parts.last_mut() {
                p.push_str(", ");
                p.push_str(&entry);
            }
        } else {
            parts.push(format!("{}: {entry}", c.source));
            last_source = c.source;
        }
    }
    parts.join("; ")
}

/// The default model, `<data>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model() -> PathBuf {
    data_root().join("models").join(DEFAULT_MODEL_FILE)
}

/// Gemma 3 270M, `<data>/models/gemma-3-270m-q4_k_m.gguf`.
pub fn gemma3_270m() -> PathBuf {
    data_root().join("models").join(GEMMA3_270M_FILE)
}

/// WikiText-2 raw test text.
pub fn wikitext2_test() -> PathBuf {
    data_root().join("wikitext-2-raw").join("wiki.test.raw")
}

/// HellaSwag validation in llama.cpp's six-lines-per-item text format.
pub fn hellaswag() -> PathBuf {
    data_root().join("hellaswag").join("hellaswag_val_full.txt")
}

/// ARC-Easy test as JSONL.
pub fn arc_easy() -> PathBuf {
    data_root().join("arc_easy").join("arc_easy.jsonl")
}

/// LAMBADA (OpenAI) as JSONL.
pub fn lambada() -> PathBuf {
    data_root().join("lambada_openai").join("lambada_openai.jsonl")
}

/// For tests that need real files: returns the path if it exists; otherwise prints `SKIPPED <test>: ...` and
/// returns `None`, or, when `ADAQUANT_REQUIRE_DATA` is set (CI sets it once the data is fetched), panics with the
/// same message (see [`adaquant_kernels::skip`]).
#[track_caller]
pub fn require(path: PathBuf, test: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let reason = format!(
        "{} not found. Run `cargo xtask fetch` (or set ADAQUANT_DATA to a folder holding the models and datasets).",
        path.display()
    );
    adaquant_kernels::skip::skip(adaquant_kernels::skip::Need::Data, test, &reason);
    None
}
