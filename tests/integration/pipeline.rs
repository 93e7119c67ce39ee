//! Pipelines through the real binary: `wasmtask pipeline run` (the example
//! pipeline, parallel and dependent steps, fail-fast, Ctrl+C aborts, workspace
//! access and cleanup, bad manifests) and `wasmtask pipeline submit` against a
//! real server.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::Value;
use wasmtask::db::Db;
use wasmtask::model::EventKind;

use crate::server_support::{Server, fixtures_config, within};
use crate::support::bin;

/// A scratch directory with a manifest and a sample source tree.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("tests")).unwrap();
        std::fs::write(src.join("notes.txt"), "one two three\nfour\n").unwrap();
        std::fs::write(src.join("tests/a.t"), "test sum: 1 + 1 = 2\n").unwrap();
        Scratch { dir }
    }

    fn path(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path()).unwrap()
    }

    fn manifest(&self, text: &str) -> PathBuf {
        let p = self.path().join("pipeline.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }
}

fn pipeline_cmd(scratch: &Scratch, file: &Path) -> std::process::Command {
    let mut c = bin();
    c.env("WASMTASK_DATA_DIR", scratch.path().join("home"))
        .args(["--output", "json", "pipeline", "run"])
        .arg(file)
        .arg("--data-dir")
        .arg(scratch.data_dir());
    c
}

struct Outcome {
    status: ExitStatus,
    json: Value,
    stderr: String,
}

fn run_pipeline(scratch: &Scratch, file: &Path) -> Outcome {
    let out = pipeline_cmd(scratch, file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Outcome {
        status: out.status,
        json,
        stderr,
    }
}

fn step<'a>(view: &'a Value, key: &str) -> &'a Value {
    view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["spec"]["key"] == key)
        .unwrap_or_else(|| panic!("no step {key} in {view:#}"))
}

fn stdout_of(t: &Value) -> String {
    // Captured bytes are serialized as text (or base64 for binary).
    t["stdout"]["data"].as_str().unwrap_or_default().to_owned()
}

/// The host path of the run's workspace, from a step that mounts it.
fn workspace_host(t: &Value) -> PathBuf {
    let dirs = t["spec"]["dirs"].as_array().unwrap();
    let ws = dirs
        .iter()
        .find(|d| d["guest"] == "/workspace")
        .unwrap_or_else(|| panic!("no workspace mount in {t:#}"));
    PathBuf::from(ws["host"].as_str().unwrap())
}

