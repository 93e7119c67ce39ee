//! The real `wasmtask` binary: `run` end to end, signals, exit statuses, the
//! record in SQLite, `ps`/`show`, and malformed input.

use std::path::Path;
use std::process::{Child, Output, Stdio};

use serde_json::Value;

use crate::support::{bin, watch_stderr};

fn run_json(db: &Path, args: &[&str]) -> (Output, Value) {
    let out = bin()
        .args(["--output", "json", "--db"])
        .arg(db)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn show_json(db: &Path, id: &str) -> Value {
    let out = bin()
        .args(["--output", "json", "--db"])
        .arg(db)
        .args(["show", id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_records_a_successful_task() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (out, v) = run_json(
        &db,
        &["hello", "--input", r#"{"text":"hi there","op":"title"}"#],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["output"]["text"], "Hi There");
    let id = v["id"].as_str().unwrap();
    let shown = show_json(&db, id);
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["output"], v["output"]);
    // ps lists it.
    let ps = bin().arg("--db").arg(&db).arg("ps").output().unwrap();
    assert!(String::from_utf8_lossy(&ps.stdout).contains(id));
}

#[test]
fn run_prints_output_and_streams_command_stdout_in_text_mode() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let out = bin()
        .arg("--db")
        .arg(&db)
        .args(["run", "exit-with", "--env", "EXIT_CODE=7", "--", "alpha"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "a command's exit code passes through"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("arg: alpha"), "{stdout}");
    assert!(stdout.contains("env: EXIT_CODE=7"), "{stdout}");
}

#[test]
fn failures_map_to_exit_statuses_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (out, v) = run_json(&db, &["spin-loop", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(124));
    assert_eq!(v["state"], "timed_out");
    assert_eq!(v["error"]["kind"], "timeout");

    let (out, v) = run_json(&db, &["deep-recursion", "--input", r#"{"depth":null}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["kind"], "trap");
    assert_eq!(v["error"]["detail"], "stack_overflow");

    let (out, v) = run_json(
        &db,
        &[
            "mem-hog",
            "--input",
            r#"{"mb":64}"#,
            "--max-memory",
            "16MiB",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["error"]["kind"], "limit_exceeded");
    assert_eq!(v["error"]["detail"], "memory");

    let (out, v) = run_json(&db, &["panicker"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["error"]["detail"], "unreachable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deliberate panic")
    );
    assert!(
        v["stderr"]["data"]
            .as_str()
            .unwrap()
            .contains("about to panic")
    );

    let (out, v) = run_json(&db, &["stdout-flood", "--input", r#"{"mb":3}"#]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(v["stdout"]["truncated"], true);
    assert_eq!(v["stdout"]["total_bytes"], 3 << 20);

    let (out, v) = run_json(&db, &["spin-loop", "--fuel", "1000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["error"]["detail"], "fuel");
    assert_eq!(v["usage"]["fuel_consumed"], 1_000_000);
}

/// Starts `wasmtask run` and returns once the guest is running (the binary
/// logs "task started" at info level when it is).
fn start_run(db: &Path, args: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = bin()
        .env("WASMTASK_LOG", "info")
        .args(["--output", "json", "--db"])
        .arg(db)
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, reader) = watch_stderr(&mut child, |line| {
        line.contains("task started").then(String::new)
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("the task starts");
    (child, reader)
}

fn signal(child: &Child, sig: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn finish(child: Child, reader: std::thread::JoinHandle<String>) -> (Option<i32>, Value, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = reader.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), v, stderr)
}

#[test]
fn sigint_cancels_a_spinning_guest_and_the_database_says_canceled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (child, reader) = start_run(&db, &["spin-loop"]);
    signal(&child, libc::SIGINT);
    let (code, v, stderr) = finish(child, reader);
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(v["state"], "canceled");
    assert_eq!(v["cancel"]["actor"], "signal:SIGINT");
    assert_eq!(v["cancel"]["reason"], "interrupted by SIGINT");
    assert_eq!(v["cancel"]["forced"], true);
    assert!(v["cancel"]["latency_us"].as_u64().is_some());
    // The durable record agrees.
    let shown = show_json(&db, v["id"].as_str().unwrap());
    assert_eq!(shown["state"], "canceled");
    assert_eq!(shown["cancel"]["actor"], "signal:SIGINT");
}

#[test]
fn sigterm_cancels_a_sleeping_guest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (child, reader) = start_run(&db, &["sleeper", "--input", r#"{"ms":120000}"#]);
    signal(&child, libc::SIGTERM);
    let (code, v, stderr) = finish(child, reader);
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(v["state"], "canceled");
    assert_eq!(v["cancel"]["actor"], "signal:SIGTERM");
}

#[test]
fn with_grace_the_first_sigint_lets_the_guest_return_a_partial_result() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (child, reader) = start_run(
        &db,
        &[
            "cooperative",
            "--input",
            r#"{"steps":100000000,"work":100000}"#,
            "--grace",
            "60s",
        ],
    );
    signal(&child, libc::SIGINT);
    let (code, v, stderr) = finish(child, reader);
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(v["state"], "canceled");
    assert_eq!(v["output"]["partial"], true, "{v}");
    assert_eq!(v["cancel"]["acknowledged"], true);
    assert_eq!(v["cancel"]["forced"], false);
    assert_eq!(v["cancel"]["grace_ms"], 60_000);
}

#[test]
fn with_grace_a_second_signal_forces() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (child, reader) = start_run(&db, &["spin-loop", "--grace", "600s"]);
    signal(&child, libc::SIGINT);
    // The first signal only asks; spin-loop never looks. Wait until the
    // request is on record, then force.
    let id = wait_for_state(&db, "cancel_requested");
    signal(&child, libc::SIGINT);
    let (code, v, stderr) = finish(child, reader);
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(v["id"], id);
    assert_eq!(v["state"], "canceled");
    assert_eq!(v["cancel"]["forced"], true);
    assert_eq!(
        v["cancel"]["grace_ms"], 0,
        "the second signal lowered the grace"
    );
}

/// Polls the database (through the binary) until some task is in `state`.
fn wait_for_state(db: &Path, state: &str) -> String {
    for _ in 0..600 {
        let out = bin()
            .args(["--output", "json", "--db"])
            .arg(db)
            .args(["ps", "--state", state])
            .output()
            .unwrap();
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(t) = v.as_array().and_then(|a| a.first()) {
                return t["id"].as_str().unwrap().to_owned();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no task reached {state}");
}

#[test]
fn malformed_input_gets_exit_2_and_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not wasm at all").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let empty_component = dir.path().join("empty.wasm");
    std::fs::write(&empty_component, b"\0asm\x0d\0\x01\0").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["/no/such/plugin.wasm".into()], "no such file"),
        (vec![text.display().to_string()], "not a WebAssembly file"),
        (vec![core.display().to_string()], "core WebAssembly module"),
        (
            vec![empty_component.display().to_string()],
            "unsupported world",
        ),
        (
            vec!["hello".into(), "--input".into(), "{not json".into()],
            "not valid JSON",
        ),
        (
            vec!["hello".into(), "--max-memory".into(), "lots".into()],
            "invalid size",
        ),
        (
            vec!["hello".into(), "--dir".into(), "/no/such/dir".into()],
            "no such directory",
        ),
        (
            vec!["hello".into(), "--timeout".into(), "soon".into()],
            "invalid duration",
        ),
    ];
    for (args, want) in cases {
        let out = bin()
            .arg("--db")
            .arg(&db)
            .arg("run")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: expected {want:?} in {stderr}"
        );
        assert!(
            stderr.lines().count() <= 6,
            "{args:?}: not a short message: {stderr}"
        );
    }
}

#[test]
fn show_of_an_unknown_task_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let (out, _) = run_json(&db, &["hello", "--input", r#"{"text":"x"}"#]);
    assert!(out.status.success());
    let out = bin()
        .arg("--db")
        .arg(&db)
        .args(["show", "t_nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task t_nope"));
}
