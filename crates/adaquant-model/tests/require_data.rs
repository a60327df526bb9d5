//! `paths::require` on a missing file: a skip that prints SKIPPED (and logs it to `ADAQUANT_SKIP_LOG`) by default,
//! and a failure with the same message when `ADAQUANT_REQUIRE_DATA` is set. The test runs this test binary again
//! with each environment and reads what the child printed.

use std::path::PathBuf;
use std::process::Command;

use adaquant_model::paths;

const CHILD_ENV: &str = "ADAQUANT_TEST_REQUIRE_CHILD";

/// Does nothing unless started by `missing_data_skips_or_fails_as_the_environment_says`.
#[test]
fn child_requires_the_default_model() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    assert!(paths::require(paths::default_model(), "child_requires_the_default_model").is_none());
}

fn run_child(data: &PathBuf, log: &PathBuf, require: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_requires_the_default_model", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("ADAQUANT_DATA", data)
        .env("ADAQUANT_SKIP_LOG", log)
        .env_remove("ADAQUANT_REQUIRE_DATA");
    if let Some(v) = require {
        cmd.env("ADAQUANT_REQUIRE_DATA", v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn missing_data_skips_or_fails_as_the_environment_says() {
    let dir = std::env::temp_dir().join(format!("adaquant-require-{}", std::process::id()));
    let data = dir.join("empty-data");
    std::fs::create_dir_all(&data).unwrap();
    let log = dir.join("skipped.txt");
    let _ = std::fs::remove_file(&log);

    for unset in [None, Some(""), Some("0")] {
        let (ok, out) = run_child(&data, &log, unset);
        assert!(ok, "ADAQUANT_REQUIRE_DATA={unset:?}: the child should skip and pass:\n{out}");
        assert!(out.contains("SKIPPED child_requires_the_default_model: "), "{out}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.lines().count(), 3, "{logged}");
    assert!(logged.lines().all(|l| l.starts_with("SKIPPED child_requires_the_default_model: ")), "{logged}");

    let (ok, out) = run_child(&data, &log, Some("1"));
    assert!(!ok, "ADAQUANT_REQUIRE_DATA=1: the child should fail:\n{out}");
    assert!(out.contains("child_requires_the_default_model: "), "{out}");
    assert!(out.contains(paths::DEFAULT_MODEL_FILE) && out.contains("not found"), "{out}");
    assert!(out.contains("ADAQUANT_REQUIRE_DATA is set"), "{out}");
    assert!(!out.contains("SKIPPED child"), "{out}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), logged, "a failure is not logged as a skip");
    std::fs::remove_dir_all(&dir).unwrap();
}