#[test]
fn the_example_pipeline_passes_with_parallel_and_dependent_steps() {
    let scratch = Scratch::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ci/pipeline.toml");
    let out = run_pipeline(&scratch, &example);
    assert!(out.status.success(), "{}\n{:#}", out.stderr, out.json);
    let view = &out.json;
    assert_eq!(view["run"]["state"], "succeeded", "{view:#}");
    for key in ["count", "lint", "test", "report"] {
        let t = step(view, key);
        assert_eq!(t["state"], "succeeded", "{key}: {t:#}");
        assert_eq!(t["exit_code"], 0, "{key}");
    }
    // `report` needs `lint` and `test`: it started after both had ended.
    let report = step(view, "report");
    for dep in ["lint", "test"] {
        assert!(
            report["started_at"].as_i64().unwrap()
                >= step(view, dep)["finished_at"].as_i64().unwrap(),
            "report started before {dep} ended"
        );
    }
    assert!(stdout_of(step(view, "test")).contains("minitest: 7 passed, 0 failed"));
    assert!(stdout_of(step(view, "lint")).contains("lint: 0 finding(s)"));
    // The lint report written into the (rw) workspace was read by `report`.
    assert!(stdout_of(report).contains("lint-report.txt"), "{report:#}");
    // Live output: each step's stdout lines were streamed as it ran.
    assert!(
        out.stderr.contains("[test] ok - tests/arith.t: addition"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("[count] started"), "{}", out.stderr);
    // The workspace copy is gone once the run ended.
    assert!(!workspace_host(report).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_output_is_recorded_as_events_in_order() {
    let scratch = Scratch::new();
    let file = scratch.manifest(
        r#"
[steps.args]
plugin = "exit-with"
args = ["first", "second"]
"#,
    );
    let out = run_pipeline(&scratch, &file);
    assert!(out.status.success(), "{}", out.stderr);
    let db = Db::open(&scratch.data_dir().join("wasmtask.db"))
        .await
        .unwrap();
    let run_id = out.json["run"]["id"].as_str().unwrap().to_owned();
    let events = db.run_events(&run_id, 0, 1000).await.unwrap();
    let lines: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::TaskLog && e.data["stream"] == "stdout")
        .map(|e| e.data["message"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["arg: first", "arg: second"], "{events:#?}");
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let pos = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or(usize::MAX);
    assert!(pos("run.created") < pos("task.started"));
    assert!(pos("task.started") < pos("task.succeeded"));
    assert!(pos("task.succeeded") < pos("run.finished"), "{kinds:?}");
}

#[test]
fn fail_fast_cancels_the_rest_naming_the_failed_step() {
    let scratch = Scratch::new();
    let file = scratch.manifest(
        r#"
fail_fast = true

[steps.bad]
plugin = "exit-with"
env = { EXIT_CODE = "3" }

[steps.slow]
plugin = "sleeper"
input = { ms = 600000 }

[steps.later]
plugin = "hello"
input = { text = "never" }
needs = ["slow"]
"#,
    );
    let out = run_pipeline(&scratch, &file);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let view = &out.json;
    assert_eq!(view["run"]["state"], "failed", "{view:#}");
    let bad = step(view, "bad");
    assert_eq!(bad["state"], "failed");
    assert_eq!(bad["exit_code"], 3);
    let slow = step(view, "slow");
    assert_eq!(slow["state"], "canceled", "{slow:#}");
    assert!(slow["cancel"]["reason"].as_str().unwrap().contains("`bad`"));
    let later = step(view, "later");
    assert_eq!(later["state"], "canceled", "{later:#}");
    assert!(later["started_at"].is_null(), "it never started");
    let reason = later["cancel"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("`bad`"),
        "the reason names the failed step: {reason}"
    );
}

/// A running `pipeline run` whose stderr lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(scratch: &Scratch, file: &Path) -> Running {
        let mut child = pipeline_cmd(scratch, file)
            .stdin(Stdio::piped()) // kept open and never written: a step blocks on it
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits until every needle has appeared in some stderr line.
    fn wait_lines(&mut self, needles: &[&str], deadline: Instant) {
        while !needles
            .iter()
            .all(|n| self.seen.iter().any(|l| l.contains(n)))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("never saw {needles:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the process to exit (a failure guard kills it after
    /// `deadline`) and returns its status and stdout.
    fn wait(mut self, deadline: Instant) -> (ExitStatus, String, Vec<String>) {
        let mut stdout = self.child.stdout.take().unwrap();
        let pid = self.child.id();
        let (tx, rx) = mpsc::channel();
        let mut child = self.child;
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
            let _ = tx.send((child.wait(), out));
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((status, out)) = rx.recv_timeout(left) else {
            // SAFETY: kill(2) of our own child, which outlived its deadline.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("pipeline did not exit after its abort");
        };
        self.seen.extend(self.lines.try_iter());
        (status.unwrap(), out, self.seen)
    }
}

#[test]
fn ctrl_c_aborts_spinning_sleeping_and_stdin_blocked_steps_and_cleans_the_workspace() {
    let scratch = Scratch::new();
    let file = scratch.manifest(
        r#"
[workspace]
source = "src"

[steps.spin]
plugin = "spin-loop"

[steps.sleep]
plugin = "sleeper"
input = { ms = 600000 }

[steps.stdin]
plugin = "stdin-wait"
stdin_inherit = true

[steps.after]
plugin = "hello"
input = { text = "never" }
needs = ["spin"]
"#,
    );
    let mut running = Running::spawn(&scratch, &file);
    running.wait_lines(
        &["[spin] started", "[sleep] started", "[stdin] started"],
        within(60),
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(running.child.id() as i32, libc::SIGINT) };
    let (status, stdout, lines) = running.wait(within(60));
    let view: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status.code(), Some(130), "{}", lines.join("\n"));
    assert_eq!(view["run"]["state"], "aborted", "{view:#}");
    assert_eq!(view["run"]["abort"]["actor"], "signal:SIGINT");
    for key in ["spin", "sleep", "stdin"] {
        let t = step(&view, key);
        assert_eq!(t["state"], "canceled", "{key}: {t:#}");
        assert!(!t["started_at"].is_null(), "{key} was running");
        assert_eq!(t["cancel"]["forced"], true, "{key}: stopped by the host");
        assert!(t["cancel"]["latency_us"].as_u64().is_some(), "{key}");
    }
    let after = step(&view, "after");
    assert_eq!(after["state"], "canceled");
    assert!(after["started_at"].is_null());
    assert!(
        !workspace_host(step(&view, "spin")).exists(),
        "cleaned after an abort"
    );
}

#[test]
fn read_only_workspace_cannot_be_written_and_rw_can() {
    let scratch = Scratch::new();
    let file = scratch.manifest(
        r#"
fail_fast = false

[workspace]
source = "src"
cleanup = "never"

[steps.ro]
plugin = "p1-command"
env = { WRITE_TO = "/workspace/from-ro.txt" }

[steps.rw]
plugin = "p1-command"
env = { WRITE_TO = "/workspace/from-rw.txt" }
workspace = "rw"

[steps.none]
plugin = "wc"
args = ["/workspace"]
workspace = "none"
"#,
    );
    let out = run_pipeline(&scratch, &file);
    let view = &out.json;
    assert_eq!(view["run"]["state"], "failed", "{}\n{view:#}", out.stderr);
    let ro = step(view, "ro");
    assert_eq!(ro["state"], "failed");
    assert_eq!(ro["exit_code"], 2);
    assert!(
        ro["stderr"]["data"]
            .as_str()
            .unwrap()
            .contains("cannot write")
    );
    let rw = step(view, "rw");
    assert_eq!(rw["state"], "succeeded", "{rw:#}");
    let host = workspace_host(rw);
    assert_eq!(
        std::fs::read_to_string(host.join("from-rw.txt")).unwrap(),
        "written by p1\n"
    );
    assert!(!host.join("from-ro.txt").exists());
    // A step that does not mount the workspace does not see it.
    assert_eq!(step(view, "none")["state"], "failed");
    // The source was copied, never written.
    assert!(!scratch.path().join("src/from-rw.txt").exists());
    assert!(host.exists(), "cleanup = never keeps the copy");
}

#[test]
fn workspace_cleanup_follows_the_policy_on_success_and_failure() {
    for (cleanup, code, kept) in [
        ("always", "0", false),
        ("always", "1", false),
        ("on_success", "0", false),
        ("on_success", "1", true),
        ("never", "0", true),
    ] {
        let scratch = Scratch::new();
        let file = scratch.manifest(&format!(
            r#"
[workspace]
source = "src"
cleanup = "{cleanup}"

[steps.only]
plugin = "p1-command"
env = {{ EXIT_CODE = "{code}" }}
"#
        ));
        let out = run_pipeline(&scratch, &file);
        let t = step(&out.json, "only");
        let state = if code == "0" { "succeeded" } else { "failed" };
        assert_eq!(t["state"], state, "{}", out.stderr);
        assert_eq!(
            workspace_host(t).exists(),
            kept,
            "cleanup {cleanup}, exit {code}"
        );
        assert!(scratch.path().join("src/notes.txt").exists());
    }
}

#[test]
fn bad_manifests_are_refused_before_anything_runs() {
    let scratch = Scratch::new();
    let out_dir = scratch.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // Each manifest also has a step that would leave a file behind if it ran.
    let writer = format!(
        r#"
[steps.writer]
plugin = "p1-command"
env = {{ WRITE_TO = "/out/ran.txt" }}
dirs = [{{ host = "{}", guest = "/out", writable = true }}]
"#,
        out_dir.display()
    );
    let cases = [
        ("[steps.a]\nplugin = \"hello\"\nargz = []\n", "line 3"),
        (
            "[steps.a]\nplugin = \"hello\"\nneeds = [\"b\"]\n[steps.b]\nplugin = \"hello\"\nneeds = [\"a\"]\n",
            "cycle",
        ),
        (
            "[steps.a]\nplugin = \"no-such-plugin\"\n",
            "task `a`: no plugin named",
        ),
        (
            "[steps.a]\nplugin = \"./gone.wasm\"\n",
            "step `a`: plugin file",
        ),
        (
            "[steps.a]\nplugin = \"wc\"\ndirs = [{ host = \"/etc\", guest = \"/etc\" }]\n",
            "task `a`: dirs: `/etc` is not under a directory",
        ),
        (
            "[workspace]\nsource = \"/etc\"\n[steps.a]\nplugin = \"wc\"\n",
            "workspace: `/etc` is not under",
        ),
    ];
    for (bad, expected) in cases {
        let file = scratch.manifest(&format!("{bad}{writer}"));
        let out = run_pipeline(&scratch, &file);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "{bad}: {}", out.stderr);
        assert!(!out_dir.join("ran.txt").exists(), "{bad}: a step ran");
    }
    // The same writer step alone does run (the check above is meaningful).
    let file = scratch.manifest(&writer);
    let out = run_pipeline(&scratch, &file);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out_dir.join("ran.txt").exists());
}

#[test]
fn pipeline_submit_creates_a_run_on_the_server() {
    let scratch = Scratch::new();
    let root = scratch.path();
    let server = Server::start(
        &fixtures_config(&format!(
            "allowed_dirs = [{:?}]",
            root.display().to_string()
        )),
        None,
    );
    let file = scratch.manifest(
        r#"
name = "remote"

[workspace]
source = "src"

[steps.count]
plugin = "wc"
args = ["--json", "."]

[steps.test]
plugin = "minitest"
args = ["tests"]
needs = ["count"]
"#,
    );
    let out = bin()
        .args([
            "--output",
            "json",
            "--server",
            &server.base_url,
            "pipeline",
            "submit",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_id = created["run"]["id"].as_str().unwrap().to_owned();
    server
        .sse_get(&format!("/v1/runs/{run_id}/events"), None)
        .until_event("run.finished", within(60));
    let (status, view) = server.get(&format!("/v1/runs/{run_id}"));
    assert_eq!(status, 200);
    assert_eq!(view["run"]["state"], "succeeded", "{view:#}");
    let count = step(&view, "count");
    let counts: Value = serde_json::from_str(&stdout_of(count)).unwrap();
    assert_eq!(counts["total"]["lines"], 3, "{counts:#}");
    assert!(stdout_of(step(&view, "test")).contains("1 passed, 0 failed"));
    assert!(!workspace_host(count).exists(), "the server cleaned up too");

    // The server checks directories against its own `allowed_dirs`: a
    // workspace outside them is refused (exit 2) and no run is created.
    let runs_before = server.get("/v1/runs").1["runs"].as_array().unwrap().len();
    let file = scratch.manifest("[workspace]\nsource = \"/etc\"\n[steps.a]\nplugin = \"wc\"\n");
    let out = bin()
        .args(["--server", &server.base_url, "pipeline", "submit"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workspace: `/etc` is not under"), "{err}");
    let runs_after = server.get("/v1/runs").1["runs"].as_array().unwrap().len();
    assert_eq!(runs_before, runs_after);
}

#[test]
fn a_run_timeout_aborts_the_whole_run_as_failed() {
    let scratch = Scratch::new();
    let file = scratch.manifest(
        r#"
timeout = "1s"

[steps.sleep]
plugin = "sleeper"
input = { ms = 600000 }

[steps.next]
plugin = "hello"
input = { text = "never" }
needs = ["sleep"]
"#,
    );
    let out = run_pipeline(&scratch, &file);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let view = &out.json;
    assert_eq!(view["run"]["state"], "failed", "{view:#}");
    assert_eq!(view["run"]["abort"]["actor"], "timeout");
    let sleep = step(view, "sleep");
    assert_eq!(sleep["state"], "canceled");
    assert!(
        sleep["cancel"]["reason"]
            .as_str()
            .unwrap()
            .contains("run timeout")
    );
    let next = step(view, "next");
    assert_eq!(next["state"], "canceled");
    assert!(next["started_at"].is_null());
}
