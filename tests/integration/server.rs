//! `wasmtask serve` end to end, through the real binary: crash recovery
//! after `kill -9`, a thousand concurrent cancels, graceful shutdown, the
//! listen/token guard, auth, request validation, plugin uploads, SSE resume,
//! streamed submissions and a cancel of a guest blocked in the host.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server_support::{Server, agent, fixtures_config, read_json, within};
use crate::support::bin;

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const SECS_10: Duration = Duration::from_secs(10);
const SECS_30: Duration = Duration::from_secs(30);

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn count_kind(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

/// Cancels a task with grace 0 and waits for `canceled`.
fn cancel_now(s: &Server, id: &str) -> Value {
    let (status, v) = s.post(
        &format!("/v1/tasks/{id}/cancel"),
        &json!({"grace_ms": 0, "wait_ms": 10_000}),
    );
    assert!(status == 200 || status == 202, "cancel {id}: {status} {v}");
    s.wait_state(id, "canceled", SECS_30)
}

// ---------------------------------------------------------------------
// 1. kill -9 and restart
// ---------------------------------------------------------------------

#[test]
fn kill_9_then_restart_settles_every_task() {
    let mut s = Server::start(&fixtures_config("max_running = 3"), None);
    let a = s.submit(json!({"plugin": "spin-loop", "max_attempts": 1}));
    let b = s.submit(json!({"plugin": "spin-loop", "max_attempts": 2}));
    let c = s.submit(json!({"plugin": "spin-loop", "max_attempts": 3}));
    let (a, b, c) = (
        a["id"].as_str().unwrap().to_owned(),
        b["id"].as_str().unwrap().to_owned(),
        c["id"].as_str().unwrap().to_owned(),
    );
    for id in [&a, &b, &c] {
        s.wait_state(id, "running", SECS_30);
    }
    // C: a cancel with a long grace on a guest that never looks at it.
    let (status, v) = s.post(
        &format!("/v1/tasks/{c}/cancel"),
        &json!({"grace_ms": 600_000, "reason": "stop c"}),
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["task"]["state"], "cancel_requested", "{v}");
    // D: acknowledged while every slot is taken, so it is still queued.
    let d = s.submit(json!({"plugin": "hello", "input": {"text": "after the crash"}}));
    assert_eq!(d["state"], "queued", "{d}");
    let d = d["id"].as_str().unwrap().to_owned();
    assert_eq!(s.task(&c)["state"], "cancel_requested");

    s.kill9();
    let restarted_at = now_millis();
    s.restart();

    // Nothing the old process ran is still `running`: a running task is an
    // attempt started by this process (B's second, or D).
    for t in s.all_tasks("&state=running") {
        assert!(t["id"] == b.as_str() || t["id"] == d.as_str(), "{t:#}");
        assert!(t["started_at"].as_i64().unwrap() >= restarted_at, "{t:#}");
    }
    assert!(s.all_tasks("&state=cancel_requested").is_empty());

    let ta = s.task(&a);
    assert_eq!(ta["state"], "failed", "{ta:#}");
    assert_eq!(ta["error"]["kind"], "host_restart", "{ta:#}");
    assert!(ta["finished_at"].is_i64(), "{ta:#}");

    let tc = s.task(&c);
    assert_eq!(tc["state"], "canceled", "{tc:#}");
    assert_eq!(tc["cancel"]["reason"], "stop c", "{tc:#}");
    assert_eq!(tc["cancel"]["actor"], "api", "{tc:#}");
    assert!(tc["finished_at"].is_i64(), "{tc:#}");

    // B is re-queued and runs again as attempt 2.
    let tb = s.wait_task(&b, SECS_30, "running attempt 2", |t| {
        t["state"] == "running" && t["attempt"] == 2
    });
    assert_eq!(tb["max_attempts"], 2);
    let eb = s.events(&b);
    assert!(
        eb.iter()
            .any(|e| e["kind"] == "task.queued" && e["data"]["requeued"] == true),
        "{:?}",
        kinds(&eb)
    );
    assert_eq!(count_kind(&eb, "task.started"), 2, "{:?}", kinds(&eb));

    // D survived the crash and runs.
    let td = s.wait_state(&d, "succeeded", SECS_30);
    assert_eq!(td["output"]["text"], "AFTER THE CRASH", "{td:#}");

    // C never ran again.
    let tc2 = s.task(&c);
    assert_eq!(tc2["state"], "canceled");
    assert_eq!(tc2["attempt"], 1, "{tc2:#}");
    assert_eq!(count_kind(&s.events(&c), "task.started"), 1);

    let tb = cancel_now(&s, &b);
    assert_eq!(tb["attempt"], 2);
    for t in s.all_tasks("") {
        assert!(
            ["succeeded", "failed", "canceled"].contains(&t["state"].as_str().unwrap()),
            "{t:#}"
        );
    }
    assert!(s.all_tasks("&state=running").is_empty());
}

/// An allowed directory holding `src/a.txt`, and a server config that
/// allows it: a workspace source for runs.
fn workspace_source() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let allowed = tempfile::tempdir().unwrap();
    let allowed_dir = std::fs::canonicalize(allowed.path()).unwrap();
    let src = allowed_dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), "a").unwrap();
    let cfg = fixtures_config(&format!(
        "allowed_dirs = [{:?}]",
        allowed_dir.to_str().unwrap()
    ));
    (allowed, src, cfg)
}

