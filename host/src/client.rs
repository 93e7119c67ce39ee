//! The HTTP client of `wasmtask serve` (the contract is docs/api.md): what the
//! command line uses for `submit`, `logs`, `cancel`, `abort`, `plugins add`
//! and, with `--server`, the read commands.
//!
//! The model: one [`Client`] per process holds the server's base URL, the
//! optional bearer token (sent on every request, so reads work against a
//! server that also guards them) and a connection-pooling `ureq` agent. Every
//! method is one request with a typed answer; every failure is a
//! [`ClientError`] that keeps what a user needs to act on it: the server's
//! `{code, message}` body, whether a token was sent, or which server could not
//! be reached.
//!
//! The client is **blocking** (ureq). Call it from a thread of its own, never
//! on a tokio worker: a request to a slow server would stall every task on
//! that worker.
//!
//! Event streams ([`Client::follow_events`]) are Server-Sent Events parsed by
//! [`SseDecoder`]. They have no overall deadline (a task may run for hours),
//! only [`READ_TIMEOUT`] between reads: the server sends a keep-alive comment
//! every 15 s, so 60 s of silence means a dead server or network. When a
//! stream drops before its terminal event the client reconnects with
//! `Last-Event-ID` (and `?after=`), and drops any event whose `seq` it has
//! already delivered, so the caller sees every event once, in order.

use std::io::Read;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use ureq::http::{self, Method, Request, Response, StatusCode, header};
use ureq::{Agent, AsSendBody, Body};

use crate::db::PluginRow;
use crate::model::{
    AbortBody, ApiError, CancelBody, Event, EventKind, RunRecord, RunSubmit, RunView, TaskRecord,
    TaskState, TaskSubmit,
};

/// Time allowed to resolve the server's name and open a connection: 10 s.
/// When it passes the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for any one read from the server (response headers, a body
/// chunk, the next line of an event stream): 60 s. It is not a deadline for a
/// whole stream; it is four missed keep-alives. A cancel or abort with
/// `wait_ms` gets that much longer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the answer to a plugin upload: 5 min, since the server
/// compiles the component before it answers.
pub const UPLOAD_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// How long [`Client::follow_events`] keeps trying to reconnect a dropped
/// stream (with backoff from 250 ms up to 5 s) before it gives up with the last
/// error: 60 s, enough for a server restart.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(250);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Page size used to read an event trail: 500 events per request.
pub const EVENTS_PAGE: usize = 500;

/// Largest JSON answer read: 256 MiB (a page of task records can carry up to
/// 2 MiB of captured output per task). Larger answers fail as a protocol error.
const MAX_JSON_BYTES: u64 = 256 << 20;

/// Largest error body read: 1 MiB; only its `{code, message}` matters.
const MAX_ERROR_BYTES: u64 = 1 << 20;

/// Largest single line or event accepted on an event stream: 4 MiB (the
/// server caps event data at 16 KiB). A longer one ends the stream with an
/// error instead of growing memory without bound.
pub const MAX_SSE_EVENT_BYTES: usize = 4 << 20;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The `--server` value is not a usable `http://` URL.
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The token cannot be sent as an HTTP header.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// No connection could be made (refused, unknown host, connect timeout).
    #[error("cannot reach the server at {server}: {cause}")]
    Unreachable { server: String, cause: String },
    /// `401`: no token, or the wrong one.
    #[error("unauthorized: {message}")]
    Unauthorized { token_sent: bool, message: String },
    /// Any other non-success answer, with the server's error body (or one
    /// made up from the status when the body was not an `ApiError`).
    #[error("{} ({})", .error.message, .error.code)]
    Api { status: u16, error: ApiError },
    /// The connection failed after it was made (reset, read timeout, …).
    #[error("request to {url} failed: {cause}")]
    Transport { url: String, cause: String },
    /// The server answered something this client does not understand.
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl ClientError {
    /// The HTTP status of an answered request.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Unauthorized { .. } => Some(401),
            _ => None,
        }
    }

    /// The server's stable error code (`not_found`, `task_finished`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(&error.code),
            ClientError::Unauthorized { .. } => Some("unauthorized"),
            _ => None,
        }
    }

    /// Whether trying again later may succeed: the connection failed, or the
    /// server said it is unavailable (restarting, behind a proxy that lost it).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// A page of `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    /// Pass as [`TaskQuery::cursor`] for the next page; `None` on the last one.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// Filters of `GET /v1/tasks` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskQuery {
    pub state: Option<TaskState>,
    pub run: Option<String>,
    /// Plugin name.
    pub plugin: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// The answer to a cancel: the task record, and whether it already reached
