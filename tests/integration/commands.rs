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
    for (what, n) in [("loops", 100_000u64), ("calls", 20), ("mixed", 3)] {
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

/// With the compiler's inlining on (`RuntimeConfig::compiler_inlining`), the
/// same source still computes what native code computes, and its compiled
/// form is cached under a key of its own: a runtime with the other setting
/// never loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiler_inlining_computes_the_same_and_is_cached_apart() {
    let cache = tempfile::tempdir().unwrap();
    let artifacts = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect();
        v.sort();
        v
    };
    let bytes = crate::support::fixture("cpu-burn");
    let mut seen = Vec::new();
    for inlining in [false, true, false] {
        let rt = wasmtask_runtime::Runtime::new(wasmtask_runtime::RuntimeConfig {
            max_concurrent: 4,
            cache_dir: Some(cache.path().to_path_buf()),
            compiler_inlining: inlining,
            ..wasmtask_runtime::RuntimeConfig::default()
        })
        .unwrap();
        assert_eq!(rt.config().compiler_inlining, inlining);
        let plugin = rt.load_async(bytes.to_vec()).await.expect("loads");
        for (what, n) in [("calls", 20u64), ("mixed", 3)] {
            let mut req = request("cpu-burn", json!(null));
            req.plugin = plugin.clone();
            req.wasi.args = vec![what.into(), n.to_string()];
            let report = rt.spawn(req).expect("spawn").wait().await;
            assert_eq!(report.end, TaskEnd::Exited(0), "{what} inlining={inlining}");
            assert_eq!(
                String::from_utf8_lossy(&report.stdout.data).trim(),
                work::run(what, n).unwrap().to_string(),
                "{what} {n} inlining={inlining}"
            );
        }
        seen.push(artifacts());
    }
    assert_eq!(seen[0].len(), 1, "{:?}", seen[0]);
    assert_eq!(
        seen[1].len(),
        2,
        "inlining shared the plain artifact: {:?}",
        seen[1]
    );
    assert_eq!(seen[2], seen[1], "switching back compiled again");

    // Inlined code is still metered and still stoppable: fuel runs out, and
    // a spinning guest is cancelled.
    let rt = wasmtask_runtime::Runtime::new(wasmtask_runtime::RuntimeConfig {
        max_concurrent: 4,
        compiler_inlining: true,
        ..wasmtask_runtime::RuntimeConfig::default()
    })
    .unwrap();
    let mut req = request("cpu-burn", json!(null));
    req.plugin = rt.load_async(bytes.to_vec()).await.expect("loads");
    req.wasi.args = vec!["calls".into(), "30".into()];
    req.limits.fuel = Some(1_000_000);
    let report = rt.spawn(req).expect("spawn").wait().await;
    let TaskEnd::LimitExceeded(hit) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(hit.kind, wasmtask_runtime::LimitKind::Fuel);
    let mut req = request("spin-loop", json!(null));
    req.plugin = rt
        .load_async(crate::support::fixture("spin-loop").to_vec())
        .await
        .expect("loads");
    force_stop(rt.spawn(req).expect("spawn")).await;
}

