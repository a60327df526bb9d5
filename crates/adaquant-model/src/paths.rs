//! Where adaquant finds models and datasets.
//!
//! One variable decides: `ADAQUANT_DATA`, a folder laid out like the repository's `data/` after
//! `cargo xtask fetch` (`models/<file>.gguf`, `wikitext-2-raw/wiki.test.raw`, `hellaswag/...`, `arc_easy/...`,
//! `lambada_openai/...`). When it is unset, the repository's own `data/` folder is used.

use std::path::{Path, PathBuf};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// File name of Gemma 3 270M (base, Q4_K_M), the second real model (`cargo xtask fetch` places it).
pub const GEMMA3_270M_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The repository root (where the workspace `Cargo.toml` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

/// The data folder: `$ADAQUANT_DATA`, or `<repository>/data`.
pub fn data_root() -> PathBuf {
    match std::env::var_os("ADAQUANT_DATA") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("data"),
    }
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

/// For tests that need real files: returns the path if it exists, otherwise prints why the test is skipped.
pub fn require(path: PathBuf, test: &str) -> Option<PathBuf> {
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED {test}: {} not found. Run `cargo xtask fetch` (or set ADAQUANT_DATA to a folder holding the models and datasets).",
            path.display()
        );
        None
    }
}
