//! The task model shared by the database, the CLI and (later) the HTTP API.
//!
//! These types are the product's vocabulary, serialized as JSON for users and
//! stored in SQLite. They know nothing of wasmtime: the executor's report is
//! translated into them in `exec`.
//!
//! States: `queued → running → {succeeded | failed | timed_out | canceled}`,
//! with `cancel_requested` between `running` and `canceled` during a grace
//! period. A terminal state never changes again.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC). Stored as INTEGER in SQLite.
pub type UnixMillis = i64;

/// Current wall-clock time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    CancelRequested,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
}

impl TaskState {
    /// Every state, in life order (for listings and metrics).
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::CancelRequested,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::CancelRequested => "cancel_requested",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut | TaskState::Canceled
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of component a plugin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// Targets the `wasmtask:task/task` world: JSON input in, JSON output out.
    Task,
    /// A `wasi:cli` command: args, env, stdin, exit code.
    Command,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Task => "task",
            PluginKind::Command => "command",
        }
    }

    pub fn parse(s: &str) -> Option<PluginKind> {
        match s {
            "task" => Some(PluginKind::Task),
            "command" => Some(PluginKind::Command),
            _ => None,
        }
    }
}

/// Why a task failed, for `failed`, `timed_out` and forced `canceled` ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The guest trapped; `detail` names the trap (`stack_overflow`,
    /// `unreachable`, `memory_out_of_bounds`, …).
    Trap,
    /// A per-task limit was hit; `detail` names it (`memory`, `tables`,
    /// `instances`, `fuel`, …).
    LimitExceeded,
    /// The wall-clock timeout passed.
    Timeout,
    /// The guest returned an error (`detail`: `invalid_input`, `failed`,
    /// `cancelled`).
    GuestError,
    /// A command exited with a non-zero code.
    ExitCode,
    /// The host stopped the guest because of a cancel.
    Canceled,
    /// The process running the task went away before it ended.
    HostRestart,
    /// The host could not start the guest (instantiation failed, bad plugin).
    HostError,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Trap => "trap",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::Timeout => "timeout",
            ErrorKind::GuestError => "guest_error",
            ErrorKind::ExitCode => "exit_code",
            ErrorKind::Canceled => "canceled",
            ErrorKind::HostRestart => "host_restart",
            ErrorKind::HostError => "host_error",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "trap" => ErrorKind::Trap,
            "limit_exceeded" => ErrorKind::LimitExceeded,
            "timeout" => ErrorKind::Timeout,
            "guest_error" => ErrorKind::GuestError,
            "exit_code" => ErrorKind::ExitCode,
            "canceled" => ErrorKind::Canceled,
            "host_restart" => ErrorKind::HostRestart,
            "host_error" => ErrorKind::HostError,
            _ => return None,
        })
    }
}

/// A failure with its kind, an optional finer detail and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    pub kind: ErrorKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub message: String,
}

/// Everything known about a cancel of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRecord {
    /// Who asked (`cli`, `signal:SIGINT`, `api:<token-name>`, `client_disconnected`, …).
    pub actor: String,
    pub reason: String,
    /// Grace granted to the guest before a forced stop, in milliseconds.
    pub grace_ms: u64,
    pub requested_at: UnixMillis,
    /// When the guest was stopped (its store dropped); `None` while stopping.
    pub stopped_at: Option<UnixMillis>,
    /// The guest saw the request (through `cancel-requested`) and returned.
    pub acknowledged: bool,
    /// The host trapped or dropped the guest.
    pub forced: bool,
    /// Request → guest stopped, in microseconds.
    pub latency_us: Option<u64>,
}

/// A bounded capture of a guest output stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    /// The first bytes written, up to the capture limit (lossy UTF-8 when shown).
    #[serde(with = "lossy_text")]
    pub data: Vec<u8>,
    /// Total bytes the guest wrote, including those not kept.
    pub total_bytes: u64,
    /// `true` when `total_bytes` exceeds what was kept.
    pub truncated: bool,
}

