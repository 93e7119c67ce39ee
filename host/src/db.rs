//! The database layer: plugins, runs, tasks, cancel records and the event
//! trail, stored durably in one SQLite file.
//!
//! # Model and invariants
//!
//! - **One writer.** A dedicated OS thread (`db/writer.rs`) owns the only
//!   read-write connection. Callers send it a job over a bounded channel and
//!   await a one-shot reply; nothing here blocks a tokio worker thread. The
//!   replies wake their callers through the runtime's wake relay
//!   (`wasmtask_runtime::wake`): a commit's replies reach the tokio runtime
//!   as one I/O event instead of a remote wake each.
//! - **Group commit.** The writer drains every queued job (up to
//!   [`MAX_BATCH`]) into ONE `BEGIN IMMEDIATE` transaction. A job that
//!   fails leaves no trace and the others in the batch still commit: most
//!   failures happen before any row changed, and a job that fails after
//!   changing rows makes the writer run the batch again with a `SAVEPOINT`
//!   per job (so a job may run twice; only the committed run is answered).
//!   Replies are sent only after `COMMIT` returned, so **anything
//!   acknowledged is durable**.
//!   Jobs in one batch run in arrival order and see each other's effects, so
//!   the batch is equivalent to running them one by one.
//! - **Races are decided in one transaction.** `mark_started`,
//!   `request_cancel`, `finish` and `recover` each read the current row and
//!   decide inside the writer's transaction, so two of them can never
//!   interleave: a completion committed before a cancel stays `succeeded`; a
//!   cancel recorded first turns a later `failed`/`timed_out` into `canceled`.
//! - **Lifecycle events share the transaction of the change they announce.**
//!   `task.queued`, `task.started`, `task.cancel_requested`,
//!   `task.cancel_acknowledged`, `task.cancel_forced`, the terminal events,
//!   `run.created`, `run.abort_requested` and `run.finished` are written only
//!   by this module, next to the state change; callers may not append them
//!   through [`Db::append_events`]. A reader therefore never sees a terminal
//!   state without its event, nor the reverse.
//! - **Event watch.** [`Db::watch_events`] carries the highest committed
//!   event `seq`; the writer raises it only after the commit that stored the
//!   events, so a stream woken by it always finds them (no polling needed).
//! - **Reads run beside the writer.** WAL mode lets readers see the last
//!   committed state while the writer works. Reads run on
//!   `tokio::task::spawn_blocking` with a small pool of read-only
//!   connections (`db/readers.rs`); at most [`DbOptions::readers`] run at
//!   once, the rest wait for a connection. A task row and its cancel record
//!   are read in one statement (a join), so they are always consistent with
//!   each other.
//! - **One row per task** holds its *current* attempt. `mark_started` clears
//!   the previous attempt's outcome fields; the event trail keeps the history.
//! - A terminal state never changes again: `finish` on a terminal task returns
//!   it unchanged, and progress/checkpoint events for it are stored as events
//!   but no longer touch the row.
//!
//! # Durability: WAL with `synchronous = NORMAL`
//!
//! The product promise (DESIGN §7) is that *an abrupt kill of the process
//! loses no acknowledged submission*. In WAL mode a commit appends the
//! transaction to the `-wal` file with `write(2)` before `COMMIT` returns;
//! with `synchronous = NORMAL` SQLite skips the `fsync` at each commit and
//! syncs only at checkpoints — which run on a thread of their own
//! (`db/checkpoint.rs`), never inside a commit on the writer. Once
//! `write(2)` returned, the data is in the kernel's page cache, which
//! survives the death of the process (SIGKILL, OOM kill, abort): the next
//! open replays the WAL. So a process kill loses
//! nothing that was acknowledged. What `NORMAL` does **not** survive is a
//! power loss or kernel crash: the last transactions before it may be rolled
//! back (the database stays consistent, never corrupt). Operators who need
//! that guarantee set [`DbOptions::power_safe`], which selects
//! `synchronous = FULL` (an `fsync` of the WAL per commit — per *batch*,
//! thanks to group commit, so the cost is shared by every job in it).
//!
//! # Errors
//!
//! This is a library boundary, so errors are typed ([`DbError`]): callers map
//! `TaskNotFound`/`RunNotFound` to 404, `BadCursor` to 400,
//! `CancelNotRequested`/`NotTerminal`/`RunNotTerminal` to programming errors,
//! and everything else to 500, without parsing messages. Outcomes that
//! are not errors for the caller (a cancel of a finished task, a start of a
//! canceled task, an abort of a finished run) are variants of
//! [`CancelDecision`], [`StartDecision`] and [`RunAbortDecision`].
//!
//! # Cancellation safety
//!
//! Dropping the future of a write after it was queued does not undo the
//! write: the job still runs and commits; only the reply is lost.

