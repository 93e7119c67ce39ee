//! The operator dashboard.
//!
//! Handler tests (the router in-process, no socket): every page and
//! fragment answers HTML with its security headers; bad queries and unknown
//! ids get clear 400/404 pages; guest text (`<script>` in stdout, logs,
//! output, errors, cancel reasons, run names) is shown as text; paging walks
//! older and newer pages; the trail fragment pages events; `/ui/events`
//! signals commits; an undelivered cancel is shown.
//!
//! End-to-end tests drive the real page of a real `wasmtask serve` in
//! headless Chromium (see `browser.rs`): a running task appears live, is
//! canceled with a reason from its page (through the token prompt) and
//! becomes `canceled` without a reload; a run is aborted from its page; a
//! finished task's Cancel is disabled and a stale click gets the 409
//! message; guest `<script>` never runs; no console errors; screenshots at a
//! laptop and a narrow width go to `<target>/test-artifacts/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wasmtask::model::{EventKind, NewEvent};
use wasmtask::service::Service;

use crate::browser::{Browser, artifacts_dir};
use crate::server_support::{Server, fixtures_config};

const PATIENCE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------
// In-process harness
// ---------------------------------------------------------------------

struct Dash {
    router: Router,
    svc: Service,
    _dir: tempfile::TempDir,
}

/// The API tests' service and router over a fresh database.
async fn start() -> Dash {
    let api = crate::api::start().await;
    Dash {
        router: api.router,
        svc: api.svc,
        _dir: api.dir,
    }
}

