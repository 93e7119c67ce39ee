//! The HTTP API (`/v1`, health, metrics), on axum. Handlers parse and check
//! the request, call the [`Service`], and turn its answer or its
//! [`ServiceError`] into JSON with a stable error code (docs/api.md). No
//! wasmtime type appears here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::{DEFAULT_RUNS_PAGE, DEFAULT_TASKS_PAGE, MAX_EVENTS_PAGE, TaskFilter};
use crate::model::{
    ApiError, CancelBody, Event, EventKind, OnDisconnect, RunSubmit, TaskState, TaskSubmit,
};
use crate::service::{Cancel, Service, ServiceError};

/// Bodies other than plugin uploads.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Plugin uploads.
pub const DEFAULT_MAX_PLUGIN_BYTES: usize = 64 << 20;
/// SSE keep-alive comment interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The OpenAPI description served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the router needs.
#[derive(Clone)]
pub struct ApiConfig {
    /// Bearer token for state-changing requests; `None`: no auth.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    pub max_plugin_bytes: usize,
}

#[derive(Clone)]
struct AppState {
    svc: Service,
    /// SHA-256 of the token (compared in constant time).
    token_hash: Option<[u8; 32]>,
}

/// The listener the server runs on, with `TCP_NODELAY` on every accepted
/// connection: an answer written in more than one segment goes out at once
/// instead of waiting (Nagle's algorithm) for the client to acknowledge the
/// previous one. Request/response traffic gains nothing from Nagle. (The
/// benchmarks showed no difference either way on loopback.)
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    })
}

