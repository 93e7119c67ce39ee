//! The sandbox denies by default: no host files, no inherited environment, no
//! network; read-only preopens stay read-only.

use serde_json::json;
use wasmtask_runtime::{Preopen, TaskEnd};

use crate::support::{json, request, run};

fn probe_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inside.txt"), "visible").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_finds_nothing_it_should_not() {
    // Make sure there is something to find if the sandbox leaked.
    assert!(std::env::var_os("PATH").is_some());
    let dir = probe_dir();
    let mut req = request("sandbox-probe", json!({"ro_dir": "/data"}));
    req.wasi.dirs.push(Preopen {
        host: dir.path().to_path_buf(),
        guest: "/data".into(),
        writable: false,
    });
    let report = run(req).await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    let out = json(out);
    assert_eq!(out["readable"], json!([]), "host files leaked: {out}");
    assert_eq!(out["env"], json!([]), "host environment leaked: {out}");
    assert_eq!(out["network"], json!([]), "network reachable: {out}");
    assert_eq!(out["ro_write"], false, "wrote into a read-only dir: {out}");
    assert!(!dir.path().join("probe-write.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_given_environment_is_visible() {
    let mut req = request("sandbox-probe", json!({"ro_dir": null}));
    req.wasi.env.push(("GIVEN".into(), "yes".into()));
    let report = run(req).await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(out)["env"], json!(["GIVEN"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_dir_can_be_written() {
    // The counterpart of the read-only check: the probe can tell the difference.
    let dir = probe_dir();
    let mut req = request("sandbox-probe", json!({"ro_dir": "/data"}));
    req.wasi.dirs.push(Preopen {
        host: dir.path().to_path_buf(),
        guest: "/data".into(),
        writable: true,
    });
    let report = run(req).await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(
        json(out)["ro_write"],
        true,
        "the probe can tell a writable dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_preopen_is_a_clear_start_error() {
    let mut req = request("sandbox-probe", json!({"ro_dir": null}));
    req.wasi.dirs.push(Preopen {
        host: "/definitely/not/here".into(),
        guest: "/data".into(),
        writable: false,
    });
    let err = crate::support::runtime().spawn(req).unwrap_err();
    assert!(err.to_string().contains("/definitely/not/here"), "{err}");
}