/// Serializes bytes as a (lossy) UTF-8 string: guest output is text by convention.
mod lossy_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(d)?.into_bytes())
    }
}

/// Resource use of one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub peak_memory_bytes: u64,
    /// Fuel consumed, when fuel metering was on for the task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel_consumed: Option<u64>,
}

/// Per-task limits as submitted (all optional: the host applies its defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

/// A directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSpec {
    pub host: String,
    pub guest: String,
    #[serde(default)]
    pub writable: bool,
}

/// What to run: everything a task needs besides the plugin bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Input JSON for task plugins (ignored by commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<DirSpec>,
    /// The guest's working directory (a guest path, e.g. a preopen's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Default grace for cancels that do not name one, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// Lock keys: tasks sharing a key never run at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
    /// Within a run: this task's key, and the keys it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
}

/// The full record of one task, as `show` and the API return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub plugin_id: String,
    pub plugin_name: String,
    pub plugin_kind: PluginKind,
    pub state: TaskState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub spec: TaskSpec,
    pub attempt: u32,
    pub max_attempts: u32,
    pub queued_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub cancel_requested_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// Output JSON of a task plugin that returned (also a partial one
    /// returned after a cancel).
    pub output: Option<serde_json::Value>,
    /// The latest checkpoint, kept across forced stops.
    pub partial_output: Option<serde_json::Value>,
    /// Latest progress report.
    pub progress: Option<Progress>,
    pub error: Option<TaskError>,
    pub exit_code: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub usage: Usage,
    pub cancel: Option<CancelRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub fraction: f32,
    pub message: String,
}

/// Kinds of events in the append-only trail (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "task.queued")]
    TaskQueued,
    #[serde(rename = "task.started")]
    TaskStarted,
    #[serde(rename = "task.log")]
    TaskLog,
    #[serde(rename = "task.progress")]
    TaskProgress,
    #[serde(rename = "task.checkpoint")]
    TaskCheckpoint,
    #[serde(rename = "task.cancel_requested")]
    TaskCancelRequested,
    #[serde(rename = "task.cancel_acknowledged")]
    TaskCancelAcknowledged,
    #[serde(rename = "task.cancel_forced")]
    TaskCancelForced,
    #[serde(rename = "task.cancel_failed")]
    TaskCancelFailed,
    #[serde(rename = "task.succeeded")]
    TaskSucceeded,
    #[serde(rename = "task.failed")]
    TaskFailed,
    #[serde(rename = "task.timed_out")]
    TaskTimedOut,
    #[serde(rename = "task.canceled")]
    TaskCanceled,
    #[serde(rename = "task.lock_acquired")]
    TaskLockAcquired,
    #[serde(rename = "task.lock_released")]
    TaskLockReleased,
    #[serde(rename = "run.created")]
    RunCreated,
    #[serde(rename = "run.abort_requested")]
    RunAbortRequested,
    #[serde(rename = "run.finished")]
    RunFinished,
}