/// The whole HTTP surface.
pub fn router(svc: Service, cfg: ApiConfig) -> Router {
    let state = AppState {
        svc,
        token_hash: cfg
            .token
            .as_deref()
            .map(|t| Sha256::digest(t.as_bytes()).into()),
    };
    let plugins = Router::new()
        .route("/v1/plugins", post(add_plugin).get(list_plugins))
        .layer(DefaultBodyLimit::max(cfg.max_plugin_bytes));
    let rest = Router::new()
        .route("/v1/tasks", post(submit_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/events", get(task_events))
        .route("/v1/runs", post(submit_run).get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/abort", post(abort_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/openapi.json", get(openapi))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes));
    Router::new()
        .merge(plugins)
        .merge(rest)
        .merge(crate::dashboard::router(
            state.svc.clone(),
            state.token_hash.is_some(),
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

// ---------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------

/// An error answer: status and `{code, message}`.
pub struct ApiFailure {
    status: StatusCode,
    body: ApiError,
}

impl ApiFailure {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status,
            body: ApiError {
                code: code.to_owned(),
                message: message.into(),
                task: None,
            },
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ServiceError> for ApiFailure {
    fn from(e: ServiceError) -> ApiFailure {
        let message = e.to_string();
        match e {
            ServiceError::NotFound(_) => {
                ApiFailure::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            ServiceError::InvalidSpec(_) => {
                ApiFailure::new(StatusCode::BAD_REQUEST, "invalid_spec", message)
            }
            ServiceError::UnknownPlugin(_) => {
                ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin", message)
            }
            ServiceError::InvalidPlugin(_) => {
                ApiFailure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin", message)
            }
            ServiceError::TaskFinished(task) => ApiFailure {
                status: StatusCode::CONFLICT,
                body: ApiError {
                    code: "task_finished".into(),
                    message,
                    task: Some(task),
                },
            },
            ServiceError::RunFinished(_) => {
                ApiFailure::new(StatusCode::CONFLICT, "run_finished", message)
            }
            ServiceError::Unavailable(_) => {
                ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            ServiceError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "internal error");
                ApiFailure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("internal error: {e:#}"),
                )
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

fn body_error(e: BytesRejection) -> ApiFailure {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this server accepts",
        )
    } else {
        ApiFailure::bad_request(format!("cannot read the request body: {}", e.body_text()))
    }
}

/// Parses a JSON body; an empty body is `{}` when `empty_ok`.
fn parse_json<T: DeserializeOwned>(body: &[u8], empty_ok: bool) -> ApiResult<T> {
    let body = if body.iter().all(u8::is_ascii_whitespace) && empty_ok {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiFailure::bad_request(format!("invalid JSON body: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiFailure::bad_request(format!("invalid query: {}", e.body_text())))
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiFailure {
    ApiFailure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

// ---------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------

/// Most body bytes read from a refused (401) request before answering.
const UNAUTHORIZED_DRAIN_BYTES: usize = 1 << 20;
/// Longest time spent reading them.
const UNAUTHORIZED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = st.token_hash else {
        return next.run(req).await;
    };
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| Sha256::digest(t.trim().as_bytes()));
        let ok = given.is_some_and(|g| bool::from(g.as_slice().ct_eq(&expected)));
        if !ok {
            // Read (and drop) a modest body before answering: a client still
            // sending it (a plugin upload, say) would otherwise hit a reset
            // connection and never see the 401. Bounded in size and time, so
            // an unauthenticated client cannot make the server read much.
            let _ = tokio::time::timeout(
                UNAUTHORIZED_DRAIN_TIME,
                axum::body::to_bytes(req.into_body(), UNAUTHORIZED_DRAIN_BYTES),
            )
            .await;
            let mut r = ApiFailure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this request needs `Authorization: Bearer <token>`",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

// ---------------------------------------------------------------------
// Health, metrics, description
// ---------------------------------------------------------------------

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.svc.is_ready() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> ApiResult<Response> {
    let text = st.svc.render_metrics().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

// ---------------------------------------------------------------------
// Plugins
// ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginQuery {
    name: Option<String>,
}

async fn add_plugin(
    State(st): State<AppState>,
    q: Result<Query<PluginQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let body = body.map_err(body_error)?;
    let Some(name) = q.name else {
        return Err(ApiFailure::bad_request(
            "name the plugin: POST /v1/plugins?name=NAME",
        ));
    };
    if body.is_empty() {
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "the body is empty; send the component's bytes",
        ));
    }
    let (row, created) = st.svc.add_plugin(&name, body.to_vec()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(row)).into_response())
}

async fn list_plugins(State(st): State<AppState>) -> ApiResult<Response> {
    let plugins = st.svc.list_plugins().await?;
    Ok(Json(json!({"plugins": plugins})).into_response())
}

// ---------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------

async fn submit_task(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_error)?;
    let submit: TaskSubmit = parse_json(&body, false)?;
    let record = st.svc.submit(&submit).await?;
    if !submit.stream {
        let location = format!("/v1/tasks/{}", record.id);
        let mut r = (StatusCode::CREATED, Json(record)).into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(r);
    }
    let guard = match submit.on_disconnect.unwrap_or_default() {
        OnDisconnect::Cancel => Some(DisconnectGuard {
            svc: st.svc.clone(),
            task_id: Some(record.id.clone()),
        }),
        OnDisconnect::Detach => None,
    };
    let stream = event_stream(st.svc.clone(), Subject::Task(record.id.clone()), 0, guard);
    let mut r = sse(stream).into_response();
    if let Ok(v) = HeaderValue::from_str(&record.id) {
        r.headers_mut().insert("x-wasmtask-task-id", v);
    }
    Ok(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    run: Option<String>,
    plugin: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_tasks(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ApiFailure::bad_request(format!(
                "unknown state `{s}` (one of {})",
                TaskState::ALL.map(TaskState::as_str).join(", ")
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(DEFAULT_TASKS_PAGE);
    if limit == 0 {
        return Err(ApiFailure::bad_request("limit must be positive"));
    }
    let tasks = st
        .svc
        .list_tasks(TaskFilter {
            state,
            run_id: q.run.filter(|r| !r.is_empty()),
            plugin: q.plugin.filter(|p| !p.is_empty()),
            limit: Some(limit),
            cursor: q.cursor.filter(|c| !c.is_empty()),
            oldest_first: false,
        })
        .await?;
    let next = (tasks.len() >= limit.min(crate::db::MAX_TASKS_PAGE))
        .then(|| tasks.last().map(|t| t.id.clone()))
        .flatten();
    Ok(Json(json!({"tasks": tasks, "next_cursor": next})).into_response())
}

async fn get_task(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(st.svc.get_task(&id).await?).into_response())
}

fn cancel_of(body: CancelBody, actor: &str) -> Cancel {
    Cancel {
        actor: actor.to_owned(),
        reason: body.reason,
        grace_ms: body.grace_ms,
        wait: body.wait_ms.map(|ms| Duration::from_millis(ms.min(60_000))),
    }
}

async fn cancel_task(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_error)?;
    let c: CancelBody = parse_json(&body, true)?;
    let result = st.svc.cancel(&id, cancel_of(c, "api")).await?;
    let status = if result.done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(json!({"task": result.task}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<usize>,
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Where a stream resumes: `Last-Event-ID` wins over `?after=`.
fn resume_point(headers: &HeaderMap, after: Option<i64>) -> ApiResult<i64> {
    match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| ApiFailure::bad_request("Last-Event-ID must be an event seq")),
        None => Ok(after.unwrap_or(0)),
    }
}

async fn task_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    // 404 for unknown tasks, in both forms.
    st.svc.get_task(&id).await?;
    let after = resume_point(&headers, q.after)?;
    if wants_sse(&headers) {
        return Ok(
            sse(event_stream(st.svc.clone(), Subject::Task(id), after, None)).into_response(),
        );
    }
    let limit = q.limit.unwrap_or(MAX_EVENTS_PAGE);
    let events = st
        .svc
        .db()
        .events(Some(&id), after, limit)
        .await
        .map_err(ServiceError::from)?;
    Ok(Json(json!({"events": events})).into_response())
}

async fn run_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    st.svc.get_run(&id).await?;
    let after = resume_point(&headers, q.after)?;
    if wants_sse(&headers) {
        return Ok(
            sse(event_stream(st.svc.clone(), Subject::Run(id), after, None)).into_response(),
        );
    }
    let limit = q.limit.unwrap_or(MAX_EVENTS_PAGE);
    let events = st
        .svc
        .db()
        .run_events(&id, after, limit)
        .await
        .map_err(ServiceError::from)?;
    Ok(Json(json!({"events": events})).into_response())
}

// ---------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------

async fn submit_run(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_error)?;
    let submit: RunSubmit = parse_json(&body, false)?;
    let view = st.svc.submit_run(&submit).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_runs(
    State(st): State<AppState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_RUNS_PAGE);
    if limit == 0 {
        return Err(ApiFailure::bad_request("limit must be positive"));
    }
    let runs = st
        .svc
        .list_runs(Some(limit), q.cursor.filter(|c| !c.is_empty()))
        .await?;
    let next = (runs.len() >= limit.min(crate::db::MAX_RUNS_PAGE))
        .then(|| runs.last().map(|r| r.id.clone()))
        .flatten();
    Ok(Json(json!({"runs": runs, "next_cursor": next})).into_response())
}

async fn get_run(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(st.svc.get_run(&id).await?).into_response())
}

async fn abort_run(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_error)?;
    let c: CancelBody = parse_json(&body, true)?;
    let result = st.svc.abort(&id, cancel_of(c, "api")).await?;
    let status = if result.done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(result.view)).into_response())
}

// ---------------------------------------------------------------------
// Event streams
// ---------------------------------------------------------------------

enum Subject {
    Task(String),
    Run(String),
}

/// Cancels a streamed submission whose client went away before the task
/// ended (`on_disconnect: cancel`).
struct DisconnectGuard {
    svc: Service,
    /// `None` once disarmed.
    task_id: Option<String>,
}

impl DisconnectGuard {
    fn disarm(&mut self) {
        self.task_id = None;
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        let Some(id) = self.task_id.take() else {
            return;
        };
        let svc = self.svc.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let c = Cancel {
                actor: "client".into(),
                reason: Some("client_disconnected".into()),
                grace_ms: None,
                wait: None,
            };
            match svc.cancel(&id, c).await {
                Ok(_) | Err(ServiceError::TaskFinished(_)) => {}
                Err(e) => tracing::warn!(task = %id, error = %e, "cannot cancel after disconnect"),
            }
        });
    }
}

