//! The HTTP API in-process: a real `Service` (runtime, SQLite, dispatcher)
//! behind `api::router`, driven with `tower::ServiceExt::oneshot`. Each test
//! owns its database and runtime; compiled components are shared through one
//! cache directory.
//!
//! Covered: cancel of running, queued, finished and unknown tasks; repeated
//! and escalated cancels; graceful cancels with a partial result; run abort;
//! `needs` ordering; `fail_fast` and broken needs; locks; refused input;
//! metrics, health and the OpenAPI description; bearer-token auth.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;
use wasmtask::api::{self, ApiConfig};
use wasmtask::db::Db;
use wasmtask::service::{Service, ServiceConfig};
use wasmtask_runtime::{Runtime, RuntimeConfig};

/// The most any wait in these tests may take (generous: 2 shared cores, a
/// parallel test binary).
const PATIENCE: Duration = Duration::from_secs(90);

const TERMINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "canceled"];

fn runtime_config() -> RuntimeConfig {
    RuntimeConfig {
        cache_dir: Some(std::env::temp_dir().join("wasmtask-test-cache")),
        max_concurrent: 16,
        capture_limit: 64 * 1024,
        ..RuntimeConfig::default()
    }
}

/// Compiles every built-in plugin into the shared cache once, from one
/// thread, before any test's runtime reads it: tests running in parallel
/// would otherwise all compile the same components and write the same cache
/// files at once.
fn warm_cache() {
    static WARM: OnceLock<()> = OnceLock::new();
    WARM.get_or_init(|| {
        let rt = Runtime::new(runtime_config()).unwrap();
        for p in wasmtask::builtin::PLUGINS {
            rt.load(p.bytes)
                .unwrap_or_else(|e| panic!("plugin {} does not load: {e}", p.name));
        }
    });
}

/// A service and its router over a fresh database (the dashboard tests use
/// it too).
pub(crate) struct Api {
    pub(crate) router: Router,
    pub(crate) svc: Service,
    /// The one host directory tasks may share (canonical).
    allowed: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) async fn start() -> Api {
    start_with(None).await
}

async fn start_with(token: Option<&str>) -> Api {
    tokio::task::block_in_place(warm_cache);
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let allowed = std::fs::canonicalize(&allowed).unwrap();
    let rt = Runtime::new(runtime_config()).unwrap();
    let db = Db::open(&dir.path().join("wasmtask.db")).await.unwrap();
    let svc = Service::start(
        rt,
        db,
        ServiceConfig {
            allowed_dirs: vec![allowed.clone()],
            max_running: 16,
            plugin_dir: dir.path().join("plugins"),
            builtin_fixtures: true,
            workspace_dir: dir.path().join("workspaces"),
        },
    )
    .await
    .unwrap();
    let router = api::router(
        svc.clone(),
        ApiConfig {
            token: token.map(str::to_owned),
            max_body_bytes: api::DEFAULT_MAX_BODY_BYTES,
            max_plugin_bytes: api::DEFAULT_MAX_PLUGIN_BYTES,
        },
    );
    Api {
        router,
        svc,
        allowed,
        dir,
    }
}

fn parse(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn state(t: &Value) -> &str {
    t["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no state in {t}"))
}

fn key_of(t: &Value) -> &str {
    t["spec"]["key"]
        .as_str()
        .unwrap_or_else(|| panic!("no key in {t}"))
}