/// `canceled` (HTTP 200) rather than being on its way (`cancel_requested`, 202).
#[derive(Debug, Clone, PartialEq)]
pub struct CancelReply {
    pub task: TaskRecord,
    pub settled: bool,
}

/// The answer to an abort: the run and its tasks, and whether every task had
/// ended within `wait_ms` (HTTP 200) rather than still stopping (202).
#[derive(Debug, Clone, PartialEq)]
pub struct AbortReply {
    pub view: RunView,
    pub settled: bool,
}

/// The answer to a plugin upload; `created` is false when these exact bytes
/// were already registered under that name.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginAdded {
    pub plugin: PluginRow,
    pub created: bool,
}

/// A page of an event trail.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// The `seq` of the last entry of the page, including entries this client
    /// could not read (an event kind newer than it): resume after it.
    pub last_seq: Option<i64>,
    /// Entries left out because they were not events this client knows.
    pub skipped: usize,
}

/// Whose events to read: one task's, or a run's (its own and its tasks').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSource {
    Task(String),
    Run(String),
}

impl EventSource {
    /// A run for ids starting with `r_`, else a task.
    pub fn for_id(id: &str) -> EventSource {
        if id.starts_with("r_") {
            EventSource::Run(id.to_owned())
        } else {
            EventSource::Task(id.to_owned())
        }
    }

    pub fn id(&self) -> &str {
        match self {
            EventSource::Task(id) | EventSource::Run(id) => id,
        }
    }

    fn events_path(&self) -> String {
        match self {
            EventSource::Task(id) => format!("/v1/tasks/{}/events", segment(id)),
            EventSource::Run(id) => format!("/v1/runs/{}/events", segment(id)),
        }
    }

    /// The event after which the server ends this source's stream.
    pub fn is_terminal(&self, ev: &Event) -> bool {
        match self {
            EventSource::Task(id) => {
                matches!(
                    ev.kind,
                    EventKind::TaskSucceeded
                        | EventKind::TaskFailed
                        | EventKind::TaskTimedOut
                        | EventKind::TaskCanceled
                ) && ev.task_id.as_deref().is_none_or(|t| t == id)
            }
            EventSource::Run(_) => ev.kind == EventKind::RunFinished,
        }
    }
}