mod checkpoint;
mod events;
mod ids;
mod plugins;
mod readers;
mod runs;
mod schema;
mod tasks;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::model::{
    Event, Finish, NewEvent, PluginKind, RunRecord, RunState, RunView, RunWorkspace, TaskRecord,
    TaskSpec, TaskState, UnixMillis,
};

pub use events::{MAX_EVENT_DATA_BYTES, MAX_EVENT_MESSAGE_BYTES, MAX_EVENTS_PAGE};
pub use ids::{is_run_id, new_run_id, new_task_id};
pub use runs::{DEFAULT_RUNS_PAGE, MAX_RUNS_PAGE};
pub use tasks::{
    DEFAULT_TASKS_PAGE, MAX_ERROR_TEXT_BYTES, MAX_PARTIAL_OUTPUT_BYTES, MAX_TASKS_PAGE,
};
pub use writer::MAX_BATCH;

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("task {0} not found")]
    TaskNotFound(String),
    #[error("task {0} already exists")]
    TaskExists(String),
    #[error("plugin {0} not found")]
    PluginNotFound(String),
    #[error("run {0} not found")]
    RunNotFound(String),
    #[error("run {0} already exists")]
    RunExists(String),
    /// `finish` was asked to end a task as `canceled` although no cancel was
    /// recorded: the caller must `request_cancel` first, so the cancel record
    /// (who, why) exists.
    #[error("task {0} cannot finish as canceled: no cancel was requested")]
    CancelNotRequested(String),
    /// `finish` was given a state that is not terminal.
    #[error("task {id} cannot finish in state {state}: not a terminal state")]
    NotTerminal { id: String, state: TaskState },
    /// `finish_run` was given a state that is not terminal.
    #[error("run {id} cannot finish in state {}: not a terminal state", .state.as_str())]
    RunNotTerminal { id: String, state: RunState },
    /// `append_events` was given an event that only the database writes,
    /// together with the state change it announces.
    #[error("event {kind} is written by the database itself and cannot be appended")]
    ReservedEvent { kind: &'static str },
    /// The paging cursor names a task (or, for `list_runs`, a run) that does
    /// not exist.
    #[error("cursor {0} not found")]
    BadCursor(String),
    #[error("cannot create database directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The database refused WAL mode (e.g. an in-memory database).
    #[error("database {path} cannot use WAL mode (journal mode is {mode})")]
    NoWal { path: PathBuf, mode: String },
    /// The file was migrated by a newer build of wasmtask.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A stored value cannot be decoded (hand-edited or written by a newer build).
    #[error("stored {what} of {id} is invalid: {detail}")]
    Corrupt {
        id: String,
        what: &'static str,
        detail: String,
    },
    #[error("cannot encode {what} as json: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The batch transaction this write was part of failed as a whole (at
    /// `COMMIT`, or SQLite rolled it back after an I/O error or a full disk):
    /// the write was not stored.
    #[error("the write transaction failed: {0}")]
    TransactionFailed(String),
    /// A database job panicked; its changes were rolled back.
    #[error("a database job panicked")]
    JobPanicked,
    #[error("cannot start the database writer thread: {0}")]
    WriterThread(std::io::Error),
    /// The writer thread is gone (it only stops when every `Db` is dropped,
    /// so this means a bug or a process shutting down).
    #[error("the database writer has stopped")]
    WriterStopped,
    /// A blocking database task (a read, or opening the file) could not run
    /// or panicked.
    #[error("a blocking database task failed: {0}")]
    Blocking(String),
}