/// The task of `view` (a `RunView`) with key `key`.
fn by_key<'a>(view: &'a Value, key: &str) -> &'a Value {
    view["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| key_of(t) == key)
        .unwrap_or_else(|| panic!("no task `{key}` in {view}"))
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

/// The seq of the first event of `kind` (panics if there is none).
fn seq_of(events: &[Value], kind: &str) -> i64 {
    events
        .iter()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {:?}", kinds(events)))["seq"]
        .as_i64()
        .unwrap()
}

fn millis(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not a time: {v}"))
}

impl Api {
    async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .unwrap();
        (status, headers, bytes)
    }

    async fn call(&self, method: Method, uri: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(v).unwrap())
            }
            None => Body::empty(),
        };
        let (status, _, bytes) = self.send(req.body(body).unwrap()).await;
        (status, parse(&bytes))
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, uri, Some(&body)).await
    }

    /// POSTs raw bytes as JSON.
    async fn post_raw(&self, uri: &str, body: &'static [u8]) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let (status, _, bytes) = self.send(req).await;
        (status, parse(&bytes))
    }

    /// Submits a task; returns its record (201 asserted).
    async fn submit(&self, body: Value) -> Value {
        let (status, t) = self.post("/v1/tasks", body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "submit {body}: {t}");
        assert_eq!(state(&t), "queued", "{t}");
        t
    }

    async fn submit_id(&self, body: Value) -> String {
        self.submit(body).await["id"].as_str().unwrap().to_owned()
    }

    async fn cancel(&self, id: &str, body: Value) -> (StatusCode, Value) {
        self.post(&format!("/v1/tasks/{id}/cancel"), body).await
    }

    async fn task(&self, id: &str) -> Value {
        let (status, t) = self.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{t}");
        t
    }

    /// Polls the task until `pred` holds (panics after [`PATIENCE`]).
    async fn wait_task(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = self.task(id).await;
            if pred(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "task {id} never {what}: {t}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_state(&self, id: &str, s: &str) -> Value {
        self.wait_task(id, s, |t| state(t) == s).await
    }

    async fn wait_end(&self, id: &str) -> Value {
        self.wait_task(id, "ended", |t| TERMINAL.contains(&state(t)))
            .await
    }

    /// Every event of a task, oldest first (all pages).
    async fn events(&self, id: &str) -> Vec<Value> {
        self.all_events(&format!("/v1/tasks/{id}/events")).await
    }

    async fn run_events(&self, id: &str) -> Vec<Value> {
        self.all_events(&format!("/v1/runs/{id}/events")).await
    }

    async fn all_events(&self, route: &str) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self.get(&format!("{route}?after={after}")).await;
            assert_eq!(status, StatusCode::OK, "{route}: {page}");
            let events = page["events"].as_array().unwrap().clone();
            let Some(last) = events.last() else {
                return all;
            };
            after = last["seq"].as_i64().unwrap();
            all.extend(events);
        }
    }

    /// Polls the task's events until one of `kind` is there.
    async fn wait_event(&self, id: &str, kind: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.events(id).await.iter().any(|e| e["kind"] == kind) {
                return;
            }
            assert!(Instant::now() < deadline, "task {id}: no {kind} event");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn submit_run(&self, body: Value) -> Value {
        let (status, view) = self.post("/v1/runs", body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "run {body}: {view}");
        assert_eq!(view["run"]["state"], "running", "{view}");
        view
    }

    async fn run(&self, id: &str) -> Value {
        let (status, view) = self.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        view
    }

    /// Polls the run until it is finished; returns its view.
    async fn wait_run(&self, id: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let view = self.run(id).await;
            if ["succeeded", "failed", "aborted"].contains(&view["run"]["state"].as_str().unwrap())
            {
                return view;
            }
            assert!(Instant::now() < deadline, "run {id} never finished: {view}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the dispatcher and stops whatever still runs.
    async fn stop(self) {
        self.svc.stop_accepting();
        self.svc.drain(Duration::ZERO, Duration::ZERO).await;
        assert_eq!(self.svc.running(), 0, "tasks still running after drain");
    }
}

fn assert_forced_cancel(t: &Value, reason: &str) {
    assert_eq!(state(t), "canceled", "{t}");
    let c = &t["cancel"];
    assert_eq!(c["actor"], "api", "{t}");
    assert_eq!(c["reason"], reason, "{t}");
    assert_eq!(c["forced"], true, "{t}");
    assert_eq!(c["acknowledged"], false, "{t}");
    assert!(c["latency_us"].is_u64(), "latency_us not set: {t}");
    assert!(c["stopped_at"].is_i64(), "stopped_at not set: {t}");
    assert!(c["requested_at"].is_i64(), "{t}");
    assert_eq!(t["error"]["kind"], "canceled", "{t}");
    assert!(t["finished_at"].is_i64(), "{t}");
}

// ---------------------------------------------------------------------
// 1. Cancel of running tasks
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_spinning_and_a_sleeping_task() {
    let api = start().await;
    let guests = [
        ("spin-loop", json!({})),
        ("sleeper", json!({"ms": 600_000})),
    ];

    // Forced at once and waited for: 200, canceled, the whole cancel record.
    for (plugin, input) in &guests {
        let id = api
            .submit_id(json!({"plugin": plugin, "input": input}))
            .await;
        api.wait_state(&id, "running").await;
        if *plugin == "sleeper" {
            // Let it reach its WASI sleep (correct either way).
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let reason = format!("stop the {plugin}");
        let (status, body) = api
            .cancel(
                &id,
                json!({"reason": reason, "grace_ms": 0, "wait_ms": 5000}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{plugin}: {body}");
        let t = &body["task"];
        assert_forced_cancel(t, &reason);
        assert_eq!(t["cancel"]["grace_ms"], 0, "{t}");
        assert_eq!(*t, api.task(&id).await, "the answer is the stored record");
        let events = api.events(&id).await;
        let requested = seq_of(&events, "task.cancel_requested");
        let forced = seq_of(&events, "task.cancel_forced");
        let canceled = seq_of(&events, "task.canceled");
        assert!(
            seq_of(&events, "task.started") < requested,
            "{:?}",
            kinds(&events)
        );
        assert!(
            requested < forced && forced < canceled,
            "{:?}",
            kinds(&events)
        );
    }

    // Not waited for: 202 with the request recorded, then it ends canceled.
    for (plugin, input) in &guests {
        let id = api
            .submit_id(json!({"plugin": plugin, "input": input}))
            .await;
        api.wait_state(&id, "running").await;
        let (status, body) = api
            .cancel(&id, json!({"reason": "no waiting", "grace_ms": 0}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{plugin}: {body}");
        let t = &body["task"];
        assert_eq!(state(t), "cancel_requested", "{t}");
        let c = &t["cancel"];
        assert_eq!(c["actor"], "api", "{t}");
        assert_eq!(c["reason"], "no waiting", "{t}");
        assert_eq!(c["grace_ms"], 0, "{t}");
        assert!(c["requested_at"].is_i64(), "{t}");
        assert_eq!(t["cancel_requested_at"], c["requested_at"], "{t}");
        let end = api.wait_end(&id).await;
        assert_forced_cancel(&end, "no waiting");
        assert_eq!(end["cancel"]["requested_at"], c["requested_at"], "{end}");
    }
    api.stop().await;
}

// ---------------------------------------------------------------------
// 2. A queued task is canceled at once and never starts
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_task_is_canceled_at_once_and_never_starts() {
    let api = start().await;
    let holder = api
        .submit_id(json!({"plugin": "spin-loop", "input": {}, "locks": ["q"]}))
        .await;
    api.wait_state(&holder, "running").await;
    let waiter = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "never"}, "locks": ["q"]}))
        .await;
    // It cannot start while the holder has the lock, however long we look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&api.task(&waiter).await), "queued");

    let (status, body) = api
        .cancel(&waiter, json!({"reason": "not needed any more"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let t = body["task"].clone();
    assert_eq!(state(&t), "canceled", "{t}");
    assert!(t["started_at"].is_null(), "{t}");
    assert_eq!(t["attempt"], 0, "{t}");
    assert!(t["finished_at"].is_i64(), "{t}");
    assert_eq!(t["cancel"]["actor"], "api", "{t}");
    assert_eq!(t["cancel"]["reason"], "not needed any more", "{t}");
    assert_eq!(t["cancel"]["forced"], false, "{t}");

    // A canceled task is finished: a second cancel is a 409 with the record.
    let (status, again) = api.cancel(&waiter, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["code"], "task_finished", "{again}");
    assert_eq!(again["task"], t, "{again}");

    // Free the lock; a later task with the same lock runs (so dispatch
    // passes happened with the lock free), and the canceled one still never
    // started.
    let (status, body) = api
        .cancel(&holder, json!({"grace_ms": 0, "wait_ms": 10_000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let later = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "later"}, "locks": ["q"]}))
        .await;
    assert_eq!(state(&api.wait_end(&later).await), "succeeded");
    assert_eq!(api.task(&waiter).await, t, "the canceled task changed");
    let k = kinds(&api.events(&waiter).await).join(" ");
    assert!(
        !k.contains("task.started") && !k.contains("task.lock_acquired"),
        "{k}"
    );
    assert!(
        k.contains("task.cancel_requested") && k.contains("task.canceled"),
        "{k}"
    );
    api.stop().await;
}

// ---------------------------------------------------------------------
// 3. Finished and unknown tasks
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_finished_task_is_409_and_of_an_unknown_one_404() {
    let api = start().await;
    let id = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "done soon"}}))
        .await;
    let before = api.wait_end(&id).await;
    assert_eq!(state(&before), "succeeded", "{before}");
    assert_eq!(before["output"]["text"], "DONE SOON", "{before}");

    let (status, body) = api
        .cancel(&id, json!({"reason": "too late", "grace_ms": 0}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "task_finished", "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(body["task"], before, "409 carries the unchanged record");
    let after = api.task(&id).await;
    assert_eq!(after, before, "a refused cancel changed the record");
    assert!(after["cancel"].is_null(), "{after}");
    let k = kinds(&api.events(&id).await).join(" ");
    assert!(!k.contains("cancel"), "{k}");

    for uri in ["/v1/tasks/t_nope/cancel", "/v1/tasks/nope/cancel"] {
        let (status, body) = api.post(uri, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
        assert_eq!(body["code"], "not_found", "{body}");
    }
    let (status, body) = api.get("/v1/tasks/t_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "not_found", "{body}");
    api.stop().await;
}

// ---------------------------------------------------------------------
// 4. Repeated cancels
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_cancel_returns_the_same_record_and_grace_zero_forces_it() {
    let api = start().await;
    let id = api
        .submit_id(json!({"plugin": "spin-loop", "input": {}}))
        .await;
    api.wait_state(&id, "running").await;

    let (status, first) = api
        .cancel(&id, json!({"reason": "first", "grace_ms": 60_000}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let record = first["task"]["cancel"].clone();
    assert_eq!(state(&first["task"]), "cancel_requested", "{first}");
    assert_eq!(record["actor"], "api", "{record}");
    assert_eq!(record["reason"], "first", "{record}");
    assert_eq!(record["grace_ms"], 60_000, "{record}");
    assert!(record["stopped_at"].is_null(), "{record}");

    // The same or a longer grace: the same record, still in grace.
    for grace in [60_000, 120_000] {
        let (status, again) = api
            .cancel(&id, json!({"reason": "second", "grace_ms": grace}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{again}");
        assert_eq!(state(&again["task"]), "cancel_requested", "{again}");
        assert_eq!(
            again["task"]["cancel"], record,
            "grace {grace}: a new cancel record"
        );
    }
    assert_eq!(state(&api.task(&id).await), "cancel_requested");

    // Grace 0 brings the forced stop forward (long before the 60 s grace).
    let (status, forced) = api
        .cancel(
            &id,
            json!({"reason": "third", "grace_ms": 0, "wait_ms": 10_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{forced}");
    let t = &forced["task"];
    assert_forced_cancel(t, "first");
    assert_eq!(t["cancel"]["requested_at"], record["requested_at"], "{t}");
    assert_eq!(t["cancel"]["grace_ms"], 0, "{t}");

    let events = api.events(&id).await;
    let requests: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "task.cancel_requested")
        .collect();
    assert!(
        requests.iter().any(|e| e["data"]["escalated"] == true),
        "no escalation in {requests:?}"
    );
    assert_eq!(
        kinds(&events)
            .iter()
            .filter(|k| **k == "task.canceled")
            .count(),
        1,
        "{:?}",
        kinds(&events)
    );
    api.stop().await;
}

// ---------------------------------------------------------------------
// 5. Graceful cancel
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_cancel_keeps_the_partial_result() {
    let api = start().await;
    let id = api
        .submit_id(json!({
            "plugin": "cooperative",
            "input": {"steps": 1_000_000, "work": 1_000_000}
        }))
        .await;
    api.wait_event(&id, "task.checkpoint").await;

    let (status, body) = api
        .cancel(
            &id,
            json!({"reason": "enough", "grace_ms": 30_000, "wait_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let t = &body["task"];
    assert_eq!(state(t), "canceled", "{t}");
    let c = &t["cancel"];
    assert_eq!(c["actor"], "api", "{t}");
    assert_eq!(c["reason"], "enough", "{t}");
    assert_eq!(c["acknowledged"], true, "{t}");
    assert_eq!(c["forced"], false, "{t}");
    assert!(c["latency_us"].is_u64(), "{t}");
    assert_eq!(t["output"]["partial"], true, "{t}");
    let done = t["output"]["done"].as_u64().unwrap();
    assert!((1..1_000_000).contains(&done), "{t}");
    assert!(t["partial_output"]["done"].as_u64().unwrap() >= 1, "{t}");
    assert!(t["error"].is_null(), "{t}");

    let events = api.events(&id).await;
    let k = kinds(&events);
    assert!(k.contains(&"task.cancel_acknowledged"), "{k:?}");
    assert!(!k.contains(&"task.cancel_forced"), "{k:?}");
    assert!(seq_of(&events, "task.cancel_requested") < seq_of(&events, "task.cancel_acknowledged"));

    // A task's own grace_ms applies to cancels that name none; repeating
    // such a cancel does not shorten it.
    let id = api
        .submit_id(json!({
            "plugin": "cooperative",
            "input": {"steps": 1_000_000, "work": 1_000_000},
            "grace_ms": 30_000
        }))
        .await;
    api.wait_event(&id, "task.checkpoint").await;
    let (status, first) = api.cancel(&id, json!({})).await;
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::OK,
        "{status}: {first}"
    );
    assert_eq!(first["task"]["cancel"]["grace_ms"], 30_000, "{first}");
    assert_eq!(first["task"]["cancel"]["actor"], "api", "{first}");
    let (status, body) = api.cancel(&id, json!({"wait_ms": 30_000})).await;
    assert!(
        status == StatusCode::OK || status == StatusCode::CONFLICT,
        "{status}: {body}"
    );
    let t = api.wait_end(&id).await;
    assert_eq!(state(&t), "canceled", "{t}");
    assert_eq!(t["cancel"]["grace_ms"], 30_000, "{t}");
    assert_eq!(t["cancel"]["acknowledged"], true, "{t}");
    assert_eq!(t["cancel"]["forced"], false, "{t}");
    assert_eq!(
        t["cancel"]["requested_at"],
        first["task"]["cancel"]["requested_at"]
    );
    assert_eq!(t["output"]["partial"], true, "{t}");
    api.stop().await;
}

// ---------------------------------------------------------------------
// 6. Run abort
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_abort_cancels_running_and_queued_tasks() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "name": "mixed",
            "tasks": [
                {"key": "a", "plugin": "hello", "input": {"text": "a"}},
                {"key": "b", "plugin": "spin-loop", "input": {}},
                {"key": "c", "plugin": "hello", "input": {"text": "c"}, "needs": ["b"]}
            ]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    assert_eq!(view["run"]["name"], "mixed");
    let id = |k: &str| by_key(&view, k)["id"].as_str().unwrap().to_owned();
    let (a, b, c) = (id("a"), id("b"), id("c"));
    for t in view["tasks"].as_array().unwrap() {
        assert_eq!(t["run_id"], run_id.as_str(), "{t}");
    }
    assert_eq!(state(&api.wait_end(&a).await), "succeeded");
    api.wait_state(&b, "running").await;
    assert_eq!(state(&api.task(&c).await), "queued");

    let abort_uri = format!("/v1/runs/{run_id}/abort");
    let (status, view) = api
        .post(
            &abort_uri,
            json!({"reason": "operator stop", "grace_ms": 0, "wait_ms": 10_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let run = &view["run"];
    assert_eq!(run["state"], "aborted", "{view}");
    assert_eq!(run["abort"]["actor"], "api", "{view}");
    assert_eq!(run["abort"]["reason"], "operator stop", "{view}");
    assert!(run["abort"]["requested_at"].is_i64(), "{view}");
    assert!(run["finished_at"].is_i64(), "{view}");

    let ta = by_key(&view, "a");
    assert_eq!(state(ta), "succeeded", "{ta}");
    assert!(ta["cancel"].is_null(), "{ta}");
    let tb = by_key(&view, "b");
    assert_eq!(state(tb), "canceled", "{tb}");
    assert_eq!(tb["cancel"]["reason"], "operator stop", "{tb}");
    assert_eq!(tb["cancel"]["forced"], true, "{tb}");
    let tc = by_key(&view, "c");
    assert_eq!(state(tc), "canceled", "{tc}");
    assert!(tc["started_at"].is_null(), "{tc}");
    assert_eq!(tc["attempt"], 0, "{tc}");
    assert_eq!(api.run(&run_id).await, view, "the answer is the stored run");
    assert_eq!(api.task(&b).await, *tb);
    assert_eq!(api.task(&c).await, *tc);

    let (status, again) = api.post(&abort_uri, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["code"], "run_finished", "{again}");
    let (status, body) = api.post("/v1/runs/r_nope/abort", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let events = api.run_events(&run_id).await;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"run.created"), "{k:?}");
    assert_eq!(k.last(), Some(&"run.finished"), "{k:?}");
    assert!(k.contains(&"run.abort_requested"), "{k:?}");
    assert_eq!(
        k.iter().filter(|x| **x == "run.finished").count(),
        1,
        "{k:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["kind"] == "task.started" && e["task_id"] == c.as_str())
    );
    api.stop().await;
}

/// An abort with a grace gives every running task that grace: a cooperative
/// task sees it and returns its partial result, even though another task of
/// the run (a queued one) ends during the abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_run_abort_lets_running_tasks_acknowledge() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "tasks": [
                {"key": "coop", "plugin": "cooperative",
                 "input": {"steps": 1_000_000, "work": 20_000_000}},
                {"key": "later", "plugin": "hello", "input": {"text": "x"}, "needs": ["coop"]}
            ]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let coop = by_key(&view, "coop")["id"].as_str().unwrap().to_owned();
    api.wait_event(&coop, "task.checkpoint").await;

    let (status, view) = api
        .post(
            &format!("/v1/runs/{run_id}/abort"),
            json!({"reason": "wind down", "grace_ms": 30_000, "wait_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["run"]["state"], "aborted", "{view}");
    let later = by_key(&view, "later");
    assert_eq!(state(later), "canceled", "{later}");
    assert!(later["started_at"].is_null(), "{later}");
    let t = by_key(&view, "coop");
    assert_eq!(state(t), "canceled", "{t}");
    assert_eq!(t["cancel"]["reason"], "wind down", "{t}");
    assert_eq!(
        t["cancel"]["grace_ms"], 30_000,
        "the abort's grace was cut short: {t}"
    );
    assert_eq!(t["cancel"]["forced"], false, "{t}");
    assert_eq!(t["cancel"]["acknowledged"], true, "{t}");
    assert_eq!(t["output"]["partial"], true, "{t}");
    api.stop().await;
}

/// The same without `wait_ms`: 202 at once, and the grace still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_run_abort_without_wait_keeps_its_grace() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "tasks": [{"key": "coop", "plugin": "cooperative",
                       "input": {"steps": 1_000_000, "work": 20_000_000}}]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let coop = by_key(&view, "coop")["id"].as_str().unwrap().to_owned();
    api.wait_event(&coop, "task.checkpoint").await;

    let (status, view) = api
        .post(
            &format!("/v1/runs/{run_id}/abort"),
            json!({"reason": "wind down", "grace_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{view}");
    assert_eq!(view["run"]["state"], "aborting", "{view}");
    let view = api.wait_run(&run_id).await;
    assert_eq!(view["run"]["state"], "aborted", "{view}");
    let t = by_key(&view, "coop");
    assert_eq!(state(t), "canceled", "{t}");
    let escalations: Vec<Value> = api
        .events(&coop)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "task.cancel_requested" && e["data"]["escalated"] == true)
        .collect();
    assert!(
        escalations.is_empty(),
        "nobody asked for a shorter grace: {escalations:?}"
    );
    assert_eq!(
        t["cancel"]["grace_ms"], 30_000,
        "the abort's grace was cut short: {t}"
    );
    assert_eq!(t["cancel"]["acknowledged"], true, "{t}");
    assert_eq!(t["cancel"]["forced"], false, "{t}");
    api.stop().await;
}

// ---------------------------------------------------------------------
// 7. needs ordering
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_start_tasks_in_order() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "tasks": [
                {"key": "c", "plugin": "hello", "input": {"text": "c"}, "needs": ["b"]},
                {"key": "b", "plugin": "sleeper", "input": {"ms": 50}, "needs": ["a"]},
                {"key": "a", "plugin": "hello", "input": {"text": "a"}}
            ]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let view = api.wait_run(&run_id).await;
    assert_eq!(view["run"]["state"], "succeeded", "{view}");
    assert!(view["run"]["abort"].is_null(), "{view}");
    for t in view["tasks"].as_array().unwrap() {
        assert_eq!(state(t), "succeeded", "{t}");
    }
    let events = api.run_events(&run_id).await;
    for (task, need) in [("b", "a"), ("c", "b")] {
        let (t, n) = (by_key(&view, task), by_key(&view, need));
        assert!(
            millis(&t["started_at"]) >= millis(&n["finished_at"]),
            "`{task}` started before `{need}` finished: {t} {n}"
        );
        let started = events
            .iter()
            .find(|e| e["kind"] == "task.started" && e["task_id"] == t["id"])
            .unwrap();
        let need_done = events
            .iter()
            .find(|e| e["kind"] == "task.succeeded" && e["task_id"] == n["id"])
            .unwrap();
        assert!(
            started["seq"].as_i64() > need_done["seq"].as_i64(),
            "{events:?}"
        );
    }
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"run.created"), "{k:?}");
    assert_eq!(k.last(), Some(&"run.finished"), "{k:?}");
    assert_eq!(
        k.iter().filter(|x| **x == "task.succeeded").count(),
        3,
        "{k:?}"
    );
    api.stop().await;
}

// ---------------------------------------------------------------------
// 8. fail_fast and broken needs
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_aborts_the_rest_of_the_run() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "fail_fast": true,
            "tasks": [
                {"key": "warmup", "plugin": "sleeper", "input": {"ms": 1000}},
                {"key": "bad", "plugin": "panicker", "input": {}, "needs": ["warmup"]},
                {"key": "sibling", "plugin": "spin-loop", "input": {}},
                {"key": "dependent", "plugin": "hello", "input": {"text": "x"}, "needs": ["bad"]}
            ]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    assert_eq!(view["run"]["fail_fast"], true);
    let view = api.wait_run(&run_id).await;
    // A fail-fast abort ends the run `failed` (try_run_progress), with the
    // abort recorded as fail_fast's.
    assert_eq!(view["run"]["state"], "failed", "{view}");
    assert_eq!(view["run"]["abort"]["actor"], "fail_fast", "{view}");
    let why = view["run"]["abort"]["reason"].as_str().unwrap();
    assert!(why.contains("`bad`"), "{why}");

    assert_eq!(state(by_key(&view, "warmup")), "succeeded");
    let bad = by_key(&view, "bad");
    assert_eq!(state(bad), "failed", "{bad}");
    assert_eq!(bad["error"]["kind"], "trap", "{bad}");
    let sibling = by_key(&view, "sibling");
    assert_eq!(state(sibling), "canceled", "{sibling}");
    assert_eq!(sibling["cancel"]["actor"], "fail_fast", "{sibling}");
    // It had a second to start while `warmup` slept: it was stopped running.
    assert!(sibling["started_at"].is_i64(), "{sibling}");
    assert_eq!(sibling["cancel"]["forced"], true, "{sibling}");
    let reason = sibling["cancel"]["reason"].as_str().unwrap();
    assert!(reason.contains("`bad`"), "{reason}");
    let dependent = by_key(&view, "dependent");
    assert_eq!(state(dependent), "canceled", "{dependent}");
    assert!(dependent["started_at"].is_null(), "{dependent}");
    let reason = dependent["cancel"]["reason"].as_str().unwrap();
    assert!(reason.contains("`bad`"), "{reason}");
    let k = kinds(&api.run_events(&run_id).await).join(" ");
    assert!(
        k.contains("run.abort_requested") && k.ends_with("run.finished"),
        "{k}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fail_fast_only_dependents_of_a_failure_are_canceled() {
    let api = start().await;
    let view = api
        .submit_run(json!({
            "tasks": [
                {"key": "bad", "plugin": "exit-with", "env": {"EXIT_CODE": "1"}},
                {"key": "dependent", "plugin": "hello", "input": {"text": "x"}, "needs": ["bad"]},
                {"key": "independent", "plugin": "sleeper", "input": {"ms": 300}}
            ]
        }))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let view = api.wait_run(&run_id).await;
    assert_eq!(view["run"]["state"], "failed", "{view}");
    assert!(view["run"]["abort"].is_null(), "{view}");
    let bad = by_key(&view, "bad");
    assert_eq!(state(bad), "failed", "{bad}");
    assert_eq!(bad["exit_code"], 1, "{bad}");
    assert_eq!(bad["error"]["kind"], "exit_code", "{bad}");
    let dependent = by_key(&view, "dependent");
    assert_eq!(state(dependent), "canceled", "{dependent}");
    assert!(dependent["started_at"].is_null(), "{dependent}");
    assert_eq!(dependent["cancel"]["actor"], "run", "{dependent}");
    let reason = dependent["cancel"]["reason"].as_str().unwrap();
    assert!(reason.contains("`bad`"), "{reason}");
    let independent = by_key(&view, "independent");
    assert_eq!(state(independent), "succeeded", "{independent}");
    assert_eq!(independent["output"]["slept_ms"], 300, "{independent}");
    api.stop().await;
}

// ---------------------------------------------------------------------
// 9. Locks
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_a_lock_never_overlap() {
    let api = start().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            api.submit_id(json!({"plugin": "sleeper", "input": {"ms": 300}, "locks": ["db"]}))
                .await,
        );
    }
    let mut ends = Vec::new();
    for id in &ids {
        let t = api.wait_end(id).await;
        assert_eq!(state(&t), "succeeded", "{t}");
        assert_eq!(t["spec"]["locks"], json!(["db"]), "{t}");
        ends.push(t);
    }
    ends.sort_by_key(|t| millis(&t["started_at"]));
    assert!(
        millis(&ends[1]["started_at"]) >= millis(&ends[0]["finished_at"]),
        "overlap: {} and {}",
        ends[0],
        ends[1]
    );
    let mut trails = Vec::new();
    for t in &ends {
        let events = api.events(t["id"].as_str().unwrap()).await;
        let acquired = seq_of(&events, "task.lock_acquired");
        let started = seq_of(&events, "task.started");
        let released = seq_of(&events, "task.lock_released");
        assert!(
            acquired < started && started < released,
            "{:?}",
            kinds(&events)
        );
        for kind in ["task.lock_acquired", "task.lock_released"] {
            let e = events.iter().find(|e| e["kind"] == kind).unwrap();
            assert_eq!(e["data"]["lock"], "db", "{e}");
        }
        trails.push((acquired, released));
    }
    assert!(
        trails[1].0 > trails[0].1,
        "the second took the lock before it was released"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_the_lock_holder_lets_the_waiter_start() {
    let api = start().await;
    let holder = api
        .submit_id(json!({"plugin": "spin-loop", "input": {}, "locks": ["k", "k2"]}))
        .await;
    api.wait_state(&holder, "running").await;
    let waiter = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "w"}, "locks": ["k2"]}))
        .await;
    // Another lock is free meanwhile.
    let other = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "o"}, "locks": ["other"]}))
        .await;
    assert_eq!(state(&api.wait_end(&other).await), "succeeded");
    assert_eq!(state(&api.task(&waiter).await), "queued");

    let (status, body) = api
        .cancel(
            &holder,
            json!({"reason": "free the lock", "grace_ms": 0, "wait_ms": 10_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let h = &body["task"];
    assert_forced_cancel(h, "free the lock");
    let w = api.wait_end(&waiter).await;
    assert_eq!(state(&w), "succeeded", "{w}");
    assert!(
        millis(&w["started_at"]) >= millis(&h["finished_at"]),
        "{w} {h}"
    );
    let events = api.events(&holder).await;
    let released: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "task.lock_released")
        .collect();
    let mut locks: Vec<&str> = released
        .iter()
        .map(|e| e["data"]["lock"].as_str().unwrap())
        .collect();
    locks.sort();
    assert_eq!(locks, ["k", "k2"], "{:?}", kinds(&events));
    let waiter_events = api.events(&waiter).await;
    assert!(seq_of(&waiter_events, "task.lock_acquired") > seq_of(&events, "task.lock_released"));
    api.stop().await;
}

// ---------------------------------------------------------------------
// 10. Refused input
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_stable_codes() {
    let api = start().await;
    let expect = |what: &str, (status, body): (StatusCode, Value), s: StatusCode, code: &str| {
        assert_eq!(status, s, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    };
    let bad = StatusCode::BAD_REQUEST;

    let r = api
        .post(
            "/v1/tasks",
            json!({"plugin": "hello", "input": {"text": "x"}, "bogus": 1}),
        )
        .await;
    expect("unknown field", r.clone(), bad, "bad_request");
    assert!(
        r.1["message"].as_str().unwrap().contains("bogus"),
        "{}",
        r.1
    );
    expect(
        "bad JSON",
        api.post_raw("/v1/tasks", b"{\"plugin\": ").await,
        bad,
        "bad_request",
    );
    expect(
        "not an object",
        api.post_raw("/v1/tasks", b"[1, 2]").await,
        bad,
        "bad_request",
    );
    expect(
        "empty body",
        api.post_raw("/v1/tasks", b"").await,
        bad,
        "bad_request",
    );
    expect(
        "bad cancel body",
        api.post_raw("/v1/tasks/t_x/cancel", b"{\"grace\": 1}")
            .await,
        bad,
        "bad_request",
    );
    expect(
        "unknown plugin",
        api.post("/v1/tasks", json!({"plugin": "no-such-plugin"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_plugin",
    );

    // dirs: only under allowed_dirs, symlinks resolved first.
    let outside = api.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let escape = api.allowed.join("escape");
    std::os::unix::fs::symlink(&outside, &escape).unwrap();
    for host in [
        outside.to_str().unwrap(),
        "/etc",
        escape.to_str().unwrap(),
        "relative/dir",
    ] {
        expect(
            &format!("dir {host}"),
            api.post(
                "/v1/tasks",
                json!({"plugin": "wc", "args": ["/src"], "dirs": [{"host": host, "guest": "/src"}]}),
            )
            .await,
            bad,
            "invalid_spec",
        );
    }
    expect(
        "input for a command",
        api.post("/v1/tasks", json!({"plugin": "wc", "input": {"a": 1}}))
            .await,
        bad,
        "invalid_spec",
    );
    expect(
        "key in a plain submit",
        api.post(
            "/v1/tasks",
            json!({"plugin": "hello", "input": {"text": "x"}, "key": "a"}),
        )
        .await,
        bad,
        "invalid_spec",
    );
    expect(
        "needs in a plain submit",
        api.post(
            "/v1/tasks",
            json!({"plugin": "hello", "input": {"text": "x"}, "needs": ["a"]}),
        )
        .await,
        bad,
        "invalid_spec",
    );
    let hello = |key: &str, needs: &[&str]| json!({"key": key, "plugin": "hello", "input": {"text": key}, "needs": needs});
    for (what, tasks) in [
        (
            "cycle",
            vec![hello("a", &["c"]), hello("b", &["a"]), hello("c", &["b"])],
        ),
        ("self need", vec![hello("a", &["a"])]),
        ("duplicate keys", vec![hello("a", &[]), hello("a", &[])]),
        ("unknown need", vec![hello("a", &["zz"])]),
        ("no tasks", vec![]),
    ] {
        expect(
            what,
            api.post("/v1/runs", json!({"tasks": tasks})).await,
            bad,
            "invalid_spec",
        );
    }
    expect(
        "run with an unknown plugin",
        api.post(
            "/v1/runs",
            json!({"tasks": [hello("a", &[]), {"key": "b", "plugin": "nope"}]}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_plugin",
    );
    expect(
        "list with an unknown state",
        api.get("/v1/tasks?state=bogus").await,
        bad,
        "bad_request",
    );
    expect(
        "list with an unknown parameter",
        api.get("/v1/tasks?colour=red").await,
        bad,
        "bad_request",
    );
    expect(
        "events of an unknown task",
        api.get("/v1/tasks/t_nope/events").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        "events of an unknown run",
        api.get("/v1/runs/r_nope/events").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        "unknown run",
        api.get("/v1/runs/r_nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        "unknown route",
        api.get("/v1/nothing").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        "unknown route (POST)",
        api.post("/v2/tasks", json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect(
        "wrong method",
        api.call(Method::DELETE, "/v1/tasks", None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );

    // Nothing refused became durable.
    let (status, list) = api.get("/v1/tasks").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["tasks"], json!([]), "{list}");
    let (_, runs) = api.get("/v1/runs").await;
    assert_eq!(runs["runs"], json!([]), "{runs}");

    // A directory under allowed_dirs is fine, and the service still works.
    std::fs::write(api.allowed.join("f.txt"), "one two three\n").unwrap();
    let allowed = api.allowed.to_str().unwrap().to_owned();
    let wc = api
        .submit_id(json!({
            "plugin": "wc",
            "args": ["--json", "/src/f.txt"],
            "dirs": [{"host": allowed, "guest": "/src"}]
        }))
        .await;
    let t = api.wait_end(&wc).await;
    assert_eq!(state(&t), "succeeded", "{t}");
    let counts: Value = serde_json::from_str(t["stdout"]["data"].as_str().unwrap()).unwrap();
    assert_eq!(counts["total"]["words"], 3, "{t}");
    let id = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "still fine", "op": "reverse"}}))
        .await;
    let t = api.wait_end(&id).await;
    assert_eq!(state(&t), "succeeded", "{t}");
    assert_eq!(t["output"]["text"], "enif llits", "{t}");
    api.stop().await;
}

// ---------------------------------------------------------------------
// 11. Metrics, health, description
// ---------------------------------------------------------------------

/// The value of the first sample line `name value` in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_openapi() {
    let api = start().await;
    let (status, _, body) = api
        .send(Request::get("/livez").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"ok");
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready, json!({"ready": true}));

    // Two forced cancels of running tasks and one of a queued task.
    let mut forced = 0;
    for (plugin, input) in [
        ("spin-loop", json!({})),
        ("sleeper", json!({"ms": 600_000})),
    ] {
        let id = api
            .submit_id(json!({"plugin": plugin, "input": input}))
            .await;
        api.wait_state(&id, "running").await;
        let (status, body) = api
            .cancel(&id, json!({"grace_ms": 0, "wait_ms": 10_000}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["task"]["cancel"]["forced"], true, "{body}");
        forced += 1;
    }
    let holder = api
        .submit_id(json!({"plugin": "spin-loop", "input": {}, "locks": ["m"]}))
        .await;
    api.wait_state(&holder, "running").await;
    let queued = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "q"}, "locks": ["m"]}))
        .await;
    let (status, body) = api.cancel(&queued, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .cancel(&holder, json!({"grace_ms": 0, "wait_ms": 10_000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    forced += 1;
    let ok = api
        .submit_id(json!({"plugin": "hello", "input": {"text": "ok"}}))
        .await;
    api.wait_end(&ok).await;

    let (status, headers, body) = api
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{headers:?}"
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    let count = sample(&text, "wasmtask_cancel_latency_seconds_count");
    assert!(count >= f64::from(forced), "{count} < {forced}:\n{text}");
    assert_eq!(
        sample(&text, "wasmtask_tasks{state=\"canceled\"}"),
        4.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "wasmtask_tasks{state=\"succeeded\"}"),
        1.0,
        "{text}"
    );
    assert!(sample(&text, "wasmtask_cancels_total") >= 4.0, "{text}");
    // The writer committed every one of those tasks' writes; its queue and
    // pauses are there (a short test need not have paused it).
    assert!(sample(&text, "wasmtask_db_commits_total") >= 1.0, "{text}");
    assert!(
        sample(&text, "wasmtask_db_write_jobs_total") >= sample(&text, "wasmtask_db_commits_total"),
        "{text}"
    );
    for family in [
        "wasmtask_db_write_queue",
        "wasmtask_db_writer_pauses_total",
        "wasmtask_db_writer_paused_seconds_total",
    ] {
        // `sample` fails the test when the family is missing.
        assert!(sample(&text, family) >= 0.0, "{family}:\n{text}");
    }
    assert!(
        sample(&text, "wasmtask_tasks_submitted_total") >= 5.0,
        "{text}"
    );
    // The ticker's class, as the runtime got it on this machine.
    let realtime = sample(&text, "wasmtask_epoch_ticker_realtime");
    assert!(realtime == 0.0 || realtime == 1.0, "{realtime}:\n{text}");

    // The list filter agrees.
    let (status, list) = api.get("/v1/tasks?state=canceled").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4, "{list}");
    assert!(tasks.iter().all(|t| state(t) == "canceled"), "{list}");

    // The OpenAPI description lists exactly the routes served.
    let (status, headers, body) = api
        .send(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .contains("json")
    );
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let served = [
        "/livez",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
        "/v1/plugins",
        "/v1/tasks",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/tasks/{id}/events",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/abort",
        "/v1/runs/{id}/events",
    ];
    let mut listed: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    listed.sort();
    let mut expected = served.to_vec();
    expected.sort();
    assert_eq!(listed, expected, "OpenAPI paths differ from the router's");
    // And each is a route of the router (not the "no such route" fallback).
    for path in served {
        let uri = path.replace("{id}", "x_nope");
        let (status, body) = api.get(&uri).await;
        assert_ne!(
            body["message"], "no such route",
            "{path} is not served ({status})"
        );
    }
    api.stop().await;
}

// ---------------------------------------------------------------------
// 12. Auth
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_post_but_not_reads() {
    let api = start_with(Some("s3cret")).await;
    let submit =
        || serde_json::to_vec(&json!({"plugin": "hello", "input": {"text": "auth"}})).unwrap();
    let post = |uri: &str, auth: Option<&str>, body: Vec<u8>| {
        let mut b = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::from(body)).unwrap()
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Basic s3cret"),
        Some("Bearer "),
    ] {
        let (status, headers, body) = api.send(post("/v1/tasks", auth, submit())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(parse(&body)["code"], "unauthorized", "{auth:?}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    let (status, body) = api.get("/v1/tasks").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["tasks"],
        json!([]),
        "refused submissions were queued: {body}"
    );

    let (status, _, body) = api
        .send(post("/v1/tasks", Some("Bearer s3cret"), submit()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = parse(&body)["id"].as_str().unwrap().to_owned();
    // Reads need no token.
    let t = api.wait_end(&id).await;
    assert_eq!(state(&t), "succeeded", "{t}");
    let (status, _) = api.get(&format!("/v1/tasks/{id}/events")).await;
    assert_eq!(status, StatusCode::OK);
    for uri in ["/metrics", "/readyz", "/v1/runs", "/v1/plugins"] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
    }
    // Other POSTs are guarded too, before anything else is looked at.
    for uri in [
        format!("/v1/tasks/{id}/cancel"),
        "/v1/runs".to_owned(),
        "/v1/runs/r_x/abort".to_owned(),
        "/v1/plugins?name=x".to_owned(),
    ] {
        let (status, _, body) = api.send(post(&uri, None, b"{}".to_vec())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(parse(&body)["code"], "unauthorized", "{uri}");
    }
    let (status, _, body) = api
        .send(post(
            &format!("/v1/tasks/{id}/cancel"),
            Some("Bearer s3cret"),
            b"{}".to_vec(),
        ))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{}", parse(&body));
    api.stop().await;
}

// ---------------------------------------------------------------------
// 13. Event streams (SSE) in-process
// ---------------------------------------------------------------------

/// One SSE frame: (id, event, data).
fn frames(text: &str) -> Vec<(i64, String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut id = None;
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse::<i64>().unwrap());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str::<Value>(v.trim()).unwrap());
                }
            }
            Some((id?, event?, data?))
        })
        .collect()
}

fn sse_request(uri: &str, last_event_id: Option<i64>) -> Request<Body> {
    let mut b = Request::get(uri).header(header::ACCEPT, "text/event-stream");
    if let Some(id) = last_event_id {
        b = b.header("last-event-id", id.to_string());
    }
    b.body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_after_the_end_and_never_cancel() {
    use futures_util::StreamExt;

    let api = start().await;
    // A live subscription to a spinning task: frames arrive as they happen;
    // dropping the subscription cancels nothing.
    let id = api
        .submit_id(json!({"plugin": "spin-loop", "input": {}}))
        .await;
    let resp = api
        .router
        .clone()
        .oneshot(sse_request(&format!("/v1/tasks/{id}/events"), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.into_body().into_data_stream();
    let mut text = String::new();
    tokio::time::timeout(PATIENCE, async {
        while !text.contains("event: task.started") {
            let chunk = stream.next().await.unwrap().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("task.started on the stream");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = api.task(&id).await;
    assert_eq!(
        state(&t),
        "running",
        "a dropped subscription canceled the task: {t}"
    );

    // A second subscription sees the cancel and ends after task.canceled.
    let resp = api
        .router
        .clone()
        .oneshot(sse_request(&format!("/v1/tasks/{id}/events"), None))
        .await
        .unwrap();
    let body = tokio::spawn(axum::body::to_bytes(resp.into_body(), 16 << 20));
    let (status, _) = api.cancel(&id, json!({"grace_ms": 0})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let body = tokio::time::timeout(PATIENCE, body)
        .await
        .expect("the stream ends after the terminal event")
        .unwrap()
        .unwrap();
    let got = frames(std::str::from_utf8(&body).unwrap());
    let json_events = api.events(&id).await;
    assert_eq!(
        got.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(),
        json_events
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        "the stream and the JSON route disagree"
    );
    assert_eq!(got.last().unwrap().1, "task.canceled");
    for (seq, event, data) in &got {
        assert_eq!(data["seq"], *seq);
        assert_eq!(data["kind"], event.as_str());
    }

    // Resuming past an event yields exactly what follows, then ends.
    let resume_at = got[1].0;
    let (status, _, body) = api
        .send(sse_request(
            &format!("/v1/tasks/{id}/events"),
            Some(resume_at),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let rest = frames(std::str::from_utf8(&body).unwrap());
    assert_eq!(rest, got[2..].to_vec());

    // A run's stream ends after run.finished.
    let view = api
        .submit_run(json!({"tasks": [{"key": "a", "plugin": "hello", "input": {"text": "a"}}]}))
        .await;
    let run_id = view["run"]["id"].as_str().unwrap().to_owned();
    let resp = api
        .router
        .clone()
        .oneshot(sse_request(&format!("/v1/runs/{run_id}/events"), None))
        .await
        .unwrap();
    let body = tokio::time::timeout(PATIENCE, axum::body::to_bytes(resp.into_body(), 16 << 20))
        .await
        .expect("the run stream ends")
        .unwrap();
    let got = frames(std::str::from_utf8(&body).unwrap());
    assert_eq!(got.first().unwrap().1, "run.created");
    assert_eq!(got.last().unwrap().1, "run.finished");
    api.stop().await;
}