impl EventKind {
    pub const ALL: [EventKind; 18] = [
        EventKind::TaskQueued,
        EventKind::TaskStarted,
        EventKind::TaskLog,
        EventKind::TaskProgress,
        EventKind::TaskCheckpoint,
        EventKind::TaskCancelRequested,
        EventKind::TaskCancelAcknowledged,
        EventKind::TaskCancelForced,
        EventKind::TaskCancelFailed,
        EventKind::TaskSucceeded,
        EventKind::TaskFailed,
        EventKind::TaskTimedOut,
        EventKind::TaskCanceled,
        EventKind::TaskLockAcquired,
        EventKind::TaskLockReleased,
        EventKind::RunCreated,
        EventKind::RunAbortRequested,
        EventKind::RunFinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskQueued => "task.queued",
            EventKind::TaskStarted => "task.started",
            EventKind::TaskLog => "task.log",
            EventKind::TaskProgress => "task.progress",
            EventKind::TaskCheckpoint => "task.checkpoint",
            EventKind::TaskCancelRequested => "task.cancel_requested",
            EventKind::TaskCancelAcknowledged => "task.cancel_acknowledged",
            EventKind::TaskCancelForced => "task.cancel_forced",
            EventKind::TaskCancelFailed => "task.cancel_failed",
            EventKind::TaskSucceeded => "task.succeeded",
            EventKind::TaskFailed => "task.failed",
            EventKind::TaskTimedOut => "task.timed_out",
            EventKind::TaskCanceled => "task.canceled",
            EventKind::TaskLockAcquired => "task.lock_acquired",
            EventKind::TaskLockReleased => "task.lock_released",
            EventKind::RunCreated => "run.created",
            EventKind::RunAbortRequested => "run.abort_requested",
            EventKind::RunFinished => "run.finished",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|kind| kind.as_str() == s)
    }

    /// The event that announces a terminal state.
    pub fn for_terminal(state: TaskState) -> Option<EventKind> {
        Some(match state {
            TaskState::Succeeded => EventKind::TaskSucceeded,
            TaskState::Failed => EventKind::TaskFailed,
            TaskState::TimedOut => EventKind::TaskTimedOut,
            TaskState::Canceled => EventKind::TaskCanceled,
            _ => return None,
        })
    }
}

/// One entry of the event trail. `seq` orders all events of a database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub kind: EventKind,
    pub at: UnixMillis,
    pub data: serde_json::Value,
}

/// An event not yet stored (the database assigns `seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub task_id: Option<String>,
    pub run_id: Option<String>,
    pub kind: EventKind,
    pub at: UnixMillis,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn task(task_id: &str, kind: EventKind, data: serde_json::Value) -> NewEvent {
        NewEvent {
            task_id: Some(task_id.to_owned()),
            run_id: None,
            kind,
            at: now_millis(),
            data,
        }
    }
}

/// How a task ended, as the executor reports it to the database.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// The state the executor concluded (`succeeded`, `failed`, `timed_out`
    /// or `canceled`). The database may still turn `failed`/`timed_out` into
    /// `canceled` when a cancel was recorded first (races are decided in one
    /// transaction).
    pub state: TaskState,
    pub finished_at: UnixMillis,
    pub output: Option<serde_json::Value>,
    pub partial_output: Option<serde_json::Value>,
    pub progress: Option<Progress>,
    pub error: Option<TaskError>,
    pub exit_code: Option<i32>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub usage: Usage,
    /// Filled when the executor stopped the guest because of a cancel.
    pub cancel_stopped: Option<CancelStop>,
}

/// How a cancel ended, as observed by the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelStop {
    pub stopped_at: UnixMillis,
    pub acknowledged: bool,
    pub forced: bool,
    pub latency_us: u64,
}

// ---------------------------------------------------------------------------
// API shapes: what clients send and get back over HTTP (see docs/api.md).
// The server, the service and the CLI client share them.
// ---------------------------------------------------------------------------

/// What to do with a streamed submission when its client goes away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Cancel the task (reason `client_disconnected`). The default for streams.
    #[default]
    Cancel,
    /// Let it run; its record and events stay queryable.
    Detach,
}

/// `POST /v1/tasks` body, and each task of `POST /v1/runs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSubmit {
    /// Plugin name or id (`sha256:…`).
    pub plugin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<DirSpec>,
    /// The guest's working directory (a guest path). Default: none (`/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<String>,
    /// Attempts allowed (a host restart re-queues while attempts remain). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// `POST /v1/tasks` only: add the task to this (running) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Run tasks only: this task's key within the run, and the keys it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Answer with an SSE stream of the task's events instead of the record.
    #[serde(default)]
    pub stream: bool,
    /// For streamed submissions: what a client disconnect does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_disconnect: Option<OnDisconnect>,
    /// Run tasks only: how the run's workspace is mounted. Default `ro`
    /// (when the run has a workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceAccess>,
}

