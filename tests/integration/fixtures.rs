//! Every plugin under `plugins/` is built and used by at least one test, so a
//! fixture cannot silently rot.

use std::path::Path;

#[test]
fn every_plugin_is_built_and_used_by_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tests_dir = root.join("tests/integration");
    let mut sources = String::new();
    for entry in std::fs::read_dir(&tests_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("fixtures.rs") {
            sources.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    let mut plugins = Vec::new();
    for entry in std::fs::read_dir(root.join("plugins")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("Cargo.toml").exists() && path.join("src").exists() {
            plugins.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(plugins.len() >= 12, "found only {plugins:?}");
    for name in &plugins {
        assert!(
            wasmtask::builtin::find(name).is_some(),
            "plugin {name} is not built into the binary"
        );
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "plugin {name} is not used by any integration test"
        );
    }
}
