//! `wasi:cli` command components run as tasks: args, env, stdin, preopened
//! dirs, exit codes.

use serde_json::json;
use wasmtask_runtime::{Preopen, Stdin, TaskEnd};

use crate::support::{json, request, run};

/// `cpu-burn`'s work, compiled natively.
#[path = "../../plugins/cpu-burn/src/work.rs"]
mod work;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn args_env_and_exit_code_reach_the_command() {
    let mut req = request("exit-with", json!(null));
    req.wasi.args = vec!["first".into(), "second arg".into()];
    req.wasi.env = vec![
        ("EXIT_CODE".into(), "3".into()),
        ("COLOR".into(), "blue".into()),
    ];
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::Exited(3));
    let out = String::from_utf8_lossy(&report.stdout.data).into_owned();
    assert!(out.contains("arg: first\n"), "{out}");
    assert!(out.contains("arg: second arg\n"), "{out}");
    assert!(out.contains("env: COLOR=blue\n"), "{out}");
    assert!(out.contains("env: EXIT_CODE=3\n"), "{out}");
    assert_eq!(
        out.matches("env: ").count(),
        2,
        "nothing else is inherited: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_zero_is_success() {
    let report = run(request("exit-with", json!(null))).await;
    assert_eq!(report.end, TaskEnd::Exited(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wc_counts_a_preopened_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "one two\nthree\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/b.txt"), "four\n").unwrap();
    let mut req = request("wc", json!(null));
    req.wasi.dirs.push(Preopen {
        host: dir.path().to_path_buf(),
        guest: "/src".into(),
        writable: false,
    });
    req.wasi.args = vec!["--json".into(), "/src".into()];
    let report = run(req).await;
    assert_eq!(
        report.end,
        TaskEnd::Exited(0),
        "stderr: {}",
        String::from_utf8_lossy(&report.stderr.data)
    );
    let out = json(&report.stdout.data);
    assert_eq!(out["total"]["lines"], 3, "{out}");
    assert_eq!(out["total"]["words"], 4, "{out}");
    assert_eq!(out["total"]["bytes"], 19, "{out}");
    assert_eq!(out["files"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wc_reads_stdin_and_fails_on_a_missing_path() {
    let mut req = request("wc", json!(null));
    req.wasi.stdin = Stdin::Bytes(b"a b c\nd\n".to_vec());
    req.wasi.args = vec!["--json".into()];
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::Exited(0));
    assert_eq!(json(&report.stdout.data)["total"]["words"], 4);

    let mut req = request("wc", json!(null));
    req.wasi.args = vec!["/nope".into()];
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::Exited(1));
    assert!(!report.stderr.data.is_empty());
}

/// The same source, compiled to wasm and natively, computes the same sums
/// (the benchmark's overhead comparison relies on it); bad arguments fail
/// (std's exit code 2 arrives as 1: WASI 0.2 `exit` carries only failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_burn_computes_what_native_code_computes() {
    for (what, n) in [("loops", 100_000u64), ("calls", 20)] {
        let mut req = request("cpu-burn", json!(null));
        req.wasi.args = vec![what.into(), n.to_string()];
        let report = run(req).await;
        assert_eq!(report.end, TaskEnd::Exited(0), "{what}");
        let printed = String::from_utf8_lossy(&report.stdout.data)
            .trim()
            .to_owned();
        assert_eq!(
            printed,
            work::run(what, n).unwrap().to_string(),
            "{what} {n}"
        );
    }
    assert_eq!(work::fib(20), 6765);
    let mut req = request("cpu-burn", json!(null));
    req.wasi.args = vec!["nope".into()];
    assert_eq!(run(req).await.end, TaskEnd::Exited(1));
}