/// How a step sees its run's workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceAccess {
    /// Read-only (the default).
    Ro,
    /// Read-write.
    Rw,
    /// Not mounted.
    None,
}

/// When a run's workspace copy is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceCleanup {
    /// Whatever the outcome (also when aborted). The default.
    #[default]
    Always,
    /// Only when the run succeeded; kept for inspection otherwise.
    OnSuccess,
    /// Never.
    Never,
}

/// A run's workspace: a directory its steps share (mounted at `guest`, the
/// default working directory of steps that mount it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Copy this host directory (absolute, under an allowed directory) into
    /// a fresh directory owned by the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Or use this host directory (absolute, under an allowed directory) in
    /// place; it is never deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Where steps see it. Default `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// When a copied workspace is deleted. Default `always`.
    #[serde(default)]
    pub cleanup: WorkspaceCleanup,
}

impl TaskSubmit {
    /// The stored spec of this submission.
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            input: self.input.clone(),
            args: self.args.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stdin: self.stdin.clone(),
            dirs: self.dirs.clone(),
            cwd: self.cwd.clone(),
            limits: self.limits.clone(),
            grace_ms: self.grace_ms,
            locks: self.locks.clone(),
            key: self.key.clone(),
            needs: self.needs.clone(),
        }
    }
}

/// `POST /v1/runs` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSubmit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When a task fails, abort the rest of the run.
    #[serde(default)]
    pub fail_fast: bool,
    /// Each with a unique `key`; `needs` name other keys of this run.
    pub tasks: Vec<TaskSubmit>,
    /// A directory the run's tasks share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,
    /// Abort the run (as failed) when it has not ended after this long, in
    /// milliseconds. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/tasks/{id}/cancel` body (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Grace before a forced stop; default: the task's own `grace_ms`, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    /// Wait up to this long for the task to reach `canceled` (then 200, else 202).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `POST /v1/runs/{id}/abort` body: the same fields as a cancel, applied to
/// every task of the run (`wait_ms` waits for all of them).
pub type AbortBody = CancelBody;

/// States of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Abort requested; tasks are being stopped.
    Aborting,
    Succeeded,
    Failed,
    Aborted,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Aborting => "aborting",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        [
            RunState::Running,
            RunState::Aborting,
            RunState::Succeeded,
            RunState::Failed,
            RunState::Aborted,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Aborted
        )
    }
}

/// A run as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: RunState,
    pub fail_fast: bool,
    pub created_at: UnixMillis,
    pub finished_at: Option<UnixMillis>,
    /// Set once an abort was requested (explicitly, or by fail-fast).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<RunAbort>,
    /// The run is aborted when it has not ended this long after its
    /// creation (kept across restarts of the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The run's workspace as prepared: where it is on the host and what
    /// becomes of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<RunWorkspace>,
}

/// A run's prepared workspace, as stored with the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunWorkspace {
    /// The host directory the run's tasks mount.
    pub host: String,
    /// Where they see it.
    pub guest: String,
    /// Whether it is the run's own copy (deleted per `cleanup`), rather than
    /// a directory used in place (never deleted).
    pub owned: bool,
    pub cleanup: WorkspaceCleanup,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAbort {
    pub actor: String,
    pub reason: String,
    pub requested_at: UnixMillis,
}

/// A run with its tasks (`GET /v1/runs/{id}`, `POST /v1/runs`, abort).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub run: RunRecord,
    pub tasks: Vec<TaskRecord>,
}

/// The API's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable, machine-readable (`not_found`, `task_finished`, `invalid_spec`, …).
    pub code: String,
    pub message: String,
    /// For `task_finished` (409): the unchanged record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Box<TaskRecord>>,
}