/// What [`Client::follow_events`] reports as it goes.
#[derive(Debug)]
pub enum Followed<'a> {
    /// The next event, each delivered once and in `seq` order.
    Event(&'a Event),
    /// The stream dropped; the client waits `delay`, then reconnects.
    Reconnecting {
        error: &'a ClientError,
        delay: Duration,
    },
}

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    /// `http://host:port` plus any path prefix, without a trailing slash.
    base: String,
    token: Option<String>,
    agent: Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the server at `server` (`http://HOST:PORT[/PREFIX]`; a
    /// bare `HOST:PORT` means `http://`). `https://` is refused: this build
    /// carries no TLS stack. Loopback servers are never reached through an
    /// `HTTP_PROXY` from the environment.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let (base, loopback) = normalize_base(server)?;
        if let Some(t) = &token {
            check_token(t)?;
        }
        let mut config = Agent::config_builder()
            // Error answers carry a JSON body worth reading.
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .timeout_per_write(Some(READ_TIMEOUT))
            // The API never redirects; one that does is reported, and the
            // token is never replayed to another host.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(format!("wasmtask/{}", env!("CARGO_PKG_VERSION")));
        if loopback {
            config = config.proxy(None);
        }
        Ok(Client {
            base,
            token,
            agent: config.build().new_agent(),
        })
    }

    /// The server's base URL as used in requests.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether requests carry a bearer token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `POST /v1/tasks`: the new record (state `queued`). The submission is
    /// never streamed (`stream` is sent as false): follow it with
    /// [`Client::follow_events`], so a lost connection never cancels the task.
    pub fn submit_task(&self, task: &TaskSubmit) -> Result<TaskRecord, ClientError> {
        let task = TaskSubmit {
            stream: false,
            on_disconnect: None,
            ..task.clone()
        };
        let resp = self.send_json(Method::POST, "/v1/tasks", &[], &task, READ_TIMEOUT)?;
        self.read_json("/v1/tasks", resp)
    }

    /// `GET /v1/tasks/{id}`.
    pub fn get_task(&self, id: &str) -> Result<TaskRecord, ClientError> {
        let path = format!("/v1/tasks/{}", segment(id));
        let resp = self.get(&path, &[])?;
        self.read_json(&path, resp)
    }

    /// `GET /v1/tasks`: one page, newest first.
    pub fn list_tasks(&self, q: &TaskQuery) -> Result<TaskPage, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = q.state {
            query.push(("state", s.as_str().to_owned()));
        }
        if let Some(r) = &q.run {
            query.push(("run", r.clone()));
        }
        if let Some(p) = &q.plugin {
            query.push(("plugin", p.clone()));
        }
        if let Some(l) = q.limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = &q.cursor {
            query.push(("cursor", c.clone()));
        }
        let resp = self.get("/v1/tasks", &query)?;
        self.read_json("/v1/tasks", resp)
    }

    /// `POST /v1/tasks/{id}/cancel`. A finished task is
    /// `ClientError::Api { status: 409, error }` with `error.code ==
    /// "task_finished"` and `error.task` the unchanged record.
    pub fn cancel_task(&self, id: &str, body: &CancelBody) -> Result<CancelReply, ClientError> {
        #[derive(Deserialize)]
        struct Answer {
            task: TaskRecord,
        }
        let path = format!("/v1/tasks/{}/cancel", segment(id));
        let timeout = READ_TIMEOUT + Duration::from_millis(body.wait_ms.unwrap_or(0));
        let resp = self.send_json(Method::POST, &path, &[], body, timeout)?;
        let settled = resp.status() == StatusCode::OK;
        let answer: Answer = self.read_json(&path, resp)?;
        Ok(CancelReply {
            task: answer.task,
            settled,
        })
    }

    /// `POST /v1/runs`: creates a run with all its tasks (state `running`).
    pub fn submit_run(&self, run: &RunSubmit) -> Result<RunView, ClientError> {
        let resp = self.send_json(Method::POST, "/v1/runs", &[], run, READ_TIMEOUT)?;
        self.read_json("/v1/runs", resp)
    }

    /// `GET /v1/runs/{id}`.
    pub fn get_run(&self, id: &str) -> Result<RunView, ClientError> {
        let path = format!("/v1/runs/{}", segment(id));
        let resp = self.get(&path, &[])?;
        self.read_json(&path, resp)
    }

    /// `GET /v1/runs`, newest first.
    pub fn list_runs(&self, limit: Option<usize>) -> Result<Vec<RunRecord>, ClientError> {
        #[derive(Deserialize)]
        struct Answer {
            runs: Vec<RunRecord>,
        }
        let query: Vec<_> = limit
            .map(|l| ("limit", l.to_string()))
            .into_iter()
            .collect();
        let resp = self.get("/v1/runs", &query)?;
        let answer: Answer = self.read_json("/v1/runs", resp)?;
        Ok(answer.runs)
    }

    /// `POST /v1/runs/{id}/abort`. A finished run is `409 run_finished`.
    pub fn abort_run(&self, id: &str, body: &AbortBody) -> Result<AbortReply, ClientError> {
        let path = format!("/v1/runs/{}/abort", segment(id));
        let timeout = READ_TIMEOUT + Duration::from_millis(body.wait_ms.unwrap_or(0));
        let resp = self.send_json(Method::POST, &path, &[], body, timeout)?;
        let settled = resp.status() == StatusCode::OK;
        let view = self.read_json(&path, resp)?;
        Ok(AbortReply { view, settled })
    }

    /// `POST /v1/plugins?name=`: registers a component from its bytes.
    pub fn add_plugin(&self, name: &str, bytes: &[u8]) -> Result<PluginAdded, ClientError> {
        let url = self.url("/v1/plugins", &[("name", name.to_owned())]);
        let req = self
            .builder(Method::POST, &url, "application/json")
            .header(header::CONTENT_TYPE, "application/wasm");
        let resp = self.run(&url, req, bytes, UPLOAD_READ_TIMEOUT)?;
        let created = resp.status() == StatusCode::CREATED;
        let plugin = self.read_json("/v1/plugins", resp)?;
        Ok(PluginAdded { plugin, created })
    }

    /// `GET /v1/plugins`.
    pub fn list_plugins(&self) -> Result<Vec<PluginRow>, ClientError> {
        #[derive(Deserialize)]
        struct Answer {
            plugins: Vec<PluginRow>,
        }
        let resp = self.get("/v1/plugins", &[])?;
        let answer: Answer = self.read_json("/v1/plugins", resp)?;
        Ok(answer.plugins)
    }

    /// One page of a trail: the events with `seq > after`, oldest first.
    /// Entries of kinds this client does not know are counted, not returned.
    pub fn events_page(
        &self,
        source: &EventSource,
        after: Option<i64>,
        limit: usize,
    ) -> Result<EventPage, ClientError> {
        #[derive(Deserialize)]
        struct Answer {
            events: Vec<serde_json::Value>,
        }
        let path = source.events_path();
        let mut query = vec![("limit", limit.to_string())];
        if let Some(a) = after {
            query.push(("after", a.to_string()));
        }
        let resp = self.get(&path, &query)?;
        let answer: Answer = self.read_json(&path, resp)?;
        let mut page = EventPage::default();
        for value in answer.events {
            let seq = value.get("seq").and_then(serde_json::Value::as_i64);
            match serde_json::from_value::<Event>(value) {
                Ok(ev) => {
                    page.last_seq = Some(ev.seq);
                    page.events.push(ev);
                }
                Err(e) => {
                    tracing::debug!(?seq, error = %e, "skipping an event this client cannot read");
                    page.skipped += 1;
                    if seq.is_some() {
                        page.last_seq = seq;
                    }
                }
            }
        }
        Ok(page)
    }

    /// Follows a trail live until its terminal event (a task's
    /// `task.succeeded|failed|timed_out|canceled`, a run's `run.finished`),
    /// starting after `after` (from the beginning when `None`). Returns the
    /// last `seq` delivered.
    ///
    /// A stream that drops is reconnected with `Last-Event-ID`, with backoff,
    /// for up to [`RECONNECT_WINDOW`] of consecutive failures; `on` hears of
    /// each attempt. A failure to connect the first time is returned at once
    /// (a wrong URL or id should not take a minute to report). A stream that
    /// ends cleanly but early is checked against the record: if the source has
    /// finished (its terminal event was already behind `after`) the follow
    /// ends.
    pub fn follow_events(
        &self,
        source: &EventSource,
        after: Option<i64>,
        on: &mut dyn FnMut(Followed<'_>),
    ) -> Result<Option<i64>, ClientError> {
        let mut cursor = after;
        let mut connected_once = false;
        let mut failing_since: Option<Instant> = None;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let mut stats = StreamStats::default();
            let result = self.stream_once(source, &mut cursor, on, &mut stats);
            if stats.connected {
                connected_once = true;
            }
            if stats.bytes > 0 {
                failing_since = None;
                delay = stats.retry.unwrap_or(FIRST_RETRY_DELAY);
            }
            let error = match result {
                Ok(StreamEnd::Terminal) => return Ok(cursor),
                Ok(StreamEnd::Closed) if stats.events > 0 => continue,
                Ok(StreamEnd::Closed) => match self.source_finished(source) {
                    Ok(true) => return Ok(cursor),
                    Ok(false) => ClientError::Transport {
                        url: self.url(&source.events_path(), &[]),
                        cause: "the server closed the event stream".to_owned(),
                    },
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if !connected_once || !error.is_retryable() {
                return Err(error);
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= RECONNECT_WINDOW {
                return Err(error);
            }
            on(Followed::Reconnecting {
                error: &error,
                delay,
            });
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// One connection of an event stream, until it ends or fails.
    fn stream_once(
        &self,
        source: &EventSource,
        cursor: &mut Option<i64>,
        on: &mut dyn FnMut(Followed<'_>),
        stats: &mut StreamStats,
    ) -> Result<StreamEnd, ClientError> {
        let path = source.events_path();
        let query: Vec<_> = cursor
            .map(|c| ("after", c.to_string()))
            .into_iter()
            .collect();
        let url = self.url(&path, &query);
        let mut req = self
            .builder(Method::GET, &url, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache");
        if let Some(c) = *cursor {
            req = req.header("Last-Event-ID", c.to_string());
        }
        let resp = self.run(&url, req, (), READ_TIMEOUT)?;
        stats.connected = true;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(ClientError::Protocol {
                url,
                detail: format!("expected an event stream, got {content_type:?}"),
            });
        }
        let mut reader = resp.into_body().into_reader();
        let mut decoder = SseDecoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(StreamEnd::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ClientError::Transport {
                        url,
                        cause: describe(&ureq::Error::from(e)),
                    });
                }
            };
            stats.bytes += n;
            let messages = decoder
                .feed(buf.get(..n).unwrap_or_default())
                .map_err(|e| ClientError::Protocol {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
            stats.retry = decoder.retry();
            for msg in messages {
                let ev = match serde_json::from_str::<Event>(&msg.data) {
                    Ok(ev) => ev,
                    Err(e) => {
                        // An event kind newer than this client: step over it
                        // (its id still moves the cursor, so a resume skips it).
                        tracing::debug!(id = ?msg.id, event = ?msg.event, error = %e, "skipping an event this client cannot read");
                        if let Some(seq) = msg.id.as_deref().and_then(|i| i.parse::<i64>().ok())
                            && cursor.is_none_or(|c| seq > c)
                        {
                            *cursor = Some(seq);
                        }
                        continue;
                    }
                };
                if cursor.is_some_and(|c| ev.seq <= c) {
                    continue;
                }
                *cursor = Some(ev.seq);
                stats.events += 1;
                on(Followed::Event(&ev));
                if source.is_terminal(&ev) {
                    return Ok(StreamEnd::Terminal);
                }
            }
        }
    }

    fn source_finished(&self, source: &EventSource) -> Result<bool, ClientError> {
        Ok(match source {
            EventSource::Task(id) => self.get_task(id)?.state.is_terminal(),
            EventSource::Run(id) => self.get_run(id)?.run.state.is_terminal(),
        })
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> String {
        let mut url = format!("{}{path}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&percent_encode(v));
        }
        url
    }

    fn builder(&self, method: Method, url: &str, accept: &str) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(url)
            .header(header::ACCEPT, accept);
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b
    }

    fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Response<Body>, ClientError> {
        let url = self.url(path, query);
        let req = self.builder(Method::GET, &url, "application/json");
        self.run(&url, req, (), READ_TIMEOUT)
    }

    fn send_json<T: serde::Serialize>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: &T,
        read_timeout: Duration,
    ) -> Result<Response<Body>, ClientError> {
        let url = self.url(path, query);
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Protocol {
            url: url.clone(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        let req = self
            .builder(method, &url, "application/json")
            .header(header::CONTENT_TYPE, "application/json");
        self.run(&url, req, bytes, read_timeout)
    }

    /// Sends one request; a non-2xx answer becomes the matching error.
    fn run<B: AsSendBody>(
        &self,
        url: &str,
        req: http::request::Builder,
        body: B,
        read_timeout: Duration,
    ) -> Result<Response<Body>, ClientError> {
        let req = req.body(body).map_err(|e| ClientError::Protocol {
            url: url.to_owned(),
            detail: format!("cannot build the request: {e}"),
        })?;
        let req = self
            .agent
            .configure_request(req)
            .timeout_per_read(Some(read_timeout))
            .build();
        let resp = self
            .agent
            .run(req)
            .map_err(|e| transport_error(&self.base, url, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            return Err(ClientError::Protocol {
                url: url.to_owned(),
                detail: format!("redirected ({status}) to {to}; check --server"),
            });
        }
        Err(self.status_error(url, resp))
    }

    fn status_error(&self, url: &str, mut resp: Response<Body>) -> ClientError {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BYTES)
            .read_to_vec()
            .unwrap_or_default();
        let error = api_error(status, &body);
        tracing::debug!(url, status, code = %error.code, "request refused");
        if status == 401 {
            ClientError::Unauthorized {
                token_sent: self.token.is_some(),
                message: error.message,
            }
        } else {
            ClientError::Api { status, error }
        }
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        path: &str,
        mut resp: Response<Body>,
    ) -> Result<T, ClientError> {
        let url = self.url(path, &[]);
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => ClientError::Protocol {
                    url: url.clone(),
                    detail: format!("answer larger than {MAX_JSON_BYTES} bytes"),
                },
                e => ClientError::Transport {
                    url: url.clone(),
                    cause: describe(&e),
                },
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url,
            detail: format!("invalid JSON: {e}"),
        })
    }
}

#[derive(Debug, Default)]
struct StreamStats {
    connected: bool,
    bytes: usize,
    events: usize,
    retry: Option<Duration>,
}

enum StreamEnd {
    /// The source's terminal event was delivered.
    Terminal,
    /// The server closed the stream before it.
    Closed,
}

/// The error body of a refused request: the server's `ApiError`, or one made
/// up from the status and the start of whatever else the body was.
pub fn api_error(status: u16, body: &[u8]) -> ApiError {
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e;
    }
    let code = match status {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        422 => "unprocessable",
        503 => "unavailable",
        500..=599 => "internal",
        _ => "http_error",
    };
    let text = String::from_utf8_lossy(body);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    let message = match first {
        Some(line) if line.chars().count() > 200 => {
            format!("{}…", line.chars().take(200).collect::<String>())
        }
        Some(line) => line.to_owned(),
        None => {
            let reason = StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error");
            format!("HTTP {status} {reason}").to_lowercase()
        }
    };
    ApiError {
        code: code.to_owned(),
        message,
        task: None,
    }
}

fn transport_error(base: &str, url: &str, e: ureq::Error) -> ClientError {
    use std::io::ErrorKind as K;
    let unreachable = match &e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable
                | K::NotConnected
        ),
        _ => false,
    };
    if unreachable {
        ClientError::Unreachable {
            server: base.to_owned(),
            cause: describe(&e),
        }
    } else {
        ClientError::Transport {
            url: url.to_owned(),
            cause: describe(&e),
        }
    }
}