#[test]
fn a_runs_workspace_and_timeout_outlive_the_process_that_made_them() {
    let (_allowed, src, cfg) = workspace_source();
    let mut s = Server::start(&cfg, None);
    const TIMEOUT_MS: i64 = 4000;
    let (status, v) = s.post(
        "/v1/runs",
        &json!({
            "timeout_ms": TIMEOUT_MS,
            "workspace": {"source": src, "cleanup": "always"},
            "tasks": [{"plugin": "spin-loop", "key": "spin", "max_attempts": 2}],
        }),
    );
    assert_eq!(status, 201, "{v}");
    let run_id = v["run"]["id"].as_str().unwrap().to_owned();
    let created_at = v["run"]["created_at"].as_i64().unwrap();
    assert_eq!(v["run"]["timeout_ms"], TIMEOUT_MS, "{v:#}");
    let ws = &v["run"]["workspace"];
    assert_eq!(
        (&ws["guest"], &ws["owned"], &ws["cleanup"]),
        (&json!("/workspace"), &json!(true), &json!("always")),
        "{v:#}"
    );
    let copy = std::path::PathBuf::from(ws["host"].as_str().unwrap());
    assert!(
        copy.join("a.txt").is_file(),
        "no copy at {}",
        copy.display()
    );
    let spin = v["tasks"][0]["id"].as_str().unwrap().to_owned();
    s.wait_state(&spin, "running", SECS_30);

    // The process that made the copy and armed the timeout dies; the next
    // one times the run out (counted from its creation) and deletes the
    // copy.
    s.kill9();
    s.restart();
    let view = s.wait_run(&run_id, SECS_30);
    let run = &view["run"];
    assert_eq!(run["state"], "failed", "{view:#}");
    assert_eq!(run["abort"]["actor"], "timeout", "{view:#}");
    assert!(
        run["abort"]["requested_at"].as_i64().unwrap() >= created_at + TIMEOUT_MS,
        "{view:#}"
    );
    // Canceled by the timeout: in its second attempt, or before it (when
    // the restart took longer than what was left of the timeout).
    let t = &view["tasks"][0];
    assert_eq!(t["state"], "canceled", "{view:#}");
    assert!(t["attempt"] == 1 || t["attempt"] == 2, "{view:#}");
    assert!(!copy.exists(), "the copy {} is still there", copy.display());
    let events = s.run_events(&run_id);
    assert!(
        events
            .iter()
            .any(|e| e["data"]["message"] == "workspace deleted" && e["data"]["deleted"] == true),
        "{:?}",
        kinds(&events)
    );
    assert!(src.join("a.txt").is_file(), "the source was touched");
}

#[test]
fn a_workspace_copy_no_run_has_is_swept_at_start_and_nothing_else() {
    let (_allowed, src, cfg) = workspace_source();
    let mut s = Server::start(&cfg, None);
    // A run whose copy is kept on purpose.
    let (status, v) = s.post(
        "/v1/runs",
        &json!({
            "workspace": {"source": src, "cleanup": "never"},
            "tasks": [{"plugin": "hello", "input": {"text": "ws"}}],
        }),
    );
    assert_eq!(status, 201, "{v}");
    let run_id = v["run"]["id"].as_str().unwrap().to_owned();
    let kept = std::path::PathBuf::from(v["run"]["workspace"]["host"].as_str().unwrap());
    let view = s.wait_run(&run_id, SECS_30);
    assert_eq!(view["run"]["state"], "succeeded", "{view:#}");
    assert!(kept.join("a.txt").is_file(), "{}", kept.display());
    // `<workspace_dir>/<instance>/<run id>`.
    let root = kept.parent().unwrap().to_path_buf();
    assert_eq!(root.file_name().unwrap().len(), 16, "{}", root.display());
    let workspace_dir = root.parent().unwrap().to_path_buf();

    // What a process that died between a copy and its run's commit leaves,
    // beside things that are not this database's copies.
    let stray = root.join("r_0000000000000000000000000a");
    std::fs::create_dir_all(stray.join("sub")).unwrap();
    std::fs::write(stray.join("sub/b.txt"), "b").unwrap();
    let not_a_copy = root.join("notes");
    std::fs::create_dir(&not_a_copy).unwrap();
    let a_file = root.join("r_0000000000000000000000000b");
    std::fs::write(&a_file, "not a directory").unwrap();
    let other_db = workspace_dir.join("0123456789abcdef/r_0000000000000000000000000c");
    std::fs::create_dir_all(&other_db).unwrap();
    let beside = workspace_dir.join("r_0000000000000000000000000d");
    std::fs::create_dir(&beside).unwrap();

    s.kill9();
    s.restart();
    assert!(
        !stray.exists(),
        "the stray copy {} is still there",
        stray.display()
    );
    assert!(kept.join("a.txt").is_file(), "a run's copy was swept");
    for p in [&not_a_copy, &a_file, &other_db, &beside] {
        assert!(p.exists(), "{} was swept", p.display());
    }
    // The server works on as before.
    let (status, v) = s.get(&format!("/v1/runs/{run_id}"));
    assert_eq!((status, &v["run"]["state"]), (200, &json!("succeeded")));
}

