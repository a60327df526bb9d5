//! The `adaquant` program reads `--cache` with the cache crate's one parser in every subcommand: short names,
//! inline JSON in adaquant's and the kvq shape, and JSON files. A bad `--cache` is reported before the model loads,
//! so the checks without the model use a model path that does not exist: the error then says which came first.

use std::process::{Command, Output};

use adaquant_model::paths;

fn adaquant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_adaquant")).args(args).output().expect("running adaquant")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const MISSING_MODEL: &str = "/nonexistent/adaquant-test-model.gguf";
const INLINE: [&str; 4] = [
    r#"{"kind":"full_f16"}"#,
    r#"{"kind":"kvq","kvq":{"nbits":{"k":4,"v":2},"residual_length":16}}"#,
    r#"{"nbits":{"k":4,"v":2},"group_size":32}"#,
    r#" {"layers":[{"k":"full","v":{"quant":{"bits":2,"group":32,"axis":"per_token"}}}]} "#,
];

/// The cache argument was accepted when the run gets as far as looking for the (missing) model: the error names
/// the model, not the cache.
fn accepted(o: &Output, what: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "{what}: {e}");
    assert!(e.contains(MISSING_MODEL) && !e.contains("--cache"), "{what}: the cache should be accepted: {e}");
}

/// The cache argument was refused before the model was loaded, naming the argument.
fn refused(o: &Output, what: &str, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "{what}: {e}");
    assert!(e.contains("--cache") && e.contains(needle) && !e.contains("loading"), "{what}: {e}");
}

#[test]
fn every_subcommand_accepts_inline_json_caches() {
    for cache in INLINE {
        accepted(&adaquant(&["generate", "--model", MISSING_MODEL, "--prompt", "hi", "--cache", cache]), cache);
        accepted(&adaquant(&["ppl", "--model", MISSING_MODEL, "--cache", cache]), cache);
        accepted(&adaquant(&["eval-tasks", "--model", MISSING_MODEL, "--tasks", "passkey", "--cache", cache]), cache);
    }
    accepted(
        &adaquant(&["generate", "--model", MISSING_MODEL, "--prompt", "hi", "--cache", "k4v2-g32-r64-s4-kivi"]),
        "short",
    );
    refused(
        &adaquant(&["generate", "--model", MISSING_MODEL, "--prompt", "hi", "--cache", r#"{"kind":"bogus"}"#]),
        "bogus kind",
        "bogus",
    );
    refused(&adaquant(&["ppl", "--model", MISSING_MODEL, "--cache", r#"{"nbits":4,"axis":0}"#]), "kvq axis 0", "axis");
    refused(&adaquant(&["eval-tasks", "--model", MISSING_MODEL, "--cache", "k7v2"]), "width 7", "k7v2");
}

#[test]
fn generate_runs_through_an_inline_json_cache() {
    let name = "generate_runs_through_an_inline_json_cache";
    let Some(model) = paths::require(paths::default_model(), name) else { return };
    let model = model.display().to_string();
    let o = adaquant(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "4",
        "--cache",
        r#"{"kind":"kvq","kvq":{"nbits":{"k":4,"v":2},"residual_length":0,"group_size":32}}"#,
    ]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("cache K4V2 g32/32 r0"), "the inline spec is the cache used: {e}");
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}