/// A ureq error in words, without its `io:` prefix and with a lowercase start.
fn describe(e: &ureq::Error) -> String {
    let text = match e {
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        other => other.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// `http://host:port[/prefix]` without a trailing slash, and whether the host
/// is a loopback address.
fn normalize_base(server: &str) -> Result<(String, bool), ClientError> {
    let bad = |reason: &str| ClientError::BadUrl {
        url: server.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = server.trim();
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported by this build (no TLS); use http:// — the server \
                 listens on loopback by default — or a local TLS-terminating proxy",
            ));
        }
        Some(other) => return Err(bad(&format!("unsupported scheme {other:?}; use http://"))),
        None => return Err(bad("expected http://HOST:PORT")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("expected http://HOST:PORT"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported; use --token"));
    }
    if uri.query().is_some() {
        return Err(bad("a query string is not allowed"));
    }
    let host = authority.host();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let path = uri.path().trim_end_matches('/');
    Ok((format!("http://{authority}{path}"), loopback))
}

fn check_token(token: &str) -> Result<(), ClientError> {
    if token.is_empty() {
        return Err(ClientError::BadToken("empty".to_owned()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::BadToken(
            "only visible ASCII characters can be sent in an HTTP header".to_owned(),
        ));
    }
    Ok(())
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One path segment (an id), encoded so that `/`, `?` or `#` in it cannot
/// change which route is asked.
fn segment(s: &str) -> String {
    percent_encode(s)
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

/// One dispatched SSE message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The stream's last event id when this message was dispatched (an `id:`
    /// field persists across messages, as the SSE spec says).
    pub id: Option<String>,
    /// The `event:` field; `None` means the default type, `message`.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// A line or message longer than [`MAX_SSE_EVENT_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event stream line or event larger than {limit} bytes")]
pub struct SseTooLarge {
    pub limit: usize,
}

/// An incremental parser of the `text/event-stream` format (WHATWG HTML
/// §9.2.6): lines end with CRLF, LF or CR (a CRLF may be split across
/// chunks); `:` starts a comment (keep-alives); `field: value` with one
/// optional space after the colon; `data` lines accumulate; a blank line
/// dispatches a message unless it has no data; `id` persists until changed
/// and is ignored when it contains NUL; `retry` takes digits only; a leading
/// BOM is dropped; an unterminated message at the end of the stream is
/// discarded (the caller simply never sees it).
#[derive(Debug)]
pub struct SseDecoder {
    line: Vec<u8>,
    /// The previous byte was a CR: a following LF belongs to the same line end.
    after_cr: bool,
    /// No line has been completed yet (a BOM may still lead).
    at_start: bool,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    retry: Option<Duration>,
    limit: usize,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new()
    }
}

impl SseDecoder {
    pub fn new() -> SseDecoder {
        SseDecoder::with_limit(MAX_SSE_EVENT_BYTES)
    }

    /// A decoder refusing lines and messages longer than `limit` bytes.
    pub fn with_limit(limit: usize) -> SseDecoder {
        SseDecoder {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            data: String::new(),
            has_data: false,
            event: None,
            last_id: None,
            retry: None,
            limit,
        }
    }

    /// The reconnection delay the server last asked for (`retry:`).
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// The last event id seen (`id:`), if any.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Consumes the next bytes of the stream; returns the messages they
    /// complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseMessage>, SseTooLarge> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(msg) = self.line_done(&line)? {
                        out.push(msg);
                    }
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= self.limit {
                        return Err(SseTooLarge { limit: self.limit });
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line_done(&mut self, raw: &[u8]) -> Result<Option<SseMessage>, SseTooLarge> {
        let text = String::from_utf8_lossy(raw);
        let mut line: &str = &text;
        if self.at_start {
            self.at_start = false;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.limit {
                    return Err(SseTooLarge { limit: self.limit });
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseMessage> {
        let event = self.event.take();
        if !self.has_data {
            self.data.clear();
            return None;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        Some(SseMessage {
            id: self.last_id.clone(),
            event: event.filter(|e| !e.is_empty()),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Vec<SseMessage> {
        let mut d = SseDecoder::new();
        chunks.iter().flat_map(|c| d.feed(c).unwrap()).collect()
    }

    fn msg(id: Option<&str>, event: Option<&str>, data: &str) -> SseMessage {
        SseMessage {
            id: id.map(str::to_owned),
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn sse_parses_id_event_and_data_fields() {
        let got = feed_all(&[b"id: 7\nevent: task.log\ndata: {\"seq\":7}\n\n"]);
        assert_eq!(got, [msg(Some("7"), Some("task.log"), "{\"seq\":7}")]);
    }

    #[test]
    fn sse_joins_multi_line_data_with_newlines() {
        let got = feed_all(&[b"data: one\ndata:two\ndata:  three\ndata\n\n"]);
        // One space after the colon is dropped, a second one is kept; a bare
        // `data` line adds an empty line.
        assert_eq!(got, [msg(None, None, "one\ntwo\n three\n")]);
    }

    #[test]
    fn sse_ignores_comments_and_unknown_fields() {
        let got = feed_all(&[b": keep-alive\n\n:\nfoo: bar\ndata: x\n\n: bye\n\n"]);
        assert_eq!(got, [msg(None, None, "x")]);
    }

    #[test]
    fn sse_accepts_crlf_cr_and_lf_even_split_across_chunks() {
        let got = feed_all(&[b"id: 1\r", b"\ndata: a\r\n\r", b"\nid: 2\rdata: b\r\r"]);
        assert_eq!(got, [msg(Some("1"), None, "a"), msg(Some("2"), None, "b")]);
    }

    #[test]
    fn sse_gives_the_same_messages_fed_byte_by_byte() {
        let stream: &[u8] =
            b"\xEF\xBB\xBFretry: 1500\r\nid: 3\r\nevent: task.started\r\ndata: {}\r\n\r\n: ka\n\nid: 4\ndata: x\n\n";
        let whole = feed_all(&[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed_all(&bytes), whole);
        assert_eq!(
            whole,
            [
                msg(Some("3"), Some("task.started"), "{}"),
                msg(Some("4"), None, "x")
            ]
        );
    }

    #[test]
    fn sse_id_persists_and_messages_without_data_are_not_dispatched() {
        let mut d = SseDecoder::new();
        let got = d
            .feed(b"id: 5\nevent: ping\n\ndata: after\n\nid\ndata: reset\n\n")
            .unwrap();
        // The event type does not leak into the next message; the id does,
        // until an empty `id` resets it.
        assert_eq!(
            got,
            [msg(Some("5"), None, "after"), msg(Some(""), None, "reset")]
        );
        let got = d.feed(b"id: a\0b\ndata: nul\n\n").unwrap();
        assert_eq!(
            got,
            [msg(Some(""), None, "nul")],
            "ids with NUL are ignored"
        );
    }

    #[test]
    fn sse_retry_takes_digits_only_and_unterminated_messages_wait() {
        let mut d = SseDecoder::new();
        assert!(
            d.feed(b"retry: 2s\nretry: 250\ndata: half")
                .unwrap()
                .is_empty()
        );
        assert_eq!(d.retry(), Some(Duration::from_millis(250)));
        assert_eq!(d.feed(b"\n\n").unwrap(), [msg(None, None, "half")]);
    }

    #[test]
    fn sse_refuses_overlong_lines() {
        let mut d = SseDecoder::with_limit(8);
        assert!(d.feed(b"data: 123").is_err());
        // Lines within the limit, but a message that grows past it.
        let mut d = SseDecoder::with_limit(12);
        assert!(d.feed(b"data: 12345\ndata: 12345\ndata: 12345\n").is_err());
    }

    #[test]
    fn base_urls_are_normalized() {
        assert_eq!(
            normalize_base("127.0.0.1:7480").unwrap(),
            ("http://127.0.0.1:7480".to_owned(), true)
        );
        assert_eq!(
            normalize_base("http://example.com:80/wasmtask/").unwrap(),
            ("http://example.com:80/wasmtask".to_owned(), false)
        );
        assert_eq!(
            normalize_base("http://[::1]:9/").unwrap(),
            ("http://[::1]:9".to_owned(), true)
        );
        assert!(normalize_base("http://localhost:7480").unwrap().1);
        for bad in [
            "",
            "https://h:1",
            "ftp://h",
            "http://u:p@h:1",
            "http://h:1/?x=1",
        ] {
            assert!(
                matches!(normalize_base(bad), Err(ClientError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_must_be_header_safe() {
        assert!(Client::new("http://127.0.0.1:1", Some("s3cr3t-._~+/=".into())).is_ok());
        assert!(matches!(
            Client::new("http://127.0.0.1:1", Some("two words".into())),
            Err(ClientError::BadToken(_))
        ));
        let c = Client::new("http://127.0.0.1:1", Some("hidden".into())).unwrap();
        assert!(!format!("{c:?}").contains("hidden"));
    }

    #[test]
    fn urls_encode_ids_and_query_values() {
        let c = Client::new("http://127.0.0.1:1/p/", None).unwrap();
        let path = format!("/v1/tasks/{}", segment("a/b?c"));
        assert_eq!(
            c.url(&path, &[("name", "x y&z".into()), ("limit", "5".into())]),
            "http://127.0.0.1:1/p/v1/tasks/a%2Fb%3Fc?name=x%20y%26z&limit=5"
        );
    }

    #[test]
    fn error_bodies_keep_the_server_code_or_fall_back_to_the_status() {
        let e = api_error(
            409,
            br#"{"code":"task_finished","message":"task t_1 is succeeded"}"#,
        );
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("task_finished", "task t_1 is succeeded")
        );
        let e = api_error(502, b"<html>\n  Bad Gateway from nginx\n</html>");
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("internal", "<html>")
        );
        let e = api_error(404, b"");
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("not_found", "http 404 not found")
        );
    }

    #[test]
    fn connection_refused_is_unreachable_and_retryable() {
        // Port 1 on loopback: nothing listens there.
        let c = Client::new("http://127.0.0.1:1", None).unwrap();
        let e = c.get_task("t_x").unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("cannot reach the server at http://127.0.0.1:1: ")
        );
        assert!(e.is_retryable());
        assert!(
            !ClientError::Api {
                status: 404,
                error: api_error(404, b"")
            }
            .is_retryable()
        );
    }

    #[test]
    fn terminal_events_end_a_source() {
        let ev = |kind, task: Option<&str>| Event {
            seq: 1,
            task_id: task.map(str::to_owned),
            run_id: None,
            kind,
            at: 0,
            data: serde_json::Value::Null,
        };
        let t = EventSource::for_id("t_1");
        assert!(t.is_terminal(&ev(EventKind::TaskCanceled, Some("t_1"))));
        assert!(!t.is_terminal(&ev(EventKind::TaskCanceled, Some("t_2"))));
        assert!(!t.is_terminal(&ev(EventKind::TaskCancelForced, Some("t_1"))));
        let r = EventSource::for_id("r_1");
        assert_eq!(r, EventSource::Run("r_1".into()));
        assert!(r.is_terminal(&ev(EventKind::RunFinished, None)));
        assert!(!r.is_terminal(&ev(EventKind::TaskSucceeded, Some("t_1"))));
    }
}