/// Result of the database layer.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Knobs of the database. `Default` is what `wasmtask serve` uses.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `false` (default): `synchronous = NORMAL` — survives a process kill,
    /// may lose the last commits on power loss (see the module docs).
    /// `true`: `synchronous = FULL` — one `fsync` per committed batch, survives
    /// power loss too, at the cost of commit latency (one disk flush).
    pub power_safe: bool,
    /// How long a connection waits for a lock held by another connection or
    /// process before failing with `SQLITE_BUSY`. Default 5 s. Inside one
    /// process only the writer takes write locks, so this matters when a second
    /// process (e.g. `wasmtask run` beside a server) shares the file.
    pub busy_timeout: Duration,
    /// Read connections, opened on first use and kept for reuse: at most this
    /// many reads run at once, on blocking threads; further reads wait
    /// (asynchronously) for a connection. Default 4. A read is a few
    /// hundred microseconds at most, so waiting is cheaper than what the
    /// unbounded alternative cost under load: a fresh connection per burst
    /// read (opening one parses the schema) on a fresh blocking thread.
    pub readers: usize,
    /// Writes that may wait for the writer before `send` makes callers wait
    /// (backpressure). Default 4096 jobs. At the limit callers await a free
    /// slot; nothing is dropped.
    pub write_queue: usize,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            power_safe: false,
            busy_timeout: Duration::from_secs(5),
            readers: 4,
            write_queue: 4096,
        }
    }
}

/// A run as the dispatcher sees it ([`Db::run_gate`]): its record, and the
/// state of each of its tasks by key.
#[derive(Debug, Clone, PartialEq)]
pub struct RunGate {
    pub run: RunRecord,
    pub states: std::collections::HashMap<String, TaskState>,
}

/// A queued task as the dispatcher reads it ([`Db::queued_for_dispatch`]):
/// only what deciding whether to start it takes. Starting it returns the
/// whole record ([`Db::mark_started`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedTask {
    pub id: String,
    pub plugin_name: String,
    pub run_id: Option<String>,
    /// Its spec's lock keys.
    pub locks: Vec<String>,
    /// Its spec's `needs` (keys of tasks of its run).
    pub needs: Vec<String>,
}

/// A run's progress as counted in the database ([`Db::run_progress`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunProgress {
    pub run: RunRecord,
    pub total: u64,
    /// Tasks `queued`, `running` or `cancel_requested`.
    pub unfinished: u64,
    pub succeeded: u64,
    /// The first task, in finishing order, that failed, timed out, or was
    /// canceled by anyone but its run (`run`, `fail_fast`).
    pub first_failure: Option<RunFailure>,
}

/// A task whose end trips a run's fail-fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFailure {
    pub task_id: String,
    pub key: Option<String>,
    pub state: TaskState,
}

/// A stored plugin: a component known by its content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRow {
    /// Content digest of the component bytes, lowercase hex.
    pub id: String,
    pub name: String,
    pub kind: PluginKind,
    pub size_bytes: u64,
    pub created_at: UnixMillis,
}

/// A run to create (state `running`): a group of tasks that can be aborted
/// together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    /// Usually [`new_run_id`].
    pub id: String,
    pub name: Option<String>,
    /// When a task fails, abort the rest (recorded; the service acts on it).
    pub fail_fast: bool,
    pub created_at: UnixMillis,
    /// Abort the run when it has not ended this long after `created_at`.
    pub timeout_ms: Option<u64>,
    pub workspace: Option<RunWorkspace>,
}

/// An abort of a run, as asked by a user or by fail-fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAbortRequest {
    /// Who asks (`api:<token>`, `cli`, `fail_fast`, …). Capped at
    /// [`MAX_ACTOR_BYTES`].
    pub actor: String,
    /// Why, for humans. Capped at [`MAX_REASON_BYTES`].
    pub reason: String,
    pub requested_at: UnixMillis,
}