// ---------------------------------------------------------------------
// 2. A thousand concurrent cancels
// ---------------------------------------------------------------------

#[test]
fn a_thousand_concurrent_cancels_lose_none() {
    const N: usize = 1000;
    let s = Server::start(&fixtures_config(""), None);
    // Compile both plugins first (a burst of first uses is another test).
    for p in [
        json!({"plugin": "spin-loop", "limits": {"timeout_ms": 50}}),
        json!({"plugin": "sleeper", "input": {"ms": 1}}),
    ] {
        let t = s.submit(p);
        s.wait_task(t["id"].as_str().unwrap(), SECS_30, "finished", |t| {
            t["finished_at"].is_i64()
        });
    }
    let tasks: Vec<Value> = (0..N)
        .map(|i| {
            if i % 2 == 0 {
                json!({"plugin": "spin-loop", "key": format!("t{i}")})
            } else {
                json!({"plugin": "sleeper", "input": {"ms": 600_000}, "key": format!("t{i}")})
            }
        })
        .collect();
    let (status, view) = s.post("/v1/runs", &json!({"name": "thousand", "tasks": tasks}));
    assert_eq!(status, 201, "{view}");
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let ids: Vec<String> = view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), N);

    let t0 = Instant::now();
    // Every task running.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, v) = s.get(&format!("/v1/runs/{run_id}"));
        assert_eq!(status, 200);
        let running = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["state"] == "running")
            .count();
        if running == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {running} of {N} tasks running after 90 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    eprintln!("all {N} running after {:?}", t0.elapsed());
    let t1 = Instant::now();
    // One thread per cancel, all released at once.
    let barrier = Arc::new(Barrier::new(N));
    let http = agent(Duration::from_secs(120));
    let handles: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let barrier = barrier.clone();
            let http = http.clone();
            let url = s.url(&format!("/v1/tasks/{id}/cancel"));
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let body = serde_json::to_vec(&json!({"reason": format!("bulk {i}")})).unwrap();
                    barrier.wait();
                    let t0 = Instant::now();
                    let r = http
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(&body[..]);
                    match r {
                        Ok(resp) => Ok(read_json(resp)),
                        Err(e) => Err(format!("{e} after {:?}", t0.elapsed())),
                    }
                })
                .unwrap()
        })
        .collect();
    let mut bad = Vec::new();
    let mut lost = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().unwrap() {
            Ok((status, v)) if status == 200 || status == 202 => {
                assert_eq!(v["task"]["id"], ids[i].as_str(), "{v}");
                let st = v["task"]["state"].as_str().unwrap();
                assert!(st == "cancel_requested" || st == "canceled", "{v}");
            }
            Ok((status, v)) => bad.push(format!("{}: {status} {v}", ids[i])),
            Err(e) => lost.push((i, format!("{}: {e}", ids[i]))),
        }
    }
    assert!(
        bad.is_empty(),
        "{} cancels answered with an error: {:#?}\nserver stderr:\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        s.stderr_text()
    );
    // Requests lost at the connection level are retried one by one (a
    // cancel is idempotent), so the records below are checked either way;
    // the loss itself fails the test at the end.
    for (i, _) in &lost {
        let (status, v) = s.post(
            &format!("/v1/tasks/{}/cancel", ids[*i]),
            &json!({"reason": format!("bulk {i}")}),
        );
        assert!(
            status == 200 || status == 202,
            "retried cancel: {status} {v}"
        );
    }
    eprintln!("{N} cancels answered after {:?}", t1.elapsed());
    // Every task canceled, each with its own cancel record.
    let deadline = Instant::now() + Duration::from_secs(90);
    let view = loop {
        let (_, v) = s.get(&format!("/v1/runs/{run_id}"));
        let left = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["state"] != "canceled")
            .count();
        if left == 0 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "{left} tasks not canceled after 90 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("all canceled after {:?}", t1.elapsed());
    let reason_of: std::collections::HashMap<&str, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), format!("bulk {i}")))
        .collect();
    for t in view["tasks"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        let c = &t["cancel"];
        assert_eq!(c["actor"], "api", "{t:#}");
        assert_eq!(c["reason"], reason_of[id].as_str(), "{t:#}");
        assert!(c["stopped_at"].is_i64(), "{t:#}");
        assert_eq!(c["forced"], true, "{t:#}");
    }
    let (_, readyz) = s.get("/readyz");
    assert_eq!(readyz["ready"], true);
    assert!(
        lost.is_empty(),
        "{} of {N} concurrent cancel requests were lost at the connection level \
         (the server reset them; every one succeeded when retried): {:#?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

// ---------------------------------------------------------------------
// 3. Graceful shutdown
// ---------------------------------------------------------------------

#[test]
fn sigterm_cancels_running_tasks_ends_streams_and_exits_0() {
    let mut s = Server::start(
        &fixtures_config("[shutdown]\nwait_ms = 0\ngrace_ms = 300"),
        None,
    );
    let id = s.submit(json!({"plugin": "spin-loop"}))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.wait_state(&id, "running", SECS_30);
    let mut stream = s.sse_get(&format!("/v1/tasks/{id}/events"), None);
    stream.until_event("task.started", within(30));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let end = loop {
            match stream.try_next(within(120)) {
                Ok(Some(m)) => rest.push(m),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let _ = tx.send((rest, end));
    });

    let sent = Instant::now();
    s.sigterm();
    assert!(
        s.wait_stderr("shutting down", SECS_10),
        "no shutdown message: {}",
        s.stderr_text()
    );
    // Once shutting down, no new work is accepted (the listener may be
    // closed already, or the answer is 503).
    let probe = agent(Duration::from_secs(5));
    let deadline = Instant::now() + SECS_10;
    loop {
        let ready = probe.get(s.url("/readyz")).call();
        match ready {
            Ok(r) if r.status().as_u16() == 200 => {
                assert!(
                    Instant::now() < deadline,
                    "readyz still 200 10 s after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(r) => {
                assert_eq!(r.status().as_u16(), 503);
                break;
            }
            Err(_) => break,
        }
    }
    // A submission is refused too: at the socket, or with 503.
    if let Ok(r) = s.try_post_raw(
        "/v1/tasks",
        br#"{"plugin":"hello","input":{"text":"late"}}"#,
        "application/json",
        None,
    ) {
        let (status, v) = read_json(r);
        assert_eq!(status, 503, "a submission during shutdown: {v}");
        assert_eq!(v["code"], "unavailable", "{v}");
    }

    let status = s
        .wait_exit(SECS_30)
        .unwrap_or_else(|| panic!("still running 30 s after SIGTERM: {}", s.stderr_text()));
    assert_eq!(status.code(), Some(0), "stderr: {}", s.stderr_text());
    assert!(sent.elapsed() < SECS_30);
    let (rest, end) = rx
        .recv_timeout(SECS_10)
        .expect("the SSE stream did not end after the server exited");
    assert!(
        end.is_ok(),
        "the SSE stream broke instead of ending: {end:?}"
    );
    // The stream may or may not have carried the end before closing; it
    // never carries anything but this task's events.
    for m in &rest {
        assert_eq!(m.json()["task_id"], id.as_str());
    }

    s.restart();
    let t = s.task(&id);
    assert_eq!(t["state"], "canceled", "{t:#}");
    assert_eq!(t["cancel"]["reason"], "server_shutdown", "{t:#}");
    assert_eq!(t["cancel"]["actor"], "server", "{t:#}");
    assert_eq!(t["cancel"]["forced"], true, "{t:#}");
    // Settled by the process that shut down, not by recovery.
    assert_ne!(
        t["error"]["kind"], "host_restart",
        "the shutdown exited before recording the cancel: {t:#}"
    );
    let ev = s.events(&id);
    assert_eq!(count_kind(&ev, "task.canceled"), 1, "{:?}", kinds(&ev));
    assert!(s.all_tasks("&state=running").is_empty());
}

// ---------------------------------------------------------------------
// 4. Listening beyond loopback needs a token
// ---------------------------------------------------------------------

#[test]
fn a_public_listen_address_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .env_remove("WASMTASK_TOKEN")
        .env_remove("WASMTASK_CONFIG")
        .env_remove("WASMTASK_LISTEN")
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = within(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --listen 0.0.0.0:0 without a token kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("token"), "stderr: {stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it listened anyway"
    );

    // With a token it starts (reached through loopback).
    let s = Server::start_listen("", Some("a-long-enough-token"), "0.0.0.0:0");
    let (status, v) = s.get("/readyz");
    assert_eq!(status, 200, "{v}");
    let t = s.submit(json!({"plugin": "hello", "input": {"text": "hi"}}));
    s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
}

// ---------------------------------------------------------------------
// 5. Auth
// ---------------------------------------------------------------------

#[test]
fn state_changing_requests_need_the_token() {
    let token = "s3cret-token-for-tests";
    let s = Server::start("", Some(token));
    let body = br#"{"plugin":"hello","input":{"text":"auth"}}"#;
    for auth in [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.to_owned()),
        Some("Bearer ".to_owned()),
    ] {
        let (status, v) = s.post_raw("/v1/tasks", body, "application/json", auth.as_deref());
        assert_eq!(status, 401, "{auth:?}: {v}");
        assert_eq!(v["code"], "unauthorized", "{auth:?}: {v}");
    }
    // Plugin uploads and runs too.
    let (status, v) = s.post_raw("/v1/plugins?name=x", b"\0asm", "application/wasm", None);
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (status, v) = s.post_raw("/v1/runs", br#"{"tasks":[]}"#, "application/json", None);
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    // Nothing was created.
    assert!(s.all_tasks("").is_empty());

    // Reads are open.
    for path in [
        "/readyz",
        "/livez",
        "/v1/tasks",
        "/v1/plugins",
        "/v1/runs",
        "/metrics",
    ] {
        let (status, v) = s.get(path);
        assert_eq!(status, 200, "GET {path}: {v}");
    }

    // The right token works.
    let good = format!("Bearer {token}");
    let (status, t) = s.post_raw("/v1/tasks", body, "application/json", Some(&good));
    assert_eq!(status, 201, "{t}");
    let id = t["id"].as_str().unwrap();
    let t = s.wait_state(id, "succeeded", SECS_30);
    assert_eq!(t["output"]["text"], "AUTH");
    // A cancel without the token is refused and changes nothing.
    let (status, v) = s.post_raw(
        &format!("/v1/tasks/{id}/cancel"),
        b"",
        "application/json",
        None,
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (status, v) = s.post_raw(
        &format!("/v1/tasks/{id}/cancel"),
        b"",
        "application/json",
        Some(&good),
    );
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["code"], "task_finished");
    assert_eq!(v["task"]["state"], "succeeded");
}

// ---------------------------------------------------------------------
// 6. Bad requests
// ---------------------------------------------------------------------

/// Deterministic pseudo-random bytes.
fn garbage(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn bad_requests_get_their_error_codes_and_change_nothing() {
    let allowed = tempfile::tempdir().unwrap();
    let inside = allowed.path().join("inside");
    std::fs::create_dir(&inside).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), inside.join("escape")).unwrap();
    let cfg = format!(
        "max_body_bytes = 4096\nmax_plugin_bytes = 20000\nallowed_dirs = [{:?}]\n",
        allowed.path().to_str().unwrap()
    );
    let s = Server::start(&cfg, None);

    // 413: a JSON body over max_body_bytes.
    let big = json!({"plugin": "hello", "input": {"text": "x".repeat(8000)}});
    let (status, v) = s.post("/v1/tasks", &big);
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["code"], "payload_too_large", "{v}");
    // 413: a plugin over max_plugin_bytes.
    let (status, v) = s.post_raw(
        "/v1/plugins?name=too-big",
        &garbage(30_000, 7),
        "application/wasm",
        None,
    );
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["code"], "payload_too_large", "{v}");

    // 422 invalid_plugin: not wasm, a core module, garbage, a broken component.
    let mut broken_component = b"\0asm\x0d\0\x01\0".to_vec();
    broken_component.extend(garbage(500, 3));
    for (what, bytes) in [
        ("text", b"this is not webassembly".to_vec()),
        ("core module", b"\0asm\x01\0\0\0".to_vec()),
        ("garbage", garbage(4096, 11)),
        ("broken component", broken_component),
    ] {
        let (status, v) = s.post_raw("/v1/plugins?name=bad", &bytes, "application/wasm", None);
        assert_eq!(status, 422, "{what}: {v}");
        assert_eq!(v["code"], "invalid_plugin", "{what}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let (_, plugins) = s.get("/v1/plugins");
    assert!(
        !plugins.to_string().contains("\"bad\""),
        "a refused plugin was registered: {plugins}"
    );

    let dir = |host: &str| json!({"plugin": "wc", "args": ["/d"], "dirs": [{"host": host, "guest": "/d"}]});
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "unknown field",
            "/v1/tasks",
            br#"{"plugin":"hello","input":{"text":"a"},"bogus":1}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad JSON",
            "/v1/tasks",
            br#"{"plugin": "hello","#.to_vec(),
            400,
            "bad_request",
        ),
        ("empty body", "/v1/tasks", b"".to_vec(), 400, "bad_request"),
        (
            "wrong type",
            "/v1/tasks",
            br#"{"plugin": 3}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            "dir outside allowed_dirs",
            "/v1/tasks",
            dir(outside.path().to_str().unwrap())
                .to_string()
                .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "dir escaping with ..",
            "/v1/tasks",
            dir(&format!("{}/..", allowed.path().display()))
                .to_string()
                .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "dir escaping through a symlink",
            "/v1/tasks",
            dir(inside.join("escape").to_str().unwrap())
                .to_string()
                .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "relative dir",
            "/v1/tasks",
            dir("inside").to_string().into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "relative cwd",
            "/v1/tasks",
            json!({"plugin": "wc", "cwd": "d", "dirs": [{"host": allowed.path(), "guest": "/d"}]})
                .to_string()
                .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "input for a command",
            "/v1/tasks",
            json!({"plugin": "wc", "input": {"a": 1}})
                .to_string()
                .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "cycle in needs",
            "/v1/runs",
            json!({"tasks": [
                {"plugin": "hello", "key": "a", "needs": ["c"], "input": {"text": "a"}},
                {"plugin": "hello", "key": "b", "needs": ["a"], "input": {"text": "b"}},
                {"plugin": "hello", "key": "c", "needs": ["b"], "input": {"text": "c"}},
            ]})
            .to_string()
            .into_bytes(),
            400,
            "invalid_spec",
        ),
        (
            "unknown plugin",
            "/v1/tasks",
            json!({"plugin": "no-such-plugin"}).to_string().into_bytes(),
            422,
            "unknown_plugin",
        ),
        (
            "fixture not offered",
            "/v1/tasks",
            json!({"plugin": "spin-loop"}).to_string().into_bytes(),
            422,
            "unknown_plugin",
        ),
        (
            "unknown plugin in a run",
            "/v1/runs",
            json!({"tasks": [{"plugin": "hello", "input": {"text": "a"}}, {"plugin": "nope"}]})
                .to_string()
                .into_bytes(),
            422,
            "unknown_plugin",
        ),
    ];
    for (what, path, body, want_status, want_code) in cases {
        let (status, v) = s.post_raw(path, &body, "application/json", None);
        assert_eq!(status, want_status, "{what}: {v}");
        assert_eq!(v["code"], want_code, "{what}: {v}");
    }
    // Cancels: unknown task, bad body.
    let (status, v) = s.post("/v1/tasks/t_nope/cancel", &json!({}));
    assert_eq!(
        (status, v["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );

    // None of it created anything; the server is still ready and works.
    assert!(s.all_tasks("").is_empty(), "{:?}", s.all_tasks(""));
    let (_, runs) = s.get("/v1/runs");
    assert_eq!(runs["runs"].as_array().unwrap().len(), 0, "{runs}");
    let (status, _) = s.get("/readyz");
    assert_eq!(status, 200);
    let t = s.submit(json!({"plugin": "hello", "input": {"text": "still fine"}}));
    let t = s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
    assert_eq!(t["output"]["text"], "STILL FINE");
    let (status, v) = s.post(
        &format!("/v1/tasks/{}/cancel", t["id"].as_str().unwrap()),
        &json!({"bogus": true}),
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    // A directory inside allowed_dirs is accepted.
    std::fs::write(inside.join("f.txt"), "one two\nthree\n").unwrap();
    let t = s.submit(json!({"plugin": "wc", "args": ["--json", "/d"],
        "dirs": [{"host": inside.to_str().unwrap(), "guest": "/d"}]}));
    let t = s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
    assert!(
        t["stdout"]["data"]
            .as_str()
            .unwrap()
            .contains("\"words\":3"),
        "{t:#}"
    );
}

// ---------------------------------------------------------------------
// 7. Plugin upload
// ---------------------------------------------------------------------

fn is_digest(id: &str) -> bool {
    id.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

fn upload(s: &Server, name: &str, bytes: &[u8]) -> (u16, Value) {
    s.post_raw(
        &format!("/v1/plugins?name={name}"),
        bytes,
        "application/wasm",
        None,
    )
}

/// A task of `plugin` (spin-loop bytes) that runs until its timeout.
fn runs_until_timeout(s: &Server, plugin: &str) -> Value {
    let t = s.submit(json!({"plugin": plugin, "limits": {"timeout_ms": 200}}));
    let t = s.wait_task(t["id"].as_str().unwrap(), SECS_30, "finished", |t| {
        t["finished_at"].is_i64()
    });
    assert_eq!(t["state"], "timed_out", "{plugin}: {t:#}");
    assert!(t["started_at"].is_i64());
    t
}

#[test]
fn uploaded_plugins_run_by_name_and_id_and_survive_a_restart() {
    let mut s = Server::start("", None);
    let bytes = std::fs::read(wasmtask::builtin::path("spin-loop")).unwrap();
    let (status, p) = upload(&s, "my-spinner", &bytes);
    assert_eq!(status, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_owned();
    assert!(is_digest(&id), "{p}");
    assert_eq!(p["name"], "my-spinner");
    assert_eq!(p["kind"], "task");
    assert_eq!(p["size_bytes"], bytes.len() as u64);
    // The same bytes again under the same name.
    let (status, again) = upload(&s, "my-spinner", &bytes);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    // A command is recognised as one (exit-with: a fixture, so not
    // registered on this server).
    let cmd = std::fs::read(wasmtask::builtin::path("exit-with")).unwrap();
    let (status, pc) = upload(&s, "my-cmd", &cmd);
    assert_eq!(status, 201, "{pc}");
    assert_eq!(pc["kind"], "command", "{pc}");

    runs_until_timeout(&s, "my-spinner");
    let by_id = runs_until_timeout(&s, &id);
    assert_eq!(by_id["plugin_name"], "my-spinner");

    s.restart();
    let (_, list) = s.get("/v1/plugins");
    let listed = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id.as_str())
        .unwrap_or_else(|| panic!("the uploaded plugin is gone after a restart: {list:#}"));
    assert_eq!(listed["name"], "my-spinner");
    runs_until_timeout(&s, "my-spinner");
    runs_until_timeout(&s, &id);
    let t = s.submit(json!({"plugin": "my-cmd", "args": ["hi"], "env": {"EXIT_CODE": "0"}}));
    let t = s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
    assert!(
        t["stdout"]["data"].as_str().unwrap().contains("arg: hi"),
        "{t:#}"
    );
}

/// Uploading the bytes of a built-in plugin under a new name must neither
/// take the built-in's name away nor be forgotten at the next start.
#[test]
fn uploading_builtin_bytes_under_a_new_name_keeps_both_names() {
    let mut s = Server::start(&fixtures_config(""), None);
    let bytes = wasmtask::builtin::find("spin-loop").unwrap().bytes;
    let (status, p) = upload(&s, "my-spin", bytes);
    assert_eq!(status, 201, "{p}");
    assert_eq!(p["name"], "my-spin");
    runs_until_timeout(&s, "my-spin");
    runs_until_timeout(&s, "spin-loop");
    s.restart();
    runs_until_timeout(&s, "spin-loop");
    runs_until_timeout(&s, "my-spin");
}

// ---------------------------------------------------------------------
// 8. SSE resume
// ---------------------------------------------------------------------

#[test]
fn sse_resumes_without_gaps_or_duplicates_and_ends_after_the_terminal_event() {
    let s = Server::start("", None);
    let t = s.submit(json!({"plugin": "cooperative", "input": {"steps": 80, "work": 4_000_000}}));
    let id = t["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/tasks/{id}/events");

    let mut first = s.sse_get(&path, None);
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let m = first
            .next(within(60))
            .unwrap_or_else(|| panic!("the stream ended after {seen:?}"));
        seen.push(m);
    }
    drop(first); // disconnect mid-run

    let last = seen.last().unwrap().seq();
    let mut second = s.sse_get(&path, Some(last));
    let rest = second.rest(within(120));
    let all: Vec<_> = seen.iter().chain(&rest).collect();
    let seqs: Vec<i64> = all.iter().map(|m| m.seq()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not strictly increasing: {seqs:?}"
    );
    let terminal = all.last().unwrap();
    assert_eq!(
        terminal.event.as_deref(),
        Some("task.succeeded"),
        "{terminal:?}"
    );

    // The same events as the JSON page, in the same order.
    let page = s.events(&id);
    let page_seqs: Vec<i64> = page.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, page_seqs);
    for (m, e) in all.iter().zip(&page) {
        assert_eq!(m.json(), *e);
        assert_eq!(m.event.as_deref(), e["kind"].as_str());
    }
    assert!(
        count_kind(&page, "task.progress") >= 80,
        "{:?}",
        kinds(&page)
    );

    // Disconnecting cancelled nothing.
    let t = s.task(&id);
    assert_eq!(t["state"], "succeeded", "{t:#}");
    assert!(t["cancel"].is_null(), "{t:#}");
    assert_eq!(t["output"]["partial"], false);

    // Resuming with ?after= from the middle, and from the end.
    let mid = page_seqs[page_seqs.len() / 2];
    let tail = s
        .sse_get(&format!("{path}?after={mid}"), None)
        .rest(within(30));
    let tail_seqs: Vec<i64> = tail.iter().map(|m| m.seq()).collect();
    let want: Vec<i64> = page_seqs.iter().copied().filter(|&q| q > mid).collect();
    assert_eq!(tail_seqs, want);
    let none = s
        .sse_get(&path, Some(*page_seqs.last().unwrap()))
        .rest(within(30));
    assert!(none.is_empty(), "{none:?}");
    // A Last-Event-ID that is not a seq is refused.
    let resp = agent(SECS_10)
        .get(s.url(&path))
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", "abc")
        .call()
        .unwrap();
    let (status, v) = read_json(resp);
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
}

// ---------------------------------------------------------------------
// 9. Streamed submissions
// ---------------------------------------------------------------------

#[test]
fn a_streamed_submit_is_canceled_when_its_client_goes_away() {
    let s = Server::start("", None);
    let (id, mut stream) = s.submit_stream(json!({"plugin": "sleeper", "input": {"ms": 600_000}}));
    let got = stream.until_event("task.started", within(60));
    assert_eq!(got[0].event.as_deref(), Some("task.queued"), "{got:?}");
    drop(stream);
    let t = s.wait_task(&id, SECS_30, "canceled", |t| t["state"] == "canceled");
    assert_eq!(t["cancel"]["reason"], "client_disconnected", "{t:#}");
    assert!(t["cancel"]["stopped_at"].is_i64(), "{t:#}");
}

#[test]
fn a_detached_streamed_submit_keeps_running() {
    let s = Server::start("", None);
    let (id, mut stream) = s.submit_stream(json!({
        "plugin": "sleeper", "input": {"ms": 1500}, "on_disconnect": "detach"
    }));
    stream.until_event("task.started", within(60));
    drop(stream);
    let t = s.wait_task(&id, SECS_30, "finished", |t| t["finished_at"].is_i64());
    assert_eq!(t["state"], "succeeded", "{t:#}");
    assert_eq!(t["output"]["slept_ms"], 1500);
    assert!(t["cancel"].is_null(), "{t:#}");

    // A streamed submit read to its end: the stream stops after the
    // terminal event, and closing it afterwards cancels nothing.
    let (id, mut stream) =
        s.submit_stream(json!({"plugin": "hello", "input": {"text": "streamed"}}));
    let all = stream.rest(within(60));
    assert_eq!(
        all.last().unwrap().event.as_deref(),
        Some("task.succeeded"),
        "{all:?}"
    );
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    let t = s.task(&id);
    assert_eq!(t["state"], "succeeded");
    assert!(t["cancel"].is_null(), "{t:#}");
    let ev = s.events(&id);
    assert_eq!(count_kind(&ev, "task.cancel_failed"), 0, "{:?}", kinds(&ev));
    assert_eq!(
        count_kind(&ev, "task.cancel_requested"),
        0,
        "{:?}",
        kinds(&ev)
    );
}

// ---------------------------------------------------------------------
// 10. A cancel reaches a command blocked in the host
// ---------------------------------------------------------------------

/// Whether a thread of `pid` sleeps in the kernel's FIFO open. `None`: the
/// kernel does not say (wchan hidden).
fn blocked_in_fifo_open(pid: i32) -> Option<bool> {
    let mut visible = false;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        let Ok(w) = std::fs::read_to_string(t.path().join("wchan")) else {
            continue;
        };
        if w.trim() != "0" && !w.trim().is_empty() {
            visible = true;
        }
        // `wait_for_partner`: a FIFO open waiting for the other end.
        if w.contains("wait_for_partner") || w.contains("fifo") {
            return Some(true);
        }
    }
    visible.then_some(false)
}

/// A FIFO in a fresh directory; dropping it opens the FIFO for writing
/// (without blocking) and closes it, which releases a host thread blocked
/// opening it for reading.
struct Fifo {
    dir: tempfile::TempDir,
    path: std::ffi::CString,
}

impl Fifo {
    fn new() -> Fifo {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pipe");
        let path = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
        Fifo { dir, path }
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn release(&self) {
        let fd = unsafe { libc::open(self.path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK) };
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        self.release();
    }
}

/// Submits `wc /data/pipe` and waits until it is running and (when the
/// kernel shows it) a host thread of the server is blocked opening the FIFO.
fn wc_blocked_on(s: &Server, fifo: &Fifo) -> String {
    let t = s.submit(json!({"plugin": "wc", "args": ["/data/pipe"],
        "dirs": [{"host": fifo.dir(), "guest": "/data"}]}));
    let id = t["id"].as_str().unwrap().to_owned();
    s.wait_state(&id, "running", SECS_30);
    let deadline = within(10);
    loop {
        match blocked_in_fifo_open(s.pid()) {
            Some(true) => break,
            None => {
                // The kernel hides wchan: give the guest a moment.
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            Some(false) => {
                assert!(Instant::now() < deadline, "wc never blocked on the FIFO");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(s.task(&id)["state"], "running");
    id
}

#[test]
fn canceling_a_command_blocked_on_a_fifo() {
    let fifo = Fifo::new();
    std::fs::write(fifo.dir.path().join("a.txt"), "one two\n").unwrap();
    let cfg = format!("allowed_dirs = [{:?}]\n", fifo.dir());
    let s = Server::start(&cfg, None);

    // The set-up works for a regular file.
    let t = s.submit(json!({"plugin": "wc", "args": ["--json", "/data/a.txt"],
        "dirs": [{"host": fifo.dir(), "guest": "/data"}]}));
    let t = s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
    assert!(
        t["stdout"]["data"]
            .as_str()
            .unwrap()
            .contains("\"words\":2"),
        "{t:#}"
    );

    let id = wc_blocked_on(&s, &fifo);
    let asked = Instant::now();
    let (status, v) = s.post(
        &format!("/v1/tasks/{id}/cancel"),
        &json!({"reason": "stuck", "wait_ms": 5000}),
    );
    assert_eq!(status, 200, "not canceled within 5 s: {v}");
    assert!(asked.elapsed() < SECS_10);
    let t = s.task(&id);
    assert_eq!(t["state"], "canceled", "{t:#}");
    assert_eq!(t["cancel"]["reason"], "stuck");
    assert_eq!(t["cancel"]["forced"], true, "{t:#}");

    // The server goes on, with the host thread still blocked in open(2).
    let t = s.submit(json!({"plugin": "hello", "input": {"text": "after"}}));
    s.wait_state(t["id"].as_str().unwrap(), "succeeded", SECS_30);
    // Release it; nothing is left running.
    fifo.release();
    assert!(s.all_tasks("&state=running").is_empty());
}

/// SIGTERM must end the process even while a host thread of a (canceled)
/// guest is still blocked in a system call that will never return by
/// itself.
#[test]
fn shutdown_is_not_held_up_by_a_host_thread_blocked_in_a_fifo_open() {
    let fifo = Fifo::new();
    let cfg = format!(
        "allowed_dirs = [{:?}]\n[shutdown]\nwait_ms = 0\ngrace_ms = 0\n",
        fifo.dir()
    );
    let mut s = Server::start(&cfg, None);
    let id = wc_blocked_on(&s, &fifo);
    s.sigterm();
    let status = s.wait_exit(Duration::from_secs(20));
    // Release the thread whatever happened, then judge.
    fifo.release();
    let status = status.unwrap_or_else(|| {
        let late = s.wait_exit(SECS_10);
        panic!(
            "the server did not exit within 20 s of SIGTERM while a host thread was blocked \
             opening a FIFO (after releasing it: {late:?}); stderr:\n{}",
            s.stderr_text()
        )
    });
    assert_eq!(status.code(), Some(0), "{}", s.stderr_text());
    s.restart();
    let t = s.task(&id);
    assert_eq!(t["state"], "canceled", "{t:#}");
    assert_eq!(t["cancel"]["reason"], "server_shutdown", "{t:#}");
}

// ---------------------------------------------------------------------
// Compilation under a burst
// ---------------------------------------------------------------------

/// Many tasks of a plugin not compiled yet, dispatched at once: it is
/// compiled once (one writer of the compile cache), not once per task.
#[test]
fn a_burst_of_first_uses_compiles_the_plugin_once() {
    let s = Server::start("", None);
    let tasks: Vec<Value> = (0..40)
        .map(|i| json!({"plugin": "hello", "input": {"text": "x"}, "key": format!("s{i}")}))
        .collect();
    let (status, view) = s.post("/v1/runs", &json!({"tasks": tasks}));
    assert_eq!(status, 201, "{view}");
    let run = view["run"]["id"].as_str().unwrap();
    let v = s.wait_run(run, Duration::from_secs(120));
    assert_eq!(v["run"]["state"], "succeeded", "{v:#}");
    let cached: Vec<_> = std::fs::read_dir(s.data_dir.join("cache"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached
            .iter()
            .any(|n| n.to_string_lossy().ends_with(".cwasm")),
        "nothing in the compile cache: {cached:?}"
    );
    let stderr = s.stderr_text();
    let races = stderr.matches("cannot write component cache").count();
    assert_eq!(
        races, 0,
        "the plugin was compiled by several tasks at once ({races} of them lost the race \
         writing the cache):\n{stderr}"
    );
}