struct StreamState {
    svc: Service,
    subject: Subject,
    after: i64,
    buffer: VecDeque<Event>,
    watch: tokio::sync::watch::Receiver<i64>,
    ended: bool,
    /// Disarmed once the task's terminal event went out.
    guard: Option<DisconnectGuard>,
}

fn is_end(subject: &Subject, e: &Event) -> bool {
    match subject {
        Subject::Task(_) => matches!(
            e.kind,
            EventKind::TaskSucceeded
                | EventKind::TaskFailed
                | EventKind::TaskTimedOut
                | EventKind::TaskCanceled
        ),
        Subject::Run(_) => e.kind == EventKind::RunFinished,
    }
}

/// Whether the subject already ended (so no event after `after` will come).
async fn subject_ended(svc: &Service, subject: &Subject) -> bool {
    match subject {
        Subject::Task(id) => svc
            .db()
            .get_task(id)
            .await
            .ok()
            .flatten()
            .is_none_or(|t| t.state.is_terminal()),
        Subject::Run(id) => svc
            .db()
            .get_run(id)
            .await
            .ok()
            .flatten()
            .is_none_or(|r| r.state.is_terminal()),
    }
}

fn event_stream(
    svc: Service,
    subject: Subject,
    after: i64,
    guard: Option<DisconnectGuard>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let watch = svc.db().watch_events();
    let stopping = svc.stopping();
    let state = StreamState {
        svc,
        subject,
        after,
        buffer: VecDeque::new(),
        watch,
        ended: false,
        guard,
    };
    futures_util::stream::unfold(state, move |mut st| {
        let stopping = stopping.clone();
        async move {
            loop {
                if let Some(e) = st.buffer.pop_front() {
                    if is_end(&st.subject, &e) {
                        st.ended = true;
                        // The client saw the end: nothing to cancel any more.
                        if let Some(g) = st.guard.as_mut() {
                            g.disarm();
                        }
                    }
                    st.after = e.seq;
                    let data = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
                    let ev = SseEvent::default()
                        .id(e.seq.to_string())
                        .event(e.kind.as_str())
                        .data(data);
                    return Some((Ok(ev), st));
                }
                if st.ended {
                    return None;
                }
                // Mark the current value seen before reading, so an event
                // committed after the read wakes us.
                st.watch.borrow_and_update();
                let page = match &st.subject {
                    Subject::Task(id) => st.svc.db().events(Some(id), st.after, 256).await,
                    Subject::Run(id) => st.svc.db().run_events(id, st.after, 256).await,
                };
                match page {
                    Ok(events) if !events.is_empty() => {
                        st.buffer.extend(events);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream read failed");
                        return None;
                    }
                }
                if subject_ended(&st.svc, &st.subject).await {
                    // Ended before `after`: a resume past the end.
                    let again = match &st.subject {
                        Subject::Task(id) => st.svc.db().events(Some(id), st.after, 256).await,
                        Subject::Run(id) => st.svc.db().run_events(id, st.after, 256).await,
                    };
                    match again {
                        Ok(events) if !events.is_empty() => {
                            st.buffer.extend(events);
                            continue;
                        }
                        _ => return None,
                    }
                }
                tokio::select! {
                    changed = st.watch.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                    _ = stopping.cancelled() => {
                        // Shutting down: end the stream without canceling
                        // (the shutdown policy settles the tasks).
                        if let Some(g) = st.guard.as_mut() {
                            g.disarm();
                        }
                        return None;
                    }
                }
            }
        }
    })
}

fn sse<S>(stream: S) -> Sse<axum::response::sse::KeepAliveStream<S>>
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}
