//! The operator dashboard: HTML pages served by `wasmtask serve` at `/`,
//! built into the binary (no CDN, no network, no build step).
//!
//! Model: the server renders every page and every fragment of a page (in
//! `render.rs`, escaping in one place, `html.rs`); one small embedded script
//! (`dashboard/app.js`, plain JS) keeps a page live by listening to an SSE
//! stream and swapping in freshly rendered fragments. Every view is a URL:
//!
//! | page | fragment (the live part) | stream that triggers a refresh |
//! |---|---|---|
//! | `/` overview | `/ui/fragments/overview` | `/ui/events` |
//! | `/tasks?state=&plugin=&run=&limit=&cursor=\|before=` | `/ui/fragments/tasks?…` | `/ui/events` |
//! | `/tasks/{id}` | `/ui/fragments/tasks/{id}`, trail rows `…/events?after=` | `/v1/tasks/{id}/events` |
//! | `/runs?limit=&cursor=` | `/ui/fragments/runs?…` | `/ui/events` |
//! | `/runs/{id}` | `/ui/fragments/runs/{id}`, trail rows `…/events?after=` | `/v1/runs/{id}/events` |
//!
//! Why this shape: the JSON API already has the records and the event
//! streams; rendering HTML on the server keeps the escaping of untrusted
//! guest text in Rust, in one function, and the script small enough to read
//! in one sitting (it never builds markup from data). `EventSource` cannot
//! send headers, which is fine: every stream and page is a `GET`, and reads
//! are open (docs/api.md). Actions (cancel, abort) are `POST`s to the
//! existing `/v1` routes with the bearer token the page asks for once and
//! keeps in `sessionStorage` (that tab only); a token in a header is never
//! sent by the browser on its own, so another site cannot forge an action.
//!
//! `/ui/events` is the one stream added for the dashboard: `change` events
//! carrying the highest committed event seq, at most a few a second
//! (coalesced, so a flood of guest events costs a few page refreshes), until
//! shutdown. Pages send a strict Content-Security-Policy (scripts and styles
//! from this server only, no inline code), so even a bug in escaping could
//! not run injected script.

mod html;
mod render;

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::db::{DEFAULT_TASKS_PAGE, MAX_TASKS_PAGE, TaskFilter};
use crate::model::{EventKind, TaskState, now_millis};
use crate::service::{Service, ServiceError};
use render::{Filters, Page};

const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");
const FAVICON_SVG: &str = include_str!("dashboard/favicon.svg");

/// Events read for a trail at once (the page loads the first ones; live
/// refreshes read the rest in pages of this size).
const TRAIL_PAGE: usize = 500;
/// Least time between two `change` events of `/ui/events`.
const CHANGE_INTERVAL: Duration = Duration::from_millis(300);
/// Active tasks shown on the overview, per state.
const OVERVIEW_ACTIVE: usize = 20;
const OVERVIEW_RUNS: usize = 8;
const OVERVIEW_RECENT: usize = 15;
const RUNS_PAGE: usize = 50;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct Dash {
    svc: Service,
    /// The server requires a token for actions.
    auth: bool,
}

/// The dashboard's routes (all `GET`), for merging into the API router.
pub fn router<S>(svc: Service, auth: bool) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(overview_page))
        .route("/tasks", get(tasks_page))
        .route("/tasks/{id}", get(task_page))
        .route("/runs", get(runs_page))
        .route("/runs/{id}", get(run_page))
        .route("/ui/fragments/overview", get(overview_fragment))
        .route("/ui/fragments/tasks", get(tasks_fragment))
        .route("/ui/fragments/tasks/{id}", get(task_fragment))
        .route("/ui/fragments/tasks/{id}/events", get(task_trail_fragment))
        .route("/ui/fragments/runs", get(runs_fragment))
        .route("/ui/fragments/runs/{id}", get(run_fragment))
        .route("/ui/fragments/runs/{id}/events", get(run_trail_fragment))
        .route("/ui/events", get(changes))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
        .route("/ui/favicon.svg", get(favicon))
        .with_state(Dash { svc, auth })
}

