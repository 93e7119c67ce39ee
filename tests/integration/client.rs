//! The CLI as a client of a real server: `submit` (plain, `--follow`, and
//! Ctrl+C while following), `ps`/`show`/`logs` with `--server`, `cancel`,
//! `runs`/`abort`, `plugins add`/`ls`, and the token.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::server_support::{Server, fixtures_config};
use crate::support::{bin, watch_stderr};

const SECS_60: Duration = Duration::from_secs(60);

/// `wasmtask --server URL …` with nothing taken from this environment.
fn cli(s: &Server) -> Command {
    let mut c = bin();
    c.env_remove("WASMTASK_SERVER")
        .env_remove("WASMTASK_TOKEN")
        .args(["--server", &s.base_url])
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

#[test]
fn submit_prints_the_id_or_follows_to_the_end_and_exits_like_run() {
    let s = Server::start(&fixtures_config(""), None);

    let out = run(cli(&s).args(["submit", "hello", "--input", r#"{"text":"plain submit"}"#]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(id.starts_with("t_"), "not a task id: {id:?}");
    let t = s.wait_state(&id, "succeeded", SECS_60);
    assert_eq!(t["output"]["text"], "PLAIN SUBMIT", "{t:#}");

    let out = run(cli(&s).args([
        "submit",
        "hello",
        "--input",
        r#"{"text":"followed here","op":"title"}"#,
        "--follow",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["text"], "Followed Here");
    let err = text(&out.stderr);
    assert!(err.contains("submitted t_"), "{err}");
    assert!(
        err.contains("title: 2 words"),
        "the guest's log line: {err}"
    );

    // Outcomes map to the same exit statuses as `run`.
    let out = run(cli(&s).args(["submit", "spin-loop", "--timeout", "300ms", "--follow"]));
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let out = run(cli(&s).args([
        "submit",
        "exit-with",
        "--env",
        "EXIT_CODE=3",
        "--follow",
        "--",
        "x",
    ]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = run(cli(&s).args([
        "--output",
        "json",
        "submit",
        "hello",
        "--input",
        r#"{"text":"j"}"#,
        "--follow",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let record = stdout_json(&out);
    assert_eq!(record["state"], "succeeded", "{record:#}");
    assert_eq!(s.task(record["id"].as_str().unwrap()), record);

    // Bad input is a usage error that reaches nothing on the server.
    let before = s.all_tasks("").len();
    let out = run(cli(&s).args(["submit", "hello", "--input", "{not json"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = run(cli(&s).args(["submit", "no-such-plugin"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no-such-plugin"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(s.all_tasks("").len(), before);
}

/// Ctrl+C while following a submit cancels the task on the server, and the
/// client exits as a canceled `run` does.
#[test]
fn ctrl_c_while_following_cancels_the_task_on_the_server() {
    let s = Server::start(&fixtures_config(""), None);
    let mut child = cli(&s)
        .args(["submit", "spin-loop", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, reader) = watch_stderr(&mut child, |line| {
        line.strip_prefix("wasmtask: submitted ")
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
    });
    let id = rx
        .recv_timeout(SECS_60)
        .expect("the client reports the task id");
    s.wait_state(&id, "running", SECS_60);
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    let t = s.task(&id);
    assert_eq!(t["state"], "canceled", "{t:#}");
    assert_eq!(t["cancel"]["reason"], "interrupted by SIGINT", "{t:#}");
    assert_eq!(t["cancel"]["forced"], true, "{t:#}");
    assert!(err.contains("canceled (interrupted by SIGINT)"), "{err}");
}

#[test]
fn ps_show_logs_cancel_runs_and_abort_against_a_server() {
    let s = Server::start(&fixtures_config(""), None);
    let t = s.submit(json!({"plugin": "sleeper", "input": {"ms": 600_000}}));
    let id = t["id"].as_str().unwrap().to_owned();
    s.wait_state(&id, "running", SECS_60);

    let out = run(cli(&s).args(["--output", "json", "ps", "--state", "running"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = stdout_json(&out);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()], "{listed:#}");
    let out = run(cli(&s).args(["ps"]));
    assert!(text(&out.stdout).contains(&id), "{}", text(&out.stdout));

    let out = run(cli(&s).args(["--output", "json", "show", &id]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(stdout_json(&out)["state"], "running");

    let out = run(cli(&s).args([
        "--output",
        "json",
        "cancel",
        &id,
        "--reason",
        "wrong input",
        "--wait",
        "30s",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let c = stdout_json(&out);
    assert_eq!(c["state"], "canceled", "{c:#}");
    assert_eq!(c["cancel"]["reason"], "wrong input", "{c:#}");
    assert_eq!(s.task(&id), c, "the answer is the stored record");
    // A finished task: exit 1, a clear line, the record unchanged.
    let out = run(cli(&s).args(["cancel", &id]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already finished: canceled"),
        "{}",
        text(&out.stderr)
    );
    let out = run(cli(&s).args(["cancel", "t_nope"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    // logs: every event of the task, in order, one JSON object per line;
    // -f on a finished task prints the same and ends.
    let out = run(cli(&s).args(["--output", "json", "logs", &id]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let kinds: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("task.queued"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("task.canceled"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "task.cancel_requested"),
        "{kinds:?}"
    );
    let out = run(cli(&s).args(["logs", "-f", &id]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert_eq!(lines.lines().count(), kinds.len(), "{lines}");
    assert!(
        lines.lines().last().unwrap().contains("task.canceled"),
        "{lines}"
    );

    // A run: list it, show it, abort it.
    let (status, view) = s.post(
        "/v1/runs",
        &json!({"name": "nightly", "tasks": [
            {"key": "long", "plugin": "sleeper", "input": {"ms": 600_000}},
            {"key": "after", "plugin": "hello", "input": {"text": "x"}, "needs": ["long"]}
        ]}),
    );
    assert_eq!(status, 201, "{view}");
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let long = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["spec"]["key"] == "long")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.wait_state(&long, "running", SECS_60);
    let out = run(cli(&s).args(["--output", "json", "runs"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&run_id), "{}", text(&out.stdout));
    let out = run(cli(&s).args(["runs", "show", &run_id]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("nightly"),
        "{}",
        text(&out.stdout)
    );

    let out = run(cli(&s).args([
        "--output",
        "json",
        "abort",
        &run_id,
        "--reason",
        "superseded",
        "--wait",
        "30s",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = stdout_json(&out);
    assert_eq!(v["run"]["state"], "aborted", "{v:#}");
    for t in v["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "canceled", "{t:#}");
        assert_eq!(t["cancel"]["reason"], "superseded", "{t:#}");
    }
    let out = run(cli(&s).args(["abort", &run_id]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a finished run: {}",
        text(&out.stderr)
    );
    // The run's own log has the run's and its tasks' events.
    let out = run(cli(&s).args(["logs", &run_id]));
    let lines = text(&out.stdout);
    assert!(lines.contains("run.abort_requested"), "{lines}");
    assert!(lines.contains(&long), "{lines}");
}

#[test]
fn plugins_add_and_list_with_a_token() {
    let s = Server::start("", Some("s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my-hello.wasm");
    std::fs::write(&file, wasmtask::builtin::find("hello").unwrap().bytes).unwrap();

    // Without the token: refused, nothing registered.
    let out = run(cli(&s).arg("plugins").arg("add").arg(&file));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("401") || err.contains("token"), "{err}");

    let out = run(cli(&s)
        .args(["--token", "s3cret", "plugins", "add"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("registered my-hello (task"),
        "{}",
        text(&out.stdout)
    );
    let out = run(cli(&s).args(["--output", "json", "plugins"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let names: Vec<String> = stdout_json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "my-hello"), "{names:?}");
    assert!(names.iter().any(|n| n == "hello"), "{names:?}");

    // A token from the environment works as well; a path is uploaded first.
    let out = run(cli(&s)
        .env("WASMTASK_TOKEN", "s3cret")
        .arg("submit")
        .arg(&file)
        .args(["--input", r#"{"text":"from a file"}"#, "--follow"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("FROM A FILE"),
        "{}",
        text(&out.stdout)
    );
    let out = run(cli(&s).env("WASMTASK_TOKEN", "s3cret").args([
        "submit",
        "my-hello",
        "--input",
        r#"{"text":"by name"}"#,
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let t = s.wait_state(&id, "succeeded", SECS_60);
    assert_eq!(t["plugin_name"], "my-hello", "{t:#}");
}