/// What `request_run_abort` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum RunAbortDecision {
    /// No run has this id.
    NotFound,
    /// The run had already ended; the record is unchanged.
    AlreadyFinished(RunRecord),
    /// The run is now (or already was) `aborting`; `run.abort` is the stored
    /// abort. The caller stops dispatching and cancels the run's tasks.
    Requested {
        run: RunRecord,
        /// This request recorded the abort (`false`: a repeat, which returns
        /// the stored abort — original actor, reason, requested_at).
        first: bool,
    },
}

/// A task to insert in state `queued`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Usually [`new_task_id`].
    pub id: String,
    /// Must name a stored plugin.
    pub plugin_id: String,
    pub plugin_name: String,
    pub plugin_kind: PluginKind,
    /// Must name a stored run when set ([`Db::insert_run`] sets it to its run).
    pub run_id: Option<String>,
    pub spec: TaskSpec,
    /// Attempts allowed, at least 1 (0 is stored as 1). A task interrupted by
    /// a host restart is re-queued while `attempt < max_attempts`.
    pub max_attempts: u32,
    pub queued_at: UnixMillis,
}

/// A cancel as asked by a user, a signal or a disconnecting client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    /// Who asks (`cli`, `signal:SIGINT`, `api:<token>`, …). Capped at
    /// [`MAX_ACTOR_BYTES`].
    pub actor: String,
    /// Why, for humans. Capped at [`MAX_REASON_BYTES`].
    pub reason: String,
    /// Grace before a forced stop (the caller resolves the task's default).
    pub grace_ms: u64,
    pub requested_at: UnixMillis,
}

/// Longest stored cancel actor, in bytes (longer ones are cut at a character boundary).
pub const MAX_ACTOR_BYTES: usize = 256;
/// Longest stored cancel reason, in bytes (longer ones are cut at a character boundary).
pub const MAX_REASON_BYTES: usize = 1024;

/// What `mark_started` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum StartDecision {
    /// The task was `queued` and is now `running` (attempt incremented).
    Started(TaskRecord),
    /// The task is no longer `queued` (typically canceled before it started):
    /// it must not run. The record is unchanged.
    NotStartable(TaskRecord),
}

/// What `request_cancel` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelDecision {
    /// No task has this id.
    NotFound,
    /// The task had already ended; the record is unchanged.
    AlreadyFinished(TaskRecord),
    /// The task was `queued`: it is now `canceled` and will never start.
    CanceledBeforeStart(TaskRecord),
    /// The task is running and now (or already) `cancel_requested`; the
    /// executor must stop it. `record.cancel` is the stored cancel record.
    Requested {
        record: TaskRecord,
        /// This request created the cancel record (`false`: a repeat, which
        /// returns the stored record — original actor, reason, requested_at).
        first: bool,
        /// A repeat asked for a shorter grace than stored: the stored
        /// `grace_ms` was lowered to it (e.g. 0 = force now), and the executor
        /// must apply the new deadline.
        escalated: bool,
    },
}

/// Which tasks `list_tasks` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub run_id: Option<String>,
    /// Plugin name.
    pub plugin: Option<String>,
    /// Page size: default [`DEFAULT_TASKS_PAGE`], at most [`MAX_TASKS_PAGE`].
    pub limit: Option<usize>,
    /// Keyset cursor: the id of the last task of the previous page. The page
    /// holds the tasks after it in listing order.
    pub cursor: Option<String>,
    /// List oldest first (queue order) instead of newest first.
    pub oldest_first: bool,
}

/// What `recover` settled, by task id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Were `running`, had attempts left: back to `queued`.
    pub requeued: Vec<String>,
    /// Were `running`, no attempts left: `failed` with `host_restart`.
    pub failed: Vec<String>,
    /// Were `cancel_requested`: `canceled` (forced, reason `host_restart`).
    pub canceled: Vec<String>,
}