/// A short hash of the embedded assets: their URLs carry it, so a browser
/// may cache them for good and still never runs a stale script.
fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut h = Sha256::new();
        for a in [APP_JS, STYLE_CSS, FAVICON_SVG] {
            h.update(a.as_bytes());
        }
        h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

// ---------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------

fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(h);
    r
}

/// A failure, as a page or as a fragment.
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<ServiceError> for Failure {
    fn from(e: ServiceError) -> Failure {
        let status = match &e {
            ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
            ServiceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "dashboard: cannot read");
        }
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

impl From<crate::db::DbError> for Failure {
    fn from(e: crate::db::DbError) -> Failure {
        Failure::from(ServiceError::from(e))
    }
}

fn page_failure(d: &Dash, f: Failure) -> Response {
    let title = f.status.canonical_reason().unwrap_or("error");
    let body = render::error_body(f.status.as_u16(), &f.message);
    html(f.status, render::layout(&plain_page(d, title, ""), &body))
}

fn fragment_failure(f: Failure) -> Response {
    let mut h = html::Html::new();
    h.raw("<p class=\"error\" role=\"alert\">")
        .text(&f.message)
        .raw("</p>");
    html(f.status, h.into_string())
}

fn plain_page<'a>(d: &Dash, title: &'a str, nav: &'a str) -> Page<'a> {
    Page {
        title,
        nav,
        auth: d.auth,
        stream: None,
        stream_end: &[],
        version: version(),
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Failure> {
    q.map(|Query(v)| v)
        .map_err(|e| Failure::bad(format!("invalid query: {}", e.body_text())))
}

// ---------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------

async fn overview_data(d: &Dash) -> Result<render::Overview, Failure> {
    let db = d.svc.db();
    let counts = db.count_tasks_by_state().await?;
    let mut active = Vec::new();
    let mut active_more = false;
    for state in [TaskState::CancelRequested, TaskState::Running] {
        let tasks = d
            .svc
            .list_tasks(TaskFilter {
                state: Some(state),
                limit: Some(OVERVIEW_ACTIVE),
                ..TaskFilter::default()
            })
            .await?;
        active_more |= tasks.len() >= OVERVIEW_ACTIVE;
        active.extend(tasks);
    }
    active.sort_by(|a, b| b.queued_at.cmp(&a.queued_at).then(b.id.cmp(&a.id)));
    let runs = d.svc.list_runs(Some(OVERVIEW_RUNS), None).await?;
    let recent = d
        .svc
        .list_tasks(TaskFilter {
            limit: Some(OVERVIEW_RECENT),
            ..TaskFilter::default()
        })
        .await?;
    Ok(render::Overview {
        counts,
        running_now: d.svc.running(),
        waiting_for_cpu: d.svc.waiting_for_cpu(),
        active,
        active_more,
        runs,
        recent,
        now: now_millis(),
    })
}

async fn overview_page(State(d): State<Dash>) -> Response {
    match overview_data(&d).await {
        Ok(o) => {
            let mut body = String::from("<h1>Overview</h1>");
            body.push_str("<div id=\"live\" data-fragment=\"/ui/fragments/overview\">");
            body.push_str(&render::overview(&o));
            body.push_str("</div>");
            let page = Page {
                stream: Some("/ui/events".into()),
                ..plain_page(&d, "Overview", "overview")
            };
            html(StatusCode::OK, render::layout(&page, &body))
        }
        Err(f) => page_failure(&d, f),
    }
}

async fn overview_fragment(State(d): State<Dash>) -> Response {
    match overview_data(&d).await {
        Ok(o) => html(StatusCode::OK, render::overview(&o)),
        Err(f) => fragment_failure(f),
    }
}

// ---------------------------------------------------------------------
// Task list
// ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksQuery {
    state: Option<String>,
    plugin: Option<String>,
    run: Option<String>,
    limit: Option<usize>,
    /// Older than this task (the next page).
    cursor: Option<String>,
    /// Newer than this task (the previous page).
    before: Option<String>,
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

async fn task_list_data(d: &Dash, q: TasksQuery) -> Result<render::TaskList, Failure> {
    let state = match nonempty(q.state) {
        None => None,
        Some(s) => Some(TaskState::parse(&s).ok_or_else(|| {
            Failure::bad(format!(
                "unknown state `{s}` (one of {})",
                TaskState::ALL.map(TaskState::as_str).join(", ")
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(DEFAULT_TASKS_PAGE);
    if limit == 0 || limit > MAX_TASKS_PAGE {
        return Err(Failure::bad(format!(
            "limit must be between 1 and {MAX_TASKS_PAGE}"
        )));
    }
    let filters = Filters {
        state,
        plugin: nonempty(q.plugin),
        run: nonempty(q.run),
        limit,
    };
    let cursor = nonempty(q.cursor);
    let before = nonempty(q.before);
    if cursor.is_some() && before.is_some() {
        return Err(Failure::bad("give either cursor or before, not both"));
    }
    let base = TaskFilter {
        state: filters.state,
        run_id: filters.run.clone(),
        plugin: filters.plugin.clone(),
        limit: Some(limit),
        ..TaskFilter::default()
    };
    let (tasks, has_newer) = match (&cursor, &before) {
        (_, Some(b)) => {
            // The page before: the `limit` tasks just newer than `b`, read
            // oldest first from it, then shown newest first.
            let mut newer = d
                .svc
                .list_tasks(TaskFilter {
                    cursor: Some(b.clone()),
                    oldest_first: true,
                    ..base.clone()
                })
                .await?;
            if newer.len() < limit {
                // That reaches the newest task: show the first page.
                (d.svc.list_tasks(base.clone()).await?, false)
            } else {
                newer.reverse();
                (newer, true)
            }
        }
        (Some(c), None) => {
            let t = d
                .svc
                .list_tasks(TaskFilter {
                    cursor: Some(c.clone()),
                    ..base.clone()
                })
                .await?;
            (t, true)
        }
        (None, None) => (d.svc.list_tasks(base.clone()).await?, false),
    };
    let has_older = tasks.len() >= limit;
    Ok(render::TaskList {
        filters,
        tasks,
        has_newer,
        has_older,
        now: now_millis(),
    })
}

/// The query string a list fragment is fetched with (the page's own).
fn fragment_url(path: &str, raw_query: Option<&str>) -> String {
    match raw_query.filter(|q| !q.is_empty()) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

async fn tasks_page(
    State(d): State<Dash>,
    uri: axum::http::Uri,
    q: Result<Query<TasksQuery>, QueryRejection>,
) -> Response {
    let data = match query(q) {
        Ok(q) => task_list_data(&d, q).await,
        Err(f) => Err(f),
    };
    match data {
        Ok(l) => {
            let plugins = d
                .svc
                .list_plugins()
                .await
                .map(|ps| {
                    let mut names: Vec<String> = ps.into_iter().map(|p| p.name).collect();
                    names.dedup();
                    names
                })
                .unwrap_or_default();
            let mut body = String::from("<h1>Tasks</h1>");
            body.push_str(&render::task_filters(&l.filters, &plugins));
            let mut h = html::Html::new();
            h.fmt(format_args!(
                "<div id=\"live\" data-fragment=\"{}\">",
                html::Esc(&fragment_url("/ui/fragments/tasks", uri.query()))
            ));
            body.push_str(&h.into_string());
            body.push_str(&render::task_list(&l));
            body.push_str("</div>");
            let page = Page {
                stream: Some("/ui/events".into()),
                ..plain_page(&d, "Tasks", "tasks")
            };
            html(StatusCode::OK, render::layout(&page, &body))
        }
        Err(f) => page_failure(&d, f),
    }
}

async fn tasks_fragment(
    State(d): State<Dash>,
    q: Result<Query<TasksQuery>, QueryRejection>,
) -> Response {
    let data = match query(q) {
        Ok(q) => task_list_data(&d, q).await,
        Err(f) => Err(f),
    };
    match data {
        Ok(l) => html(StatusCode::OK, render::task_list(&l)),
        Err(f) => fragment_failure(f),
    }
}

// ---------------------------------------------------------------------
// Task detail
// ---------------------------------------------------------------------

/// The reason of a `task.cancel_failed` newer than the task's last cancel
/// request, when one is pending (only then does it matter).
async fn undelivered_cancel(
    d: &Dash,
    t: &crate::model::TaskRecord,
) -> Result<Option<String>, Failure> {
    if t.cancel.is_none() || t.state.is_terminal() {
        return Ok(None);
    }
    let mut after = 0;
    let mut failed = None;
    loop {
        let page = d.svc.db().events(Some(&t.id), after, TRAIL_PAGE).await?;
        for e in &page {
            match e.kind {
                EventKind::TaskCancelRequested => failed = None,
                EventKind::TaskCancelFailed => {
                    failed = Some(
                        e.data
                            .get("reason")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("no reason given")
                            .to_owned(),
                    );
                }
                _ => {}
            }
        }
        match page.last() {
            Some(last) if page.len() >= TRAIL_PAGE => after = last.seq,
            _ => break,
        }
    }
    Ok(failed)
}

async fn task_page(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let result = async {
        let t = d.svc.get_task(&id).await?;
        let failed = undelivered_cancel(&d, &t).await?;
        let events = d.svc.db().events(Some(&id), 0, TRAIL_PAGE).await?;
        Ok::<_, Failure>((t, failed, events))
    }
    .await;
    let (t, failed, events) = match result {
        Ok(v) => v,
        Err(f) => return page_failure(&d, f),
    };
    let omitted = events.len() >= TRAIL_PAGE;
    // Past an omitted middle, the live trail starts at what is committed now.
    let after = if omitted {
        *d.svc.db().watch_events().borrow()
    } else {
        events.last().map_or(0, |e| e.seq)
    };
    let mut h = html::Html::new();
    h.raw("<h1>Task <span class=\"id\">")
        .text(&t.id)
        .raw("</span></h1>");
    h.raw(&render::task_actions(&t));
    h.fmt(format_args!(
        "<div id=\"live\" data-fragment=\"/ui/fragments/tasks/{}\">",
        html::Esc(&t.id)
    ));
    h.raw(&render::task_detail(&t, failed.as_deref(), now_millis()));
    h.raw("</div>");
    h.raw(&render::trail(
        &events,
        false,
        omitted,
        &format!("/ui/fragments/tasks/{}/events", t.id),
        after,
    ));
    let title = format!("Task {}", t.id);
    let page = Page {
        // Already ended: nothing more will come.
        stream: (!t.state.is_terminal())
            .then(|| format!("/v1/tasks/{}/events?after={after}", t.id)),
        stream_end: &[
            EventKind::TaskSucceeded,
            EventKind::TaskFailed,
            EventKind::TaskTimedOut,
            EventKind::TaskCanceled,
        ],
        ..plain_page(&d, &title, "tasks")
    };
    html(StatusCode::OK, render::layout(&page, &h.into_string()))
}

async fn task_fragment(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let result = async {
        let t = d.svc.get_task(&id).await?;
        let failed = undelivered_cancel(&d, &t).await?;
        Ok::<_, Failure>(render::task_detail(&t, failed.as_deref(), now_millis()))
    }
    .await;
    match result {
        Ok(body) => html(StatusCode::OK, body),
        Err(f) => fragment_failure(f),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AfterQuery {
    after: Option<i64>,
}

/// Trail rows after `after`, with the last seq read and whether more wait.
fn trail_response(events: &[crate::model::Event], after: i64, with_task: bool) -> Response {
    let last = events.last().map_or(after, |e| e.seq);
    let more = events.len() >= TRAIL_PAGE;
    let mut r = html(StatusCode::OK, render::trail_rows(events, with_task));
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&last.to_string()) {
        h.insert(HeaderName::from_static("x-wasmtask-last-seq"), v);
    }
    h.insert(
        HeaderName::from_static("x-wasmtask-more"),
        HeaderValue::from_static(if more { "true" } else { "false" }),
    );
    r
}

async fn task_trail_fragment(
    State(d): State<Dash>,
    Path(id): Path<String>,
    q: Result<Query<AfterQuery>, QueryRejection>,
) -> Response {
    let result = async {
        let after = query(q)?.after.unwrap_or(0);
        d.svc.get_task(&id).await?;
        let events = d.svc.db().events(Some(&id), after, TRAIL_PAGE).await?;
        Ok::<_, Failure>((events, after))
    }
    .await;
    match result {
        Ok((events, after)) => trail_response(&events, after, false),
        Err(f) => fragment_failure(f),
    }
}

// ---------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn run_list_data(d: &Dash, q: RunsQuery) -> Result<render::RunList, Failure> {
    let limit = q.limit.unwrap_or(RUNS_PAGE);
    if limit == 0 || limit > crate::db::MAX_RUNS_PAGE {
        return Err(Failure::bad(format!(
            "limit must be between 1 and {}",
            crate::db::MAX_RUNS_PAGE
        )));
    }
    let cursor = nonempty(q.cursor);
    let paged = cursor.is_some();
    let runs = d.svc.list_runs(Some(limit), cursor).await?;
    Ok(render::RunList {
        has_older: runs.len() >= limit,
        runs,
        limit,
        paged,
    })
}

async fn runs_page(
    State(d): State<Dash>,
    uri: axum::http::Uri,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Response {
    let data = match query(q) {
        Ok(q) => run_list_data(&d, q).await,
        Err(f) => Err(f),
    };
    match data {
        Ok(l) => {
            let mut h = html::Html::new();
            h.raw("<h1>Runs</h1>");
            h.fmt(format_args!(
                "<div id=\"live\" data-fragment=\"{}\">",
                html::Esc(&fragment_url("/ui/fragments/runs", uri.query()))
            ));
            h.raw(&render::run_list(&l)).raw("</div>");
            let page = Page {
                stream: Some("/ui/events".into()),
                ..plain_page(&d, "Runs", "runs")
            };
            html(StatusCode::OK, render::layout(&page, &h.into_string()))
        }
        Err(f) => page_failure(&d, f),
    }
}

async fn runs_fragment(
    State(d): State<Dash>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Response {
    let data = match query(q) {
        Ok(q) => run_list_data(&d, q).await,
        Err(f) => Err(f),
    };
    match data {
        Ok(l) => html(StatusCode::OK, render::run_list(&l)),
        Err(f) => fragment_failure(f),
    }
}

async fn run_page(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let result = async {
        let v = d.svc.get_run(&id).await?;
        let events = d.svc.db().run_events(&id, 0, TRAIL_PAGE).await?;
        Ok::<_, Failure>((v, events))
    }
    .await;
    let (v, events) = match result {
        Ok(x) => x,
        Err(f) => return page_failure(&d, f),
    };
    let omitted = events.len() >= TRAIL_PAGE;
    let after = if omitted {
        *d.svc.db().watch_events().borrow()
    } else {
        events.last().map_or(0, |e| e.seq)
    };
    let mut h = html::Html::new();
    h.raw("<h1>Run <span class=\"id\">")
        .text(&v.run.id)
        .raw("</span>");
    if let Some(n) = v.run.name.as_deref().filter(|n| !n.is_empty()) {
        h.raw(" <span class=\"muted\">").text(n).raw("</span>");
    }
    h.raw("</h1>");
    h.raw(&render::run_actions(&v.run));
    h.fmt(format_args!(
        "<div id=\"live\" data-fragment=\"/ui/fragments/runs/{}\">",
        html::Esc(&v.run.id)
    ));
    h.raw(&render::run_detail(&v, now_millis()));
    h.raw("</div>");
    h.raw(&render::trail(
        &events,
        true,
        omitted,
        &format!("/ui/fragments/runs/{}/events", v.run.id),
        after,
    ));
    let title = format!("Run {}", v.run.id);
    let page = Page {
        stream: (!v.run.state.is_terminal())
            .then(|| format!("/v1/runs/{}/events?after={after}", v.run.id)),
        stream_end: &[EventKind::RunFinished],
        ..plain_page(&d, &title, "runs")
    };
    html(StatusCode::OK, render::layout(&page, &h.into_string()))
}

async fn run_fragment(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    match d.svc.get_run(&id).await {
        Ok(v) => html(StatusCode::OK, render::run_detail(&v, now_millis())),
        Err(e) => fragment_failure(e.into()),
    }
}

async fn run_trail_fragment(
    State(d): State<Dash>,
    Path(id): Path<String>,
    q: Result<Query<AfterQuery>, QueryRejection>,
) -> Response {
    let result = async {
        let after = query(q)?.after.unwrap_or(0);
        d.svc.get_run(&id).await?;
        let events = d.svc.db().run_events(&id, after, TRAIL_PAGE).await?;
        Ok::<_, Failure>((events, after))
    }
    .await;
    match result {
        Ok((events, after)) => trail_response(&events, after, true),
        Err(f) => fragment_failure(f),
    }
}

// ---------------------------------------------------------------------
// The change stream
// ---------------------------------------------------------------------

/// `GET /ui/events`: a `change` event with the highest committed event seq
/// at once, then after every commit that wrote events, at most one per
/// [`CHANGE_INTERVAL`]; it ends at shutdown.
async fn changes(State(d): State<Dash>) -> impl IntoResponse {
    let watch = d.svc.db().watch_events();
    let stopping = d.svc.stopping();
    let stream = futures_util::stream::unfold(
        (watch, stopping, true),
        |(mut watch, stopping, first)| async move {
            if !first {
                // Coalesce: commits during the pause become one change.
                tokio::select! {
                    _ = tokio::time::sleep(CHANGE_INTERVAL) => {}
                    _ = stopping.cancelled() => return None,
                }
                tokio::select! {
                    changed = watch.changed() => changed.ok()?,
                    _ = stopping.cancelled() => return None,
                }
            }
            let seq = *watch.borrow_and_update();
            let ev = SseEvent::default().event("change").data(seq.to_string());
            Some((
                Ok::<_, std::convert::Infallible>(ev),
                (watch, stopping, false),
            ))
        },
    );
    let mut r = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(crate::api::KEEP_ALIVE)
                .text("keep-alive"),
        )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

// ---------------------------------------------------------------------
// Assets
// ---------------------------------------------------------------------

#[derive(Deserialize)]
struct AssetQuery {
    v: Option<String>,
}

fn asset(
    content_type: &'static str,
    body: &'static str,
    q: Result<Query<AssetQuery>, QueryRejection>,
) -> Response {
    let current = q
        .ok()
        .and_then(|Query(q)| q.v)
        .is_some_and(|v| v == version());
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if current {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    secure(h);
    r
}

async fn app_js(q: Result<Query<AssetQuery>, QueryRejection>) -> Response {
    asset("text/javascript; charset=utf-8", APP_JS, q)
}

async fn style_css(q: Result<Query<AssetQuery>, QueryRejection>) -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS, q)
}

async fn favicon(q: Result<Query<AssetQuery>, QueryRejection>) -> Response {
    asset("image/svg+xml", FAVICON_SVG, q)
}