impl Dash {
    async fn get(&self, uri: &str) -> (StatusCode, HeaderMap, String) {
        let resp = self
            .router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    /// GET that must answer 200 HTML; returns the body.
    async fn page(&self, uri: &str) -> String {
        let (status, headers, body) = self.get(uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{uri}"
        );
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{uri}: {csp}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{uri}");
        body
    }

    async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .router
            .clone()
            .oneshot(
                Request::post(uri)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn submit(&self, body: Value) -> String {
        let (status, t) = self.post("/v1/tasks", body.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}: {t}");
        t["id"].as_str().unwrap().to_owned()
    }

    async fn wait_state(&self, id: &str, pred: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = serde_json::to_value(self.svc.get_task(id).await.unwrap()).unwrap();
            if pred(t["state"].as_str().unwrap()) {
                return t;
            }
            assert!(Instant::now() < deadline, "task {id} stuck: {t}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_end(&self, id: &str) -> Value {
        self.wait_state(id, |s| {
            ["succeeded", "failed", "timed_out", "canceled"].contains(&s)
        })
        .await
    }
}

/// The `<script` tags of a page: only the dashboard's own may be there.
fn assert_only_own_scripts(uri: &str, body: &str) {
    let lower = body.to_ascii_lowercase();
    let scripts: Vec<&str> = lower
        .match_indices("<script")
        .map(|(i, _)| &body[i..(i + 40).min(body.len())])
        .collect();
    assert!(
        scripts
            .iter()
            .all(|s| s.starts_with("<script src=\"/ui/app.js?v=")),
        "{uri} has foreign script tags: {scripts:?}"
    );
    assert!(!lower.contains("<img"), "{uri} has unescaped guest markup");
}

// ---------------------------------------------------------------------
// Handler tests
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_fragment_answers_html() {
    let d = start().await;
    let done = d
        .submit(json!({"plugin": "hello", "input": {"text": "dashboard"}}))
        .await;
    d.wait_end(&done).await;
    let (status, run) = d
        .post(
            "/v1/runs",
            json!({"name": "nightly", "tasks": [
                {"key": "a", "plugin": "sleeper", "input": {"ms": 600_000}},
                {"key": "b", "plugin": "hello", "input": {"text": "x"}, "needs": ["a"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["run"]["id"].as_str().unwrap().to_owned();
    let a = run["tasks"][0]["id"].as_str().unwrap().to_owned();
    d.wait_state(&a, |s| s == "running").await;

    // The overview: counts, the running task, the run, recent tasks.
    let o = d.page("/").await;
    assert!(o.contains("data-stream=\"/ui/events\""), "{o}");
    assert!(o.contains("data-count=\"succeeded\">1<"), "{o}");
    assert!(o.contains("data-count=\"running\">1<"), "{o}");
    assert!(
        o.contains(&format!("data-task=\"{a}\" data-state=\"running\"")),
        "{o}"
    );
    assert!(o.contains(&format!("href=\"/runs/{run_id}\"")), "{o}");
    assert!(o.contains("nightly"), "{o}");
    let f = d.page("/ui/fragments/overview").await;
    assert!(
        f.contains("data-count=\"running\">1<") && !f.contains("<html"),
        "{f}"
    );

    // The task list and its filters.
    let l = d.page("/tasks").await;
    for id in [&done, &a] {
        assert!(l.contains(&format!("data-task=\"{id}\"")), "{l}");
    }
    assert!(l.contains("data-fragment=\"/ui/fragments/tasks\""), "{l}");
    let l = d.page("/tasks?state=succeeded&plugin=hello&limit=20").await;
    assert!(l.contains(&format!("data-task=\"{done}\"")), "{l}");
    assert!(!l.contains(&format!("data-task=\"{a}\"")), "{l}");
    assert!(l.contains("<option value=\"succeeded\" selected>"), "{l}");
    assert!(
        l.contains(
            "data-fragment=\"/ui/fragments/tasks?state=succeeded&amp;plugin=hello&amp;limit=20\""
        ),
        "{l}"
    );
    let l = d.page(&format!("/ui/fragments/tasks?run={run_id}")).await;
    assert!(l.contains(&format!("data-task=\"{a}\"")), "{l}");
    assert!(!l.contains(&format!("data-task=\"{done}\"")), "{l}");

    // A task: record, actions, trail, live stream.
    let t = d.page(&format!("/tasks/{done}")).await;
    assert!(
        t.contains("data-state=\"succeeded\" data-terminal=\"true\""),
        "{t}"
    );
    assert!(
        t.contains("id=\"cancel-btn\" class=\"danger\" disabled"),
        "{t}"
    );
    assert!(t.contains("data-kind=\"task.succeeded\""), "{t}");
    assert!(
        !t.contains("data-stream="),
        "a finished task has nothing to follow: {t}"
    );
    let t = d.page(&format!("/tasks/{a}")).await;
    assert!(
        t.contains("data-state=\"running\" data-terminal=\"false\""),
        "{t}"
    );
    assert!(t.contains("id=\"cancel-btn\" class=\"danger\">"), "{t}");
    assert!(
        t.contains(&format!("data-stream=\"/v1/tasks/{a}/events?after=")),
        "{t}"
    );
    let f = d.page(&format!("/ui/fragments/tasks/{a}")).await;
    assert!(
        f.starts_with("<div class=\"task\" data-state=\"running\""),
        "{f}"
    );

    // A run: record, tasks by key, abort form, trail with task ids.
    let r = d.page(&format!("/runs/{run_id}")).await;
    assert!(r.contains("id=\"abort-btn\" class=\"danger\">"), "{r}");
    assert!(r.contains("data-kind=\"run.created\""), "{r}");
    assert!(
        r.contains(&format!("data-stream=\"/v1/runs/{run_id}/events?after=")),
        "{r}"
    );
    assert!(r.contains("<td>a</td>") && r.contains("<td>b</td>"), "{r}");
    let f = d.page(&format!("/ui/fragments/runs/{run_id}")).await;
    assert!(
        f.starts_with("<div class=\"run\" data-state=\"running\""),
        "{f}"
    );
    let rows = d
        .page(&format!("/ui/fragments/runs/{run_id}/events?after=0"))
        .await;
    assert!(rows.contains("data-kind=\"run.created\""), "{rows}");
    assert!(
        rows.contains(&format!("href=\"/tasks/{a}\"")),
        "rows name their task: {rows}"
    );
    let runs = d.page("/runs").await;
    assert!(runs.contains(&format!("data-run=\"{run_id}\"")), "{runs}");
    let runs = d.page("/ui/fragments/runs?limit=5").await;
    assert!(runs.contains(&format!("data-run=\"{run_id}\"")), "{runs}");

    // Aborting it ends the live page's stream.
    let (status, _) = d
        .post(
            &format!("/v1/runs/{run_id}/abort"),
            json!({"wait_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let r = d.page(&format!("/runs/{run_id}")).await;
    assert!(
        r.contains("id=\"abort-btn\" class=\"danger\" disabled"),
        "{r}"
    );
    assert!(r.contains("class=\"abort-record\""), "{r}");

    // Assets: right types, cached for good only under the current version.
    for (path, ty) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let (status, headers, body) = d.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], ty, "{path}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        assert!(!body.is_empty());
        let versioned = o
            .split(&format!("{path}?v="))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("{path} is not linked from the page"));
        let (_, headers, _) = d.get(&format!("{path}?v={versioned}")).await;
        assert!(
            headers[header::CACHE_CONTROL]
                .to_str()
                .unwrap()
                .contains("immutable"),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_unknown_ids_get_clear_pages() {
    let d = start().await;
    for (uri, status, says) in [
        ("/tasks/t_nope", StatusCode::NOT_FOUND, "no task t_nope"),
        ("/runs/r_nope", StatusCode::NOT_FOUND, "no run r_nope"),
        (
            "/tasks?state=sleeping",
            StatusCode::BAD_REQUEST,
            "unknown state `sleeping`",
        ),
        (
            "/tasks?limit=0",
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and",
        ),
        (
            "/tasks?limit=many",
            StatusCode::BAD_REQUEST,
            "invalid query",
        ),
        (
            "/tasks?color=red",
            StatusCode::BAD_REQUEST,
            "unknown field `color`",
        ),
        (
            "/tasks?cursor=t_nope",
            StatusCode::BAD_REQUEST,
            "bad cursor",
        ),
        (
            "/tasks?cursor=a&before=b",
            StatusCode::BAD_REQUEST,
            "either cursor or before",
        ),
        (
            "/runs?limit=0",
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and",
        ),
        (
            "/ui/fragments/tasks/t_nope",
            StatusCode::NOT_FOUND,
            "no task t_nope",
        ),
        (
            "/ui/fragments/tasks/t_nope/events",
            StatusCode::NOT_FOUND,
            "no task t_nope",
        ),
        (
            "/ui/fragments/runs/r_nope",
            StatusCode::NOT_FOUND,
            "no run r_nope",
        ),
        (
            "/ui/fragments/runs/r_nope/events",
            StatusCode::NOT_FOUND,
            "no run r_nope",
        ),
        (
            "/ui/fragments/tasks?state=x",
            StatusCode::BAD_REQUEST,
            "unknown state `x`",
        ),
        (
            "/ui/fragments/runs?cursor=r_nope",
            StatusCode::BAD_REQUEST,
            "bad cursor",
        ),
    ] {
        let (got, headers, body) = d.get(uri).await;
        assert_eq!(got, status, "{uri}: {body}");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{uri}"
        );
        assert!(
            body.contains(&says.replace('`', "&#96;")) || body.contains(says),
            "{uri}: {body}"
        );
        if !uri.starts_with("/ui/") {
            assert!(body.starts_with("<!doctype html>"), "{uri} is a whole page");
        }
    }
    // A hostile id is echoed as text.
    let (status, _, body) = d.get("/tasks/%3Cscript%3Ealert(1)%3C%2Fscript%3E").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("no task &lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert_only_own_scripts("404", &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_text_is_shown_as_text_everywhere() {
    let d = start().await;
    let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    // Output (and the input in the spec).
    let out = d
        .submit(json!({"plugin": "hello", "input": {"text": evil, "op": "lower"}}))
        .await;
    // stdout, and the stdout line events of the trail.
    let cmd = d
        .submit(json!({"plugin": "exit-with", "args": [evil]}))
        .await;
    // An error message naming the guest's input.
    let err = d
        .submit(json!({"plugin": "hello", "input": {"text": "x", "op": evil}}))
        .await;
    // A log line and a cancel reason (the cooperative task logs the reason).
    let coop = d
        .submit(json!({"plugin": "cooperative", "input": {"steps": 1_000_000, "work": 2_000_000}}))
        .await;
    d.wait_state(&coop, |s| s == "running").await;
    let (status, body) = d
        .post(
            &format!("/v1/tasks/{coop}/cancel"),
            json!({"reason": evil, "grace_ms": 30_000, "wait_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for id in [&out, &cmd, &err] {
        d.wait_end(id).await;
    }
    let (status, run) = d
        .post(
            "/v1/runs",
            json!({"name": evil, "tasks": [{"plugin": "hello", "input": {"text": "x"}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let run_id = run["run"]["id"].as_str().unwrap();

    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;";
    let pages = [
        (format!("/tasks/{out}"), "output"),
        (format!("/tasks/{cmd}"), "stdout"),
        (
            format!("/ui/fragments/tasks/{cmd}/events"),
            "stdout line event",
        ),
        (format!("/tasks/{err}"), "error"),
        (format!("/tasks/{coop}"), "cancel reason and log"),
        ("/".to_owned(), "overview notes"),
        ("/tasks".to_owned(), "list notes"),
        (format!("/runs/{run_id}"), "run name"),
        ("/runs".to_owned(), "run list"),
    ];
    for (uri, what) in &pages {
        let body = d.page(uri).await;
        assert_only_own_scripts(uri, &body);
        assert!(
            body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{uri}: the {what} is not shown as text: {body}"
        );
    }
    let coop_page = d.page(&format!("/tasks/{coop}")).await;
    assert!(
        coop_page.contains(&format!("<dd class=\"reason\">{escaped}</dd>")),
        "{coop_page}"
    );
    assert!(
        coop_page.contains(&format!("[warn] cancel requested: {escaped}")),
        "the guest's log line: {coop_page}"
    );
    let cmd_page = d.page(&format!("/tasks/{cmd}")).await;
    assert!(
        cmd_page.contains(&format!("<pre class=\"stdout\">arg: {escaped}")),
        "{cmd_page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_pages_walk_older_and_newer() {
    let d = start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            d.submit(json!({"plugin": "hello", "input": {"text": format!("page {i}")}}))
                .await,
        );
    }
    for id in &ids {
        d.wait_end(id).await;
    }
    // Newest first: 4 3 | 2 1 | 0.
    let rows = |body: &str| -> Vec<String> {
        body.split("<tr data-task=\"")
            .skip(1)
            .map(|s| s.split('"').next().unwrap().to_owned())
            .collect()
    };
    let p1 = d.page("/ui/fragments/tasks?limit=2").await;
    assert_eq!(rows(&p1), [ids[4].clone(), ids[3].clone()]);
    assert!(
        !p1.contains("rel=\"prev\""),
        "the first page has no newer page: {p1}"
    );
    assert!(p1.contains(&format!("cursor={}", ids[3])), "{p1}");
    let p2 = d
        .page(&format!("/ui/fragments/tasks?limit=2&cursor={}", ids[3]))
        .await;
    assert_eq!(rows(&p2), [ids[2].clone(), ids[1].clone()]);
    assert!(p2.contains(&format!("before={}", ids[2])), "{p2}");
    let p3 = d
        .page(&format!("/ui/fragments/tasks?limit=2&cursor={}", ids[1]))
        .await;
    assert_eq!(rows(&p3), [ids[0].clone()]);
    assert!(
        !p3.contains("rel=\"next\""),
        "the last page has no older page: {p3}"
    );
    // Back: newer than 0 is 2 1; newer than 2 reaches the newest page.
    let back = d
        .page(&format!("/ui/fragments/tasks?limit=2&before={}", ids[0]))
        .await;
    assert_eq!(rows(&back), [ids[2].clone(), ids[1].clone()]);
    let back = d
        .page(&format!("/ui/fragments/tasks?limit=2&before={}", ids[2]))
        .await;
    assert_eq!(rows(&back), [ids[4].clone(), ids[3].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trail_fragments_page_events_after_a_seq() {
    let d = start().await;
    let id = d
        .submit(json!({"plugin": "cooperative", "input": {"steps": 20, "work": 1000}}))
        .await;
    d.wait_end(&id).await;
    let events = d.svc.db().events(Some(&id), 0, 1000).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::TaskProgress), "{kinds:?}");
    let last = events.last().unwrap().seq;
    let (status, headers, all) = d.get(&format!("/ui/fragments/tasks/{id}/events")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-wasmtask-last-seq"], last.to_string().as_str());
    assert_eq!(headers["x-wasmtask-more"], "false");
    // 20 progress reports and checkpoints fold into one row.
    assert_eq!(
        all.matches("data-kind=\"task.progress\"").count(),
        1,
        "{all}"
    );
    assert!(
        all.contains("(20 progress report(s), 20 checkpoint(s))"),
        "{all}"
    );
    assert!(all.contains("data-kind=\"task.succeeded\""), "{all}");
    // After the last seq: nothing, and the seq stays.
    let (_, headers, none) = d
        .get(&format!("/ui/fragments/tasks/{id}/events?after={last}"))
        .await;
    assert_eq!(none, "");
    assert_eq!(headers["x-wasmtask-last-seq"], last.to_string().as_str());
    // From the middle: only the later rows.
    let mid = events[events.len() - 2].seq;
    let (_, _, tail) = d
        .get(&format!("/ui/fragments/tasks/{id}/events?after={mid}"))
        .await;
    assert_eq!(tail.matches("<tr ").count(), 1, "{tail}");
    let (status, _, body) = d
        .get(&format!("/ui/fragments/tasks/{id}/events?after=soon"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_stream_signals_each_commit() {
    let d = start().await;
    let resp = d
        .router
        .clone()
        .oneshot(Request::get("/ui/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body().into_data_stream();
    let mut text = String::new();
    // The current seq at once.
    let deadline = Instant::now() + PATIENCE;
    let first_seq = loop {
        let chunk = tokio::time::timeout(PATIENCE, body.next()).await.unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        if let Some(seq) = change_seqs(&text).first() {
            break *seq;
        }
        assert!(Instant::now() < deadline, "no first change: {text}");
    };
    let id = d
        .submit(json!({"plugin": "hello", "input": {"text": "x"}}))
        .await;
    d.wait_end(&id).await;
    let after = loop {
        let chunk = tokio::time::timeout(PATIENCE, body.next()).await.unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        if let Some(seq) = change_seqs(&text).into_iter().find(|s| *s > first_seq) {
            break seq;
        }
    };
    assert!(after > first_seq, "{text}");
}

fn change_seqs(text: &str) -> Vec<i64> {
    text.split("event: change\ndata: ")
        .skip(1)
        .filter_map(|s| s.lines().next()?.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undelivered_cancel_is_shown_until_the_task_ends() {
    let d = start().await;
    let id = d
        .submit(json!({"plugin": "cooperative",
            "input": {"steps": 1_000_000, "work": 2_000_000, "ignore_cancel": true}}))
        .await;
    d.wait_state(&id, |s| s == "running").await;
    let (status, _) = d
        .post(
            &format!("/v1/tasks/{id}/cancel"),
            json!({"grace_ms": 600_000}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let f = d.page(&format!("/ui/fragments/tasks/{id}")).await;
    assert!(f.contains("data-state=\"cancel_requested\""), "{f}");
    assert!(!f.contains("id=\"cancel-failed\""), "{f}");
    // What the service records when a cancel cannot reach the task.
    d.svc
        .db()
        .append_events(vec![NewEvent::task(
            &id,
            EventKind::TaskCancelFailed,
            json!({"reason": "the task is not running in this server process", "actor": "api"}),
        )])
        .await
        .unwrap();
    let f = d.page(&format!("/ui/fragments/tasks/{id}")).await;
    assert!(
        f.contains("id=\"cancel-failed\">The cancel could not be delivered: the task is not running in this server process"),
        "{f}"
    );
    let page = d.page(&format!("/tasks/{id}")).await;
    assert!(
        page.contains("without waiting for the grace to end\">Force stop now"),
        "force is offered during the grace: {page}"
    );
    // A new request supersedes the failure; the end clears it.
    let (status, body) = d
        .post(
            &format!("/v1/tasks/{id}/cancel"),
            json!({"grace_ms": 0, "wait_ms": 30_000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let f = d.page(&format!("/ui/fragments/tasks/{id}")).await;
    assert!(
        f.contains("data-state=\"canceled\"") && !f.contains("cancel-failed"),
        "{f}"
    );
}

// ---------------------------------------------------------------------
// In a real browser
// ---------------------------------------------------------------------

const LAPTOP: (u32, u32) = (1280, 900);
const NARROW: (u32, u32) = (420, 900);

fn shot(b: &Browser, name: &str) -> PathBuf {
    let path = artifacts_dir().join(name);
    b.screenshot(&path);
    path
}

/// Nothing is wider than the window (no sideways scrolling of the page).
fn assert_fits(b: &Browser, what: &str) {
    let v = b.js(
        "return [document.documentElement.scrollWidth, window.innerWidth];",
        json!([]),
    );
    let (scroll, inner) = (v[0].as_i64().unwrap(), v[1].as_i64().unwrap());
    assert!(
        scroll <= inner,
        "{what}: the page is {scroll}px wide in a {inner}px window"
    );
}

#[test]
fn browser_cancels_a_running_task_live_with_a_token() {
    let token = "dash-token-1";
    let s = Server::start(&fixtures_config(""), Some(token));
    let b = Browser::start(LAPTOP.0, LAPTOP.1);
    b.goto(&s.url("/"));
    b.wait_js(
        "the live stream connected",
        "return document.getElementById('live-status').dataset.state === 'live';",
        json!([]),
    );
    // A marker that a reload would lose.
    b.js("window.__noReload = 42;", json!([]));

    let t = s.submit(json!({"plugin": "cooperative",
        "input": {"steps": 1_000_000, "work": 2_000_000}}));
    let id = t["id"].as_str().unwrap().to_owned();
    s.wait_state(&id, "running", PATIENCE);
    // It appears on the overview by itself.
    let row = format!("#live tr[data-task=\"{id}\"][data-state=\"running\"]");
    b.find(&row);
    b.wait_js(
        "the running count",
        "return document.querySelector('[data-count=running]').textContent === '1';",
        json!([]),
    );
    assert_eq!(b.js("return window.__noReload;", json!([])), 42);
    shot(&b, "dashboard-overview.png");

    b.click(&format!("{row} a.id"));
    b.find(&format!("#cancel-form[data-task=\"{id}\"]"));
    b.wait_js(
        "live progress",
        "const m = document.querySelector('#live .task .pmsg'); return m && m.textContent.startsWith('step ');",
        json!([]),
    );
    b.js("window.__noReload = 43;", json!([]));
    let reason = "wrong input <b>operator</b>";
    b.type_into("#cancel-reason", reason);
    b.type_into("#cancel-grace", "30");
    b.click("#cancel-btn");
    // The server has a token: the page asks for it. A wrong one is refused
    // (401) and asked for again; nothing was canceled.
    b.find("#token-form:not([hidden])");
    b.type_into("#token-input", "not-the-token");
    b.click("#token-form button[type=submit]");
    b.wait_js(
        "the refused token",
        "return document.getElementById('action-result').textContent.includes('401') && \
         !document.getElementById('token-form').hidden;",
        json!([]),
    );
    assert_eq!(s.task(&id)["state"], "running");
    b.type_into("#token-input", token);
    b.click("#token-form button[type=submit]");
    b.wait_js(
        "the task canceled",
        "return document.querySelector('#live .task[data-state=canceled]') !== null;",
        json!([]),
    );
    assert_eq!(
        b.js("return window.__noReload;", json!([])),
        43,
        "the page was reloaded"
    );
    assert_eq!(b.text("#cancel-record .reason"), reason);
    assert_eq!(b.text("#cancel-record .actor"), "api");
    assert!(
        b.text("#cancel-record .how").starts_with("acknowledged"),
        "{}",
        b.text("#cancel-record")
    );
    assert!(!b.text("#cancel-record .latency").contains('—'));
    b.wait_js(
        "the outcome message",
        "return document.getElementById('action-result').textContent.includes('canceled');",
        json!([]),
    );
    b.wait_js(
        "the end in the trail",
        "return document.querySelector('#trail tr[data-kind=\"task.canceled\"]') !== null;",
        json!([]),
    );
    assert_eq!(
        b.js(
            "return document.getElementById('cancel-btn').disabled;",
            json!([])
        ),
        true
    );
    assert_eq!(
        b.js(
            "return document.getElementById('live-status').dataset.state;",
            json!([])
        ),
        "ended"
    );
    // Partial output (the guest's last checkpoint) and its acknowledgement.
    assert!(
        b.text("#live pre.output").contains("\"partial\": true"),
        "{}",
        b.text("#live")
    );
    assert_eq!(
        b.js(
            "return sessionStorage.getItem('wasmtask.token');",
            json!([])
        ),
        token
    );
    let record = s.task(&id);
    assert_eq!(record["state"], "canceled");
    assert_eq!(record["cancel"]["reason"], reason);
    shot(&b, "dashboard-task.png");

    b.resize(NARROW.0, NARROW.1);
    b.wait_js(
        "the narrow layout",
        "return window.innerWidth <= 420;",
        json!([]),
    );
    assert_fits(&b, "task page, narrow");
    shot(&b, "dashboard-task-narrow.png");
    // The refused token is the one failed load the page shows.
    b.assert_console_errors(&["401"]);
}

#[test]
fn browser_aborts_a_run_and_refuses_finished_tasks() {
    let s = Server::start(&fixtures_config(""), None);
    let b = Browser::start(LAPTOP.0, LAPTOP.1);
    let evil = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">";
    let (status, run) = s.post(
        "/v1/runs",
        &json!({"name": "nightly", "tasks": [
            {"key": "spin", "plugin": "spin-loop"},
            {"key": "sleep", "plugin": "sleeper", "input": {"ms": 600_000}},
            {"key": "after", "plugin": "hello", "input": {"text": "x"}, "needs": ["sleep"]}]}),
    );
    assert_eq!(status, 201, "{run}");
    let run_id = run["run"]["id"].as_str().unwrap().to_owned();
    for t in run["tasks"].as_array().unwrap().iter().take(2) {
        s.wait_state(t["id"].as_str().unwrap(), "running", PATIENCE);
    }
    b.goto(&s.url(&format!("/runs/{run_id}")));
    b.wait_js(
        "the run's stream connected",
        "return document.getElementById('live-status').dataset.state === 'live';",
        json!([]),
    );
    b.js("window.__noReload = 7;", json!([]));
    // A sleeping guest sends no events; its running time still ticks.
    let sleeping = format!(
        "#live tr[data-task=\"{}\"] .elapsed",
        run["tasks"][1]["id"].as_str().unwrap()
    );
    let first = b.text(&sleeping);
    b.wait_js(
        "the running time tick",
        "const e = document.querySelector(arguments[0]); return e && e.textContent !== arguments[1];",
        json!([sleeping, first]),
    );
    b.type_into("#abort-reason", "superseded by a newer build");
    b.click("#abort-btn");
    b.wait_js(
        "the run aborted",
        "return document.querySelector('#live .run[data-state=aborted]') !== null;",
        json!([]),
    );
    assert_eq!(
        b.js("return window.__noReload;", json!([])),
        7,
        "the page was reloaded"
    );
    assert!(
        b.text("#live .abort-record")
            .contains("superseded by a newer build"),
        "{}",
        b.text("#live")
    );
    b.wait_js(
        "every task canceled",
        "const rows = [...document.querySelectorAll('#live tr[data-task]')]; \
         return rows.length === 3 && rows.every(r => r.dataset.state === 'canceled');",
        json!([]),
    );
    b.wait_js(
        "run.finished in the trail",
        "return document.querySelector('#trail tr[data-kind=\"run.finished\"]') !== null;",
        json!([]),
    );
    assert_eq!(
        b.js(
            "return document.getElementById('abort-btn').disabled;",
            json!([])
        ),
        true
    );
    b.wait_js(
        "the outcome message",
        // "Aborted: …" when the abort answered 200 (every task already
        // ended), "The run is now aborted." once a 202's tasks have ended.
        "return document.getElementById('action-result').textContent.toLowerCase().includes('aborted');",
        json!([]),
    );
    shot(&b, "dashboard-run.png");

    // A finished task: Cancel is disabled; guest markup is inert text.
    let out = s.submit(json!({"plugin": "hello", "input": {"text": evil, "op": "lower"}}));
    let cmd = s.submit(json!({"plugin": "exit-with", "args": [evil]}));
    let out_id = out["id"].as_str().unwrap().to_owned();
    let cmd_id = cmd["id"].as_str().unwrap().to_owned();
    s.wait_state(&out_id, "succeeded", PATIENCE);
    s.wait_state(&cmd_id, "succeeded", PATIENCE);
    b.goto(&s.url(&format!("/tasks/{cmd_id}")));
    b.find("#live .task[data-state=succeeded]");
    assert!(
        b.text("#live pre.stdout").contains(&format!("arg: {evil}")),
        "{}",
        b.text("#live")
    );
    assert!(
        b.text("#trail").contains(evil),
        "stdout lines in the trail: {}",
        b.text("#trail")
    );
    b.goto(&s.url(&format!("/tasks/{out_id}")));
    b.find("#live .task[data-state=succeeded]");
    assert!(
        b.text("#live pre.output")
            .contains("<script>window.__xss = 1</script>")
    );
    assert_eq!(
        b.js(
            "return document.getElementById('cancel-btn').disabled;",
            json!([])
        ),
        true
    );
    assert_eq!(
        b.js(
            "return document.getElementById('cancel-reason').disabled;",
            json!([])
        ),
        true
    );
    // Refresh renders the record again (the marked element is replaced).
    b.js(
        "document.querySelector('#live .task').dataset.old = 'yes';",
        json!([]),
    );
    b.click("#refresh");
    b.wait_js(
        "a refreshed record",
        "const t = document.querySelector('#live .task'); return t && !t.dataset.old;",
        json!([]),
    );
    assert_eq!(
        b.js("return window.__xss === undefined;", json!([])),
        true,
        "guest script ran"
    );
    assert_eq!(
        b.js(
            "return document.querySelectorAll('main script, main img').length;",
            json!([])
        ),
        0
    );
    // A click that raced the task's end (a page showing it still running)
    // is refused by the server and says so.
    b.js(
        "document.getElementById('cancel-btn').disabled = false;",
        json!([]),
    );
    b.click("#cancel-btn");
    b.wait_js(
        "the refusal",
        "return document.getElementById('action-result').textContent.includes('409');",
        json!([]),
    );
    let msg = b.text("#action-result");
    assert!(msg.contains("already finished as succeeded"), "{msg}");
    assert_eq!(s.task(&out_id)["state"], "succeeded");
    // The task list's filter form is a URL; its rows match it.
    b.goto(&s.url("/tasks"));
    b.js(
        "const sel = document.querySelector('form.filters select[name=state]'); \
         sel.value = 'canceled';",
        json!([]),
    );
    b.click("form.filters button[type=submit]");
    b.wait_js(
        "the filtered list",
        "return location.search.includes('state=canceled') && \
         document.querySelectorAll('#live tr[data-task]').length === 3 && \
         [...document.querySelectorAll('#live tr[data-task]')].every(r => r.dataset.state === 'canceled');",
        json!([]),
    );
    b.goto(&s.url("/runs"));
    b.find(&format!("#live tr[data-run=\"{run_id}\"]"));
    // The overview at both widths, with the run, the tasks and their states.
    b.goto(&s.url("/"));
    b.find(&format!(
        "#live tr[data-run=\"{run_id}\"][data-state=\"aborted\"]"
    ));
    assert_fits(&b, "overview, laptop");
    shot(&b, "dashboard.png");
    b.resize(NARROW.0, NARROW.1);
    b.wait_js(
        "the narrow layout",
        "return window.innerWidth <= 420;",
        json!([]),
    );
    assert_fits(&b, "overview, narrow");
    shot(&b, "dashboard-narrow.png");
    // The refused POST is the one failed load the page shows.
    b.assert_console_errors(&["409"]);
}