/// Counters of the writer, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Transactions committed.
    pub batches: u64,
    /// Jobs in committed transactions (including jobs that failed, whose
    /// changes were undone).
    pub jobs: u64,
    /// Transactions that failed as a whole.
    pub failed_batches: u64,
    /// Transactions rolled back and run again with a savepoint per job,
    /// because a job failed after changing rows.
    pub redone_batches: u64,
    /// Times the checkpointer held the writer between two transactions to
    /// start the WAL over (the job in hand waited meanwhile).
    pub pauses: u64,
    /// Total and longest time held, in microseconds.
    pub paused_us: u64,
    pub paused_max_us: u64,
    /// Jobs waiting for the writer right now.
    pub queued: usize,
}

/// Handle to the database. Cheap to clone; all clones share one writer and
/// one read pool. The writer thread ends (after finishing queued jobs) when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<Box<dyn writer::Job>>,
    stats: Arc<writer::Stats>,
    /// Highest committed event `seq`, published by the writer after each commit.
    last_seq: Arc<watch::Sender<i64>>,
    readers: Arc<readers::Readers>,
    path: PathBuf,
    /// This database's random id, made with it (schema version 6).
    instance: String,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Db {
    /// Opens (creating it and its parent directories if needed) the database
    /// at `path` with default [`DbOptions`], migrates it and starts the writer.
    pub async fn open(path: &Path) -> Result<Db> {
        Db::open_with(path, DbOptions::default()).await
    }

    /// [`Db::open`] with explicit options.
    pub async fn open_with(path: &Path, options: DbOptions) -> Result<Db> {
        let path = path.to_path_buf();
        let opened = {
            let path = path.clone();
            let options = options.clone();
            tokio::task::spawn_blocking(move || -> Result<(Connection, i64, String)> {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|source| DbError::CreateDir {
                        path: parent.to_path_buf(),
                        source,
                    })?;
                }
                let mut conn = schema::open_writer(&path, &options)?;
                schema::migrate(&mut conn)?;
                schema::disable_autocheckpoint(&conn)?;
                let last_seq = writer::max_event_seq(&conn)?;
                let instance = schema::instance(&conn)?;
                Ok((conn, last_seq, instance))
            })
            .await
            .map_err(|e| DbError::Blocking(e.to_string()))??
        };
        let (opened, last_seq, instance) = opened;
        let stats = Arc::new(writer::Stats::default());
        let last_seq = Arc::new(watch::Sender::new(last_seq));
        let pause = Arc::new(writer::Pause::default());
        let sender = writer::spawn(
            opened,
            options.write_queue.max(1),
            stats.clone(),
            last_seq.clone(),
            pause.clone(),
        )?;
        let readers = Arc::new(readers::Readers::new(path.clone(), &options));
        let checkpointer = checkpoint::spawn(path.clone(), &options, pause)?;
        Ok(Db {
            inner: Arc::new(Inner {
                _checkpointer: checkpointer,
                writer: sender,
                stats,
                last_seq,
                readers,
                path,
                instance,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// This database's instance id: random, made once with the database, and
    /// the same for every process that opens it.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Writer counters (group-commit batch sizes, queue depth).
    pub fn write_stats(&self) -> WriteStats {
        let queued = self.inner.writer.max_capacity() - self.inner.writer.capacity();
        self.inner.stats.snapshot(queued)
    }

    /// Stores a plugin's content (if new) and registers its name as of
    /// `created_at`; the content's other names are kept, and registering the
    /// same name and content again makes it that name's newest.
    pub async fn upsert_plugin(&self, p: PluginRow) -> Result<()> {
        self.write(move |conn| plugins::upsert(conn, &p)).await
    }

    /// A plugin by digest, or else the newest plugin with that name.
    pub async fn get_plugin(&self, id_or_name: &str) -> Result<Option<PluginRow>> {
        let key = id_or_name.to_owned();
        self.read(move |conn| plugins::get(conn, &key)).await
    }

    /// Every name registration, by name, newest first within a name.
    pub async fn list_plugins(&self) -> Result<Vec<PluginRow>> {
        self.read(plugins::list).await
    }

    /// Watches the event trail: the value is the highest event `seq`
    /// committed so far (the last one stored when the database was opened,
    /// 0 for none). The writer raises it after each transaction that wrote
    /// events has committed, never before, and it never goes down: after
    /// seeing `N`, [`Db::events`] and [`Db::run_events`] return every event
    /// with `seq <= N`. Values may be skipped (one update per committed batch);
    /// read the events after your last `seq`, not `N` alone. Events written by
    /// another process sharing the file show up with this process's next write.
    pub fn watch_events(&self) -> watch::Receiver<i64> {
        self.inner.last_seq.subscribe()
    }

    /// Creates a run (state `running`) with its tasks in ONE transaction: the
    /// run and its `run.created` event, then every task (`queued`, its
    /// `run_id` set to this run whatever it named) with its `task.queued`
    /// event, in the order given. All or nothing: an unknown plugin, a
    /// duplicate task id or an existing run id stores none of it. When this
    /// returns, the run is durable; the tasks come back in the order given.
    pub async fn insert_run(&self, run: NewRun, tasks: Vec<NewTask>) -> Result<RunView> {
        self.write(move |conn| runs::insert(conn, &run, &tasks))
            .await
    }

    /// A run by id.
    pub async fn get_run(&self, id: &str) -> Result<Option<RunRecord>> {
        let id = id.to_owned();
        self.read(move |conn| runs::get(conn, &id)).await
    }

    /// A run and all its tasks, ordered by `queued_at` and then insertion
    /// order (so the order [`Db::insert_run`] was given, even within one
    /// millisecond), read from one snapshot.
    pub async fn run_view(&self, id: &str) -> Result<Option<RunView>> {
        let id = id.to_owned();
        self.read(move |conn| runs::view(conn, &id)).await
    }

    /// A run and the state of each of its tasks by key, without decoding
    /// the tasks (what starting a task with `needs` depends on).
    pub async fn run_gate(&self, id: &str) -> Result<Option<RunGate>> {
        let id = id.to_owned();
        self.read(move |conn| runs::gate(conn, &id)).await
    }

    /// A run's state, its task counts and its first fail-fast-tripping task,
    /// without reading its tasks (see [`RunProgress`]).
    pub async fn run_progress(&self, id: &str) -> Result<Option<RunProgress>> {
        let id = id.to_owned();
        self.read(move |conn| runs::progress(conn, &id)).await
    }

    /// Runs newest first (by `created_at`, then id), one page at a time:
    /// `limit` defaults to [`DEFAULT_RUNS_PAGE`] and is capped at
    /// [`MAX_RUNS_PAGE`] (0 returns nothing); `cursor` is the id of the last
    /// run of the previous page ([`DbError::BadCursor`] if unknown).
    pub async fn list_runs(
        &self,
        limit: Option<usize>,
        cursor: Option<String>,
    ) -> Result<Vec<RunRecord>> {
        self.read(move |conn| runs::list(conn, limit, cursor.as_deref()))
            .await
    }

    /// Which of `ids` name a run of this database.
    pub async fn existing_runs(&self, ids: Vec<String>) -> Result<HashSet<String>> {
        self.read(move |conn| runs::existing(conn, ids)).await
    }

    /// Runs not yet finished (`running` or `aborting`), oldest first: what a
    /// starting server must drive to an end.
    pub async fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        self.read(runs::unfinished).await
    }

    /// Records an abort of a run and decides what it means, in one
    /// transaction (see [`RunAbortDecision`]): `running` becomes `aborting`
    /// with the abort record and a `run.abort_requested {actor, reason}`
    /// event; a repeat on an `aborting` run returns the stored abort
    /// (`first: false`) and writes nothing. The run's tasks are not touched:
    /// the caller cancels them.
    pub async fn request_run_abort(
        &self,
        id: &str,
        req: RunAbortRequest,
    ) -> Result<RunAbortDecision> {
        let id = id.to_owned();
        self.write(move |conn| runs::request_abort(conn, &id, &req))
            .await
    }

    /// Ends a run in `state` (`succeeded`, `failed` or `aborted`, else
    /// [`DbError::RunNotTerminal`]) with a `run.finished {state}` event.
    /// A finished run is returned unchanged, without an event (idempotent);
    /// an unknown one is [`DbError::RunNotFound`]. The state is the caller's
    /// verdict: it is not checked against the run's tasks or abort.
    pub async fn finish_run(
        &self,
        id: &str,
        state: RunState,
        finished_at: UnixMillis,
    ) -> Result<RunRecord> {
        let id = id.to_owned();
        self.write(move |conn| runs::finish(conn, &id, state, finished_at))
            .await
    }

    /// Inserts a `queued` task and its `task.queued` event in one transaction.
    /// When this returns, the submission is durable.
    pub async fn insert_task(&self, t: NewTask) -> Result<TaskRecord> {
        self.write(move |conn| tasks::insert(conn, &t)).await
    }

    /// `queued → running`: increments `attempt`, sets `started_at`, clears the
    /// previous attempt's outcome and writes `task.started {attempt}`. A task
    /// that is not `queued` (canceled before start, already running) is left
    /// alone and returned as `NotStartable`: the caller must not run it.
    pub async fn mark_started(&self, id: &str) -> Result<StartDecision> {
        let id = id.to_owned();
        self.write(move |conn| tasks::mark_started(conn, &id)).await
    }

    /// Records a cancel and decides what it means for the task, in one
    /// transaction (see [`CancelDecision`]).
    pub async fn request_cancel(&self, id: &str, req: CancelRequest) -> Result<CancelDecision> {
        let id = id.to_owned();
        self.write(move |conn| tasks::request_cancel(conn, &id, &req))
            .await
    }

    /// [`Db::request_cancel`] in two steps: when this returns, the job is in
    /// the writer's queue, so every write queued after it (such as the task's
    /// own end) is decided after it; the returned future gives the decision
    /// once it is committed. This lets a caller stop the guest while the
    /// record commits.
    pub async fn enqueue_cancel(
        &self,
        id: &str,
        req: CancelRequest,
    ) -> Result<impl std::future::Future<Output = Result<CancelDecision>> + use<>> {
        let id = id.to_owned();
        self.enqueue(move |conn| tasks::request_cancel(conn, &id, &req))
            .await
    }

    /// Ends a task, deciding the race with a cancel in one transaction:
    ///
    /// - a terminal task is returned unchanged (idempotent);
    /// - with a cancel recorded, `failed`/`timed_out` become `canceled` (the
    ///   error stays in `error`), `succeeded` stays `succeeded` (the
    ///   completion beat the cancel) and `canceled` stays;
    /// - `canceled` without a recorded cancel is [`DbError::CancelNotRequested`];
    /// - the cancel record gets `f.cancel_stopped`, or else stopped = finished,
    ///   neither acknowledged nor forced.
    ///
    /// Writes `task.cancel_acknowledged` / `task.cancel_forced` when a cancel
    /// stopped the guest, then the terminal event.
    pub async fn finish(&self, id: &str, f: Finish) -> Result<TaskRecord> {
        self.finish_with_events(id, f, Vec::new()).await
    }

    /// [`Db::finish`], storing `events` (the guest's last, not yet stored)
    /// first, in the same transaction.
    pub async fn finish_with_events(
        &self,
        id: &str,
        f: Finish,
        events: Vec<NewEvent>,
    ) -> Result<TaskRecord> {
        let id = id.to_owned();
        self.write(move |conn| {
            events::append(conn, &events)?;
            tasks::finish(conn, &id, &f)
        })
        .await
    }

    /// Appends events in one transaction. `task.progress` events also set the
    /// task's latest progress (`fraction`, `message`); `task.checkpoint`
    /// events with a `partial_output` field set its partial output. Data is
    /// bounded (see [`MAX_EVENT_DATA_BYTES`]). Task events without a `run_id`
    /// get the task's. Lifecycle events are refused ([`DbError::ReservedEvent`]).
    /// All or nothing: one refused event (reserved kind, unknown task or run)
    /// stores none of the batch.
    pub async fn append_events(&self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(move |conn| events::append(conn, &events)).await
    }

    pub async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let id = id.to_owned();
        self.read(move |conn| tasks::load(conn, &id)).await
    }

    /// How many tasks are in each state, for metrics: every state of
    /// [`TaskState::ALL`], in that order, zeros included.
    pub async fn count_tasks_by_state(&self) -> Result<Vec<(TaskState, u64)>> {
        self.read(tasks::count_by_state).await
    }

    /// Tasks matching `filter`, newest first (by `queued_at`, then id) unless
    /// `oldest_first`, one page at a time (keyset paging on `cursor`).
    pub async fn list_tasks(&self, filter: TaskFilter) -> Result<Vec<TaskRecord>> {
        self.read(move |conn| tasks::list(conn, &filter)).await
    }

    /// Queued tasks for the dispatcher, oldest first, among the oldest
    /// `scan`: ids in `skip` are passed over undecoded, and the read stops
    /// once `want` tasks without locks or needs were found (tasks with
    /// either are returned too, without counting).
    pub async fn queued_for_dispatch(
        &self,
        scan: usize,
        want: usize,
        skip: std::collections::HashSet<String>,
    ) -> Result<Vec<QueuedTask>> {
        self.read(move |conn| tasks::queued_for_dispatch(conn, scan, want, &skip))
            .await
    }

    /// Events with `seq > after_seq`, oldest first, of one task or of all
    /// (`task_id = None`); at most `limit` (capped at [`MAX_EVENTS_PAGE`];
    /// 0 returns nothing). Resume a stream by passing the last `seq` seen.
    pub async fn events(
        &self,
        task_id: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let task_id = task_id.map(str::to_owned);
        self.read(move |conn| events::list_for_task(conn, task_id.as_deref(), after_seq, limit))
            .await
    }

    /// Events of one run (its own and its tasks'), like [`Db::events`].
    pub async fn run_events(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| events::list_for_run(conn, &run_id, after_seq, limit))
            .await
    }

    /// Settles what a previous process left behind, in one transaction:
    /// `running` tasks are re-queued when `attempt < max_attempts`, else
    /// `failed` with `host_restart`; `cancel_requested` tasks become
    /// `canceled` (forced, reason `host_restart`) and never run again.
    ///
    /// Call it once at start-up, before dispatching, and only from the process
    /// that executes this database's tasks: any task another live process is
    /// running would be settled under its feet.
    pub async fn recover(&self) -> Result<Recovery> {
        self.write(tasks::recover).await
    }

    /// Runs `work` in the writer's transaction and returns its result once
    /// the transaction committed. If `work` fails, its changes are undone;
    /// `work` may run more than once (see `writer`): only the run that was
    /// committed is answered.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        self.enqueue(work).await?.await
    }

    /// Puts `work` in the writer's queue; the future resolves once it is
    /// committed.
    async fn enqueue<T, F>(
        &self,
        work: F,
    ) -> Result<impl std::future::Future<Output = Result<T>> + use<T, F>>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        let relay = tokio::runtime::Handle::try_current()
            .ok()
            .and_then(|h| wasmtask_runtime::wake::relay_for(&h));
        let (reply, response) = wasmtask_runtime::wake::report_channel(relay);
        self.inner
            .writer
            .send(writer::job(work, reply))
            .await
            .map_err(|_| DbError::WriterStopped)?;
        Ok(async move { response.await.map_err(|_| DbError::WriterStopped)? })
    }

    /// Runs `work` on a pooled read connection on a blocking thread.
    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let readers = self.inner.readers.clone();
        let permit = readers
            .acquire()
            .await
            .map_err(|_| DbError::Blocking("the read pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            readers.with(work)
        })
        .await
        .map_err(|e| DbError::Blocking(e.to_string()))?
    }
}

/// Stores a `u64` in an INTEGER column (SQLite integers are signed 64-bit);
/// values beyond `i64::MAX` saturate.
fn to_sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads a `u64` stored by [`to_sql_u64`]; negative values read as 0.
fn from_sql_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn truncate_utf8(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}