/// Cancels `task` with no grace once it runs, and checks that the cancel
/// stopped it by force.
async fn force_stop(task: wasmtask_runtime::RunningTask) {
    task.started().await;
    task.cancel_handle()
        .cancel("test", std::time::Duration::ZERO);
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), task.wait())
        .await
        .expect("the guest did not stop");
    assert_eq!(report.end, TaskEnd::Cancelled, "{:?}", report.end);
    assert!(report.cancel.expect("cancel recorded").forced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview1_core_module_runs_as_a_command() {
    let plugin = crate::support::plugin("p1-command");
    assert!(plugin.is_core_module());
    assert_eq!(plugin.kind(), wasmtask_runtime::PluginKind::Command);
    let mut req = request("p1-command", json!(null));
    req.wasi.args = vec!["a".into(), "b c".into()];
    req.wasi.stdin = Stdin::Bytes(b"12345".to_vec());
    req.wasi.env = vec![("EXIT_CODE".into(), "7".into())];
    let mut events = crate::support::with_events(&mut req);
    let report = run(req).await;
    // Preview 1's proc_exit carries the exact code.
    assert_eq!(report.end, TaskEnd::Exited(7));
    let out = String::from_utf8_lossy(&report.stdout.data).into_owned();
    assert!(
        out.starts_with("p1 arg: a\np1 arg: b c\np1 stdin: 5 bytes\n"),
        "{out}"
    );
    // Its stdout was streamed line by line, like a component's.
    let mut lines = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let wasmtask_runtime::GuestEvent::Output { stream, line } = ev {
            assert_eq!(stream, "stdout");
            lines.push(line);
        }
    }
    assert_eq!(
        lines[..3],
        ["p1 arg: a", "p1 arg: b c", "p1 stdin: 5 bytes"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview1_module_gets_the_same_sandbox_and_cancel() {
    // A read-only preopen stays read-only.
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("p1-command", json!(null));
    req.wasi.dirs.push(Preopen {
        host: dir.path().to_path_buf(),
        guest: "/data".into(),
        writable: false,
    });
    req.wasi.env = vec![("WRITE_TO".into(), "/data/x.txt".into())];
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::Exited(2));
    assert!(!dir.path().join("x.txt").exists());

    // A spinning core module is stopped by a cancel (epoch trap).
    let mut req = request("p1-command", json!(null));
    req.wasi.env = vec![("SPIN".into(), "1".into())];
    force_stop(crate::support::spawn(req)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_starts_in_its_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "one two\n").unwrap();
    let mut req = request("wc", json!(null));
    req.wasi.dirs.push(Preopen {
        host: dir.path().to_path_buf(),
        guest: "/src".into(),
        writable: false,
    });
    req.wasi.cwd = Some("/src".into());
    req.wasi.args = vec!["--json".into(), "a.txt".into()];
    let report = run(req).await;
    assert_eq!(
        report.end,
        TaskEnd::Exited(0),
        "{}",
        String::from_utf8_lossy(&report.stderr.data)
    );
    let v = json(&report.stdout.data);
    assert_eq!(v["total"]["words"], 2, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_or_empty_working_directory_is_refused_before_the_guest_starts() {
    for cwd in ["src", "", "./src"] {
        let mut req = request("wc", json!(null));
        req.wasi.cwd = Some(cwd.into());
        match crate::support::runtime().spawn(req) {
            Err(wasmtask_runtime::StartError::Sandbox(e)) => {
                assert!(e.to_string().contains("absolute"), "{cwd:?}: {e}");
            }
            Err(e) => panic!("{cwd:?}: wrong error: {e}"),
            Ok(_) => panic!("{cwd:?}: a task started with a relative working directory"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview1_module_is_compiled_once_into_the_cache_and_read_back_from_it() {
    let cache = tempfile::tempdir().unwrap();
    let config = || wasmtask_runtime::RuntimeConfig {
        max_concurrent: 4,
        cache_dir: Some(cache.path().to_path_buf()),
        ..wasmtask_runtime::RuntimeConfig::default()
    };
    let artifacts = || -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path(), e.metadata().unwrap().modified().unwrap())
            })
            .filter(|(p, _)| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    let bytes = crate::support::fixture("p1-command");
    let run_in = |rt: wasmtask_runtime::Runtime| async move {
        let mut req = request("p1-command", json!(null));
        req.plugin = rt.load_async(bytes.to_vec()).await.expect("loads");
        req.wasi.args = vec!["x".into()];
        req.wasi.env = vec![("EXIT_CODE".into(), "7".into())];
        let report = rt.spawn(req).expect("spawn").wait().await;
        assert_eq!(report.end, TaskEnd::Exited(7), "{report:?}");
        String::from_utf8_lossy(&report.stdout.data).into_owned()
    };

    // A first runtime compiles it and writes one artifact.
    let first = run_in(wasmtask_runtime::Runtime::new(config()).unwrap()).await;
    let written = artifacts();
    assert_eq!(written.len(), 1, "{written:?}");
    std::thread::sleep(std::time::Duration::from_millis(20));

    // A second one (a restarted server) reads it back: nothing is rewritten.
    let second = run_in(wasmtask_runtime::Runtime::new(config()).unwrap()).await;
    assert_eq!(second, first);
    assert_eq!(artifacts(), written, "the artifact was compiled again");

    // A damaged artifact is not trusted: the module is compiled again.
    std::fs::write(&written[0].0, b"not an artifact").unwrap();
    let third = run_in(wasmtask_runtime::Runtime::new(config()).unwrap()).await;
    assert_eq!(third, first);
    assert!(
        std::fs::read(&written[0].0).unwrap().len() > 100,
        "the damaged artifact was not replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview1_command_reads_a_piped_stdin() {
    // Preview 1's fd_read goes through the same reader-backed stdin.
    let (mut writer, reader) = tokio::io::duplex(4);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        writer.write_all(b"0123456789").await.unwrap();
    });
    let mut req = request("p1-command", json!(null));
    req.wasi.stdin = Stdin::Reader(Box::new(reader));
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::Exited(0));
    let out = String::from_utf8_lossy(&report.stdout.data).into_owned();
    assert!(out.contains("p1 stdin: 10 bytes\n"), "{out}");
}
