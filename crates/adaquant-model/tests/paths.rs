//! The data folder is found at run time: `$ADAQUANT_DATA`, then `./data`, then beside the executable.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use adaquant_model::paths::{data_candidates_from, is_data_folder, pick_data_root, DataCandidate};

#[test]
fn an_explicit_data_variable_is_the_only_candidate() {
    let c = data_candidates_from(
        Some(OsString::from("/srv/adaquant-data")),
        Some(Path::new("/home/u/work")),
        Some(Path::new("/opt/bin/adaquant")),
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].path, PathBuf::from("/srv/adaquant-data"));
    // Even when it does not exist: a typo must not silently fall back to another folder.
    assert_eq!(pick_data_root(&c, |_| false), PathBuf::from("/srv/adaquant-data"));
}

#[test]
fn without_the_variable_the_working_directory_comes_before_the_executable() {
    let c = data_candidates_from(
        Some(OsString::new()),
        Some(Path::new("/home/u/work")),
        Some(Path::new("/home/u/adaquant/target/release/deps/adaquant")),
    );
    let paths: Vec<&Path> = c.iter().map(|c| c.path.as_path()).collect();
    assert_eq!(
        paths,
        [
            Path::new("/home/u/work/data"),
            Path::new("/home/u/adaquant/target/release/deps/data"),
            Path::new("/home/u/adaquant/target/release/data"),
            Path::new("/home/u/adaquant/target/data"),
            Path::new("/home/u/adaquant/data"),
        ]
    );
    assert_eq!(c[0].source, "./data");
    // The repository's data/ above target/ is found when the working directory has none.
    let repo = |c: &DataCandidate| c.path == Path::new("/home/u/adaquant/data");
    assert_eq!(pick_data_root(&c, repo), PathBuf::from("/home/u/adaquant/data"));
    // ./data wins when both exist.
    assert_eq!(pick_data_root(&c, |_| true), PathBuf::from("/home/u/work/data"));
    // Nothing exists: ./data, so messages name the folder a user would create.
    assert_eq!(pick_data_root(&c, |_| false), PathBuf::from("/home/u/work/data"));
}

#[test]
fn the_build_tree_is_not_baked_into_the_default() {
    // An installed binary far from the build tree looks next to itself, not where it was compiled.
    let c = data_candidates_from(None, Some(Path::new("/tmp/x")), Some(Path::new("/usr/local/bin/adaquant")));
    let built_here = adaquant_model::paths::workspace_root().join("data");
    assert!(c.iter().all(|c| c.path != built_here), "{c:?}");
    assert_eq!(c.last().unwrap().path, PathBuf::from("/data"));
}

#[test]
fn a_folder_beside_the_executable_must_look_like_a_data_folder() {
    let dir = std::env::temp_dir().join(format!("adaquant-paths-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let c = data_candidates_from(None, Some(&dir.join("elsewhere")), Some(&dir.join("bin/adaquant")));
    let beside = c.iter().find(|c| c.path == dir.join("data")).unwrap();
    assert!(!is_data_folder(beside), "an empty data/ above the binary is not taken");
    std::fs::write(dir.join("data/manifest.json"), "{}").unwrap();
    assert!(is_data_folder(beside));
    assert_eq!(pick_data_root(&c, is_data_folder), dir.join("data"));
    // ./data only has to exist.
    std::fs::create_dir_all(dir.join("elsewhere/data")).unwrap();
    assert_eq!(pick_data_root(&c, is_data_folder), dir.join("elsewhere/data"));
    let _ = std::fs::remove_dir_all(&dir);
}
