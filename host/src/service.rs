//! The task service behind `wasmtask serve`: submission, dispatch, cancel,
//! runs, locks and recovery. It knows the runtime (through [`exec`]) and the
//! database, and nothing of HTTP: the API layer (`api.rs`) turns requests
//! into calls here and [`ServiceError`]s into status codes.
//!
//! Who owns what:
//! - The **database** is the queue and the truth: a task is `queued` in
//!   SQLite before anyone hears of it; every state change is a committed
//!   transaction; races (cancel vs completion, cancel vs start) are decided
//!   there.
//! - The **service** keeps, in memory, only what belongs to this process:
//!   the tasks it is starting or running (with their cancel handles), the
//!   locks they hold, and the dispatcher's wake-up.
//!
//! Invariants:
//! - A task id is in `State::tasks` from just before `mark_started` until
//!   after its final state is committed. A cancel that finds the task
//!   `cancel_requested` in the database therefore finds it in the map too,
//!   unless it already ended; before the runtime handle exists, the cancel is
//!   parked in `pending` and applied the moment the guest is spawned.
//! - Locks are taken by the dispatcher before `mark_started` and given back
//!   as soon as the guest has stopped (`task.lock_released`), before the
//!   terminal state is written.
//! - Every path that ends a task of a run calls [`Service::run_progress`],
//!   which finishes the run once all its tasks are terminal, and applies
//!   `fail_fast`. Right after the run's final state is committed it applies
//!   the cleanup policy of the run's workspace (see `workspace.rs`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use wasmtask_runtime::{CancelHandle, LoadError, Plugin, Runtime};

use crate::builtin::{self, PluginRole};
use crate::db::{
    self, CancelDecision, CancelRequest, Db, DbError, NewRun, NewTask, PluginRow, RunAbortDecision,
    RunAbortRequest, StartDecision, TaskFilter,
};
use crate::exec::{self, LocalIo};
use crate::metrics::Metrics;
use crate::model::{
    DirSpec, ErrorKind, EventKind, Finish, NewEvent, PluginKind, RunRecord, RunState, RunSubmit,
    RunView, TaskError, TaskRecord, TaskSpec, TaskState, TaskSubmit, UnixMillis, WorkspaceAccess,
    now_millis,
};
use crate::workspace::Workspace;

/// Most tasks in one run.
pub const MAX_RUN_TASKS: usize = 1000;
/// Most lock keys per task, and the longest key.
pub const MAX_LOCKS: usize = 32;
pub const MAX_KEY_BYTES: usize = 256;
/// Most attempts a task may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// How often the dispatcher looks at the queue even without a wake-up (a
/// safety net; submissions and task ends wake it at once).
const DISPATCH_TICK: Duration = Duration::from_millis(500);
/// Queued tasks the dispatcher considers per pass.
const DISPATCH_BATCH: usize = 1000;
/// How long a submission may use a plugin row read earlier. This process's
/// own uploads clear the cache at once; the bound is for another process
/// registering a plugin in the same database file.
const PLUGIN_ROW_TTL: Duration = Duration::from_secs(1);

/// What the service needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Host directories (canonical) under which tasks may preopen `dirs`.
    /// Empty: no task may share a host directory.
    pub allowed_dirs: Vec<PathBuf>,
    /// Tasks started (running or waiting for a guest thread) at once; more stay
    /// `queued`.
    pub max_running: usize,
    /// Where uploaded components are kept (`<digest>.wasm`).
    pub plugin_dir: PathBuf,
    /// Also register the test fixtures (`spin-loop`, `mem-hog`, …) built
    /// into the binary, not only the examples.
    pub builtin_fixtures: bool,
    /// Where runs' workspace copies are made
    /// (`<workspace_dir>/<database instance>/<run id>`).
    pub workspace_dir: PathBuf,
}

/// Why a request to the service failed. The API maps each variant to a
/// stable error code and an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    UnknownPlugin(String),
    #[error("{0}")]
    InvalidPlugin(String),
    #[error("task {} already finished: {}", .0.id, .0.state)]
    TaskFinished(Box<TaskRecord>),
    #[error("run {} already finished: {}", .0.id, .0.state.as_str())]
    RunFinished(Box<RunRecord>),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<DbError> for ServiceError {
    fn from(e: DbError) -> ServiceError {
        ServiceError::Internal(e.into())
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// What a cancel did (the API answers 200 when `done`, else 202).
#[derive(Debug, Clone)]
pub struct CancelResult {
    pub task: TaskRecord,
    /// The task is in a terminal state.
    pub done: bool,
}

/// What an abort did.
#[derive(Debug, Clone)]
pub struct AbortResult {
    pub view: RunView,
    /// Every task of the run ended (and so did the run).
    pub done: bool,
}

/// Who asks for a cancel or an abort, and why.
#[derive(Debug, Clone)]
pub struct Cancel {
    pub actor: String,
    pub reason: Option<String>,
    pub grace_ms: Option<u64>,
    pub wait: Option<Duration>,
}

/// Where a plugin's bytes come from when a task needs it compiled.
#[derive(Debug, Clone)]
enum Source {
    Builtin(&'static [u8]),
    File(PathBuf),
}

/// A task this process is starting or running.
struct Entry {
    /// `None` until the guest is spawned.
    handle: Option<CancelHandle>,
    /// A cancel that arrived before the handle existed: (reason, grace).
    pending: Option<(String, Duration)>,
    /// Set once the task ended here: with its final record as committed
    /// (`None` inside when an error left it unknown).
    done: watch::Sender<Option<Ended>>,
}

/// How a task left this process (see [`Entry::done`]).
#[derive(Clone)]
struct Ended(Option<Arc<TaskRecord>>);

#[derive(Default)]
struct State {
    tasks: HashMap<String, Entry>,
    /// The tasks of `tasks` whose start is not committed yet: still `queued`
    /// in the database, so the dispatcher passes over them.
    starting: HashSet<String>,
    /// Lock key → the task holding it.
    locks: HashMap<String, String>,
    /// Runs whose abort (an operator's, fail-fast's, or one resumed after a
    /// restart) is being delivered by this process, so each is delivered
    /// once. Removed when the run finishes.
    aborting: HashSet<String>,
    /// Run id → its workspace, until the run ends and the cleanup policy
    /// has been applied.
    workspaces: HashMap<String, Workspace>,
    /// Runs whose end one caller of `run_progress` is committing.
    finishing: HashSet<String>,
}

struct Inner {
    rt: Runtime,
    db: Db,
    cfg: ServiceConfig,
    metrics: Metrics,
    state: Mutex<State>,
    /// Digest → compiled plugin (compiled on first use).
    compiled: Mutex<HashMap<String, Plugin>>,
    /// Digest → where its bytes are.
    sources: Mutex<HashMap<String, Source>>,
    /// Plugin rows as submissions name them (name or id), read at most
    /// [`PLUGIN_ROW_TTL`] ago; cleared when this process registers a plugin.
    /// Saves a database read per submission.
    plugin_rows: Mutex<HashMap<String, (Instant, PluginRow)>>,
    /// Bumped (under the `plugin_rows` lock) by every registration.
    plugin_generation: AtomicU64,
    wake: Notify,
    /// Task id → a stdin to give it instead of its spec's (local pipelines
    /// hand a step this process's stdin). Taken when the task starts.
    stdin: Mutex<HashMap<String, wasmtask_runtime::Stdin>>,
    /// Stops the dispatcher (shutdown).
    stop: CancellationToken,
    ready: AtomicBool,
}

/// The task service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves
    // plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Service {
    /// Settles what a previous process left behind, registers the built-in
    /// plugins and the uploaded ones, and starts the dispatcher.
    pub async fn start(rt: Runtime, db: Db, cfg: ServiceConfig) -> anyhow::Result<Service> {
        let recovery = db.recover().await?;
        if !recovery.requeued.is_empty()
            || !recovery.failed.is_empty()
            || !recovery.canceled.is_empty()
        {
            tracing::warn!(
                requeued = recovery.requeued.len(),
                failed = recovery.failed.len(),
                canceled = recovery.canceled.len(),
                "settled tasks left behind by a previous process"
            );
        }
        std::fs::create_dir_all(&cfg.plugin_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", cfg.plugin_dir.display()))?;
        let service = Service {
            inner: Arc::new(Inner {
                rt,
                db,
                cfg,
                metrics: Metrics::default(),
                state: Mutex::new(State::default()),
                compiled: Mutex::new(HashMap::new()),
                sources: Mutex::new(HashMap::new()),
                plugin_rows: Mutex::new(HashMap::new()),
                plugin_generation: AtomicU64::new(0),
                wake: Notify::new(),
                stdin: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
                ready: AtomicBool::new(false),
            }),
        };
        service.register_builtins().await?;
        service.register_uploaded().await?;
        // Runs a previous process left unfinished: this one applies their
        // workspace policy when they end, and their timeouts (counted from
        // their creation; one already past aborts the run now).
        for run in service.inner.db.unfinished_runs().await? {
            if let Some(w) = &run.workspace {
                lock(&service.inner.state)
                    .workspaces
                    .insert(run.id.clone(), Workspace::from_record(w));
            }
            if let Some(ms) = run.timeout_ms
                && run.state == RunState::Running
            {
                service.arm_run_timeout(run.id.clone(), run.created_at, ms);
            }
            service.run_progress(&run.id).await;
        }
        service.sweep_workspaces().await;
        let dispatcher = service.clone();
        tokio::spawn(async move { dispatcher.dispatch_loop().await });
        service.inner.ready.store(true, Ordering::Release);
        Ok(service)
    }

    /// This database's directory of workspace copies: one per database, so
    /// servers with different databases can share `workspace_dir`.
    fn workspace_root(&self) -> PathBuf {
        self.inner.cfg.workspace_dir.join(self.inner.db.instance())
    }

    /// Deletes the workspace copies no run of this database has: a process
    /// that died between making a run's copy and committing the run left
    /// them. Runs before the service takes submissions, and looks only at
    /// this database's own directory. A failure is logged, not fatal.
    async fn sweep_workspaces(&self) {
        let root = self.workspace_root();
        let listed = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || crate::workspace::copies_under(&root))
                .await
                .map_err(std::io::Error::other)
                .flatten()
        };
        let ids = match listed {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(path = %root.display(), error = %e, "cannot list workspace copies");
                return;
            }
        };
        let known = match self.inner.db.existing_runs(ids.clone()).await {
            Ok(known) => known,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check workspace copies against the runs");
                return;
            }
        };
        let strays: Vec<String> = ids.into_iter().filter(|id| !known.contains(id)).collect();
        if !strays.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                crate::workspace::delete_copies(&root, &strays)
            })
            .await;
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Recovery is done, plugins are registered and the service is not
    /// shutting down.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Tasks this process is starting or running.
    pub fn running(&self) -> usize {
        lock(&self.inner.state).tasks.len()
    }

    /// Guests ready to execute and waiting for a guest thread.
    pub fn waiting_for_cpu(&self) -> usize {
        self.inner.rt.waiting_for_cpu()
    }

    /// Prometheus text for `/metrics`.
    pub async fn render_metrics(&self) -> Result<String> {
        let counts = self.inner.db.count_tasks_by_state().await?;
        let counts: Vec<(&str, u64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        let mut text = self
            .inner
            .metrics
            .render(&counts, self.running(), self.waiting_for_cpu());
        crate::metrics::render_writer(&self.inner.db.write_stats(), &mut text);
        crate::metrics::render_runtime(self.inner.rt.ticker_realtime(), &mut text);
        Ok(text)
    }

    // -----------------------------------------------------------------
    // Plugins
    // -----------------------------------------------------------------

    /// Registers each built-in under its name, unless that name already
    /// points at those bytes (then a newer upload under the same name, if
    /// any, stays current).
    async fn register_builtins(&self) -> anyhow::Result<()> {
        let known: HashSet<(String, String)> = self
            .inner
            .db
            .list_plugins()
            .await?
            .into_iter()
            .map(|p| (p.name, p.id))
            .collect();
        for p in builtin::PLUGINS {
            if p.kind == PluginRole::Fixture && !self.inner.cfg.builtin_fixtures {
                continue;
            }
            let id = digest_of(p.bytes);
            let kind = component_kind(p.bytes);
            lock(&self.inner.sources).insert(id.clone(), Source::Builtin(p.bytes));
            if known.contains(&(p.name.to_owned(), id.clone())) {
                continue;
            }
            self.inner
                .db
                .upsert_plugin(PluginRow {
                    id,
                    name: p.name.to_owned(),
                    kind,
                    size_bytes: p.bytes.len() as u64,
                    created_at: now_millis(),
                })
                .await?;
        }
        Ok(())
    }

    async fn register_uploaded(&self) -> anyhow::Result<()> {
        for row in self.inner.db.list_plugins().await? {
            let path = self.plugin_path(&row.id);
            let mut sources = lock(&self.inner.sources);
            if !sources.contains_key(&row.id) && path.is_file() {
                sources.insert(row.id.clone(), Source::File(path));
            }
        }
        Ok(())
    }

    fn plugin_path(&self, digest: &str) -> PathBuf {
        self.inner
            .cfg
            .plugin_dir
            .join(format!("{}.wasm", digest.replace(':', "-")))
    }

    /// Validates and compiles `bytes` (off the async runtime), keeps them
    /// under the data directory and registers them as `name` (the content's
    /// other names stay). Returns the row and whether it was new (`false`:
    /// `name` already meant these bytes).
    pub async fn add_plugin(&self, name: &str, bytes: Vec<u8>) -> Result<(PluginRow, bool)> {
        validate_plugin_name(name)?;
        let id = digest_of(&bytes);
        if let Some(row) = self.inner.db.get_plugin(name).await?
            && row.id == id
        {
            return Ok((row, false));
        }
        let size = bytes.len();
        let plugin = match self.inner.rt.load_async(bytes.clone()).await {
            Ok(p) => p,
            Err(e) => return Err(plugin_error(e)),
        };
        let path = self.plugin_path(&id);
        let tmp = path.with_extension("wasm.tmp");
        let write = {
            let (path, tmp) = (path.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                Ok(())
            })
        };
        write
            .await
            .map_err(|e| ServiceError::Internal(e.into()))?
            .map_err(|e| ServiceError::Internal(anyhow::anyhow!("cannot store the plugin: {e}")))?;
        lock(&self.inner.sources).insert(id.clone(), Source::File(path));
        lock(&self.inner.compiled).insert(id.clone(), plugin.clone());
        let row = PluginRow {
            id,
            name: name.to_owned(),
            kind: exec::plugin_kind(plugin.kind()),
            size_bytes: size as u64,
            created_at: now_millis(),
        };
        self.inner.db.upsert_plugin(row.clone()).await?;
        {
            let mut cache = lock(&self.inner.plugin_rows);
            self.inner.plugin_generation.fetch_add(1, Ordering::AcqRel);
            cache.clear();
        }
        Ok((row, true))
    }

    pub async fn list_plugins(&self) -> Result<Vec<PluginRow>> {
        Ok(self.inner.db.list_plugins().await?)
    }

    /// The compiled plugin with this digest, compiling it on first use.
    async fn compiled(&self, digest: &str) -> Result<Plugin, String> {
        if let Some(p) = lock(&self.inner.compiled).get(digest) {
            return Ok(p.clone());
        }
        let source = lock(&self.inner.sources).get(digest).cloned();
        let bytes = match source {
            Some(Source::Builtin(b)) => b.to_vec(),
            Some(Source::File(path)) => tokio::fs::read(&path)
                .await
                .map_err(|e| format!("cannot read the plugin {}: {e}", path.display()))?,
            None => return Err(format!("the bytes of plugin {digest} are not on this host")),
        };
        let plugin = self
            .inner
            .rt
            .load_async(bytes)
            .await
            .map_err(|e| format!("cannot compile plugin {digest}: {e}"))?;
        lock(&self.inner.compiled).insert(digest.to_owned(), plugin.clone());
        Ok(plugin)
    }

    // -----------------------------------------------------------------
    // Submission
    // -----------------------------------------------------------------

    /// The plugin a submission names, from the cache when it is fresh.
    async fn plugin_row(&self, name: &str) -> Result<Option<PluginRow>> {
        if let Some((at, row)) = lock(&self.inner.plugin_rows).get(name)
            && at.elapsed() < PLUGIN_ROW_TTL
        {
            return Ok(Some(row.clone()));
        }
        let generation = self.inner.plugin_generation.load(Ordering::Acquire);
        let row = self.inner.db.get_plugin(name).await?;
        if let Some(row) = &row {
            let mut cache = lock(&self.inner.plugin_rows);
            // A registration since the read began may have made it stale.
            if self.inner.plugin_generation.load(Ordering::Acquire) != generation {
                return Ok(Some(row.clone()));
            }
            if cache.len() >= 1024 {
                cache.clear();
            }
            cache.insert(name.to_owned(), (Instant::now(), row.clone()));
        }
        Ok(row)
    }

    /// Checks a submission and turns it into a task to insert.
    async fn new_task(
        &self,
        s: &TaskSubmit,
        run_id: Option<String>,
        in_run: bool,
        queued_at: i64,
    ) -> Result<NewTask> {
        let Some(plugin) = self.plugin_row(&s.plugin).await? else {
            return Err(ServiceError::UnknownPlugin(format!(
                "no plugin named or with id `{}` (see GET /v1/plugins)",
                s.plugin
            )));
        };
        if !lock(&self.inner.sources).contains_key(&plugin.id) {
            return Err(ServiceError::UnknownPlugin(format!(
                "the bytes of plugin `{}` ({}) are missing on this host; upload it again",
                plugin.name, plugin.id
            )));
        }
        let mut spec = s.spec();
        self.check_spec(&mut spec, plugin.kind, in_run)?;
        let max_attempts = s.max_attempts.unwrap_or(1);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(ServiceError::InvalidSpec(format!(
                "max_attempts must be between 1 and {MAX_ATTEMPTS}"
            )));
        }
        Ok(NewTask {
            id: db::new_task_id(),
            plugin_id: plugin.id,
            plugin_name: plugin.name,
            plugin_kind: plugin.kind,
            run_id,
            spec,
            max_attempts,
            queued_at,
        })
    }

    fn check_spec(&self, spec: &mut TaskSpec, kind: PluginKind, in_run: bool) -> Result<()> {
        let bad = |m: String| Err(ServiceError::InvalidSpec(m));
        if kind == PluginKind::Command && spec.input.is_some() {
            return bad(
                "`input` is for task plugins; command plugins take `args` and `stdin`".into(),
            );
        }
        if !in_run && (spec.key.is_some() || !spec.needs.is_empty()) {
            return bad("`key` and `needs` belong to the tasks of a run (POST /v1/runs)".into());
        }
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad(format!("env: invalid variable name or value `{k}`"));
            }
        }
        if let Some(cwd) = &spec.cwd
            && !wasmtask_runtime::is_absolute_guest_path(cwd)
        {
            return bad(format!(
                "cwd: `{cwd}` must be an absolute guest path (one starting with `/`)"
            ));
        }
        if spec.args.iter().any(|a| a.contains('\0')) {
            return bad("args: an argument contains a NUL byte".into());
        }
        if spec.locks.len() > MAX_LOCKS {
            return bad(format!("at most {MAX_LOCKS} locks per task"));
        }
        for l in &spec.locks {
            if l.is_empty() || l.len() > MAX_KEY_BYTES {
                return bad(format!("locks: a key must have 1 to {MAX_KEY_BYTES} bytes"));
            }
        }
        spec.locks.sort();
        spec.locks.dedup();
        if spec.limits.timeout_ms == Some(0) {
            return bad("limits.timeout_ms must be positive".into());
        }
        let ceiling = self.inner.rt.config().memory_ceiling;
        if let Some(m) = spec.limits.max_memory_bytes
            && m > ceiling
        {
            return bad(format!(
                "limits.max_memory_bytes {m} exceeds this host's ceiling of {ceiling} bytes"
            ));
        }
        if spec.limits.fuel == Some(0) {
            return bad("limits.fuel must be positive".into());
        }
        for d in &mut spec.dirs {
            let host = Path::new(&d.host);
            if !host.is_absolute() {
                return bad(format!("dirs: host path `{}` must be absolute", d.host));
            }
            let canonical = std::fs::canonicalize(host)
                .map_err(|e| ServiceError::InvalidSpec(format!("dirs: `{}`: {e}", d.host)))?;
            if !canonical.is_dir() {
                return bad(format!("dirs: `{}` is not a directory", d.host));
            }
            if !self
                .inner
                .cfg
                .allowed_dirs
                .iter()
                .any(|a| canonical.starts_with(a))
            {
                return bad(format!(
                    "dirs: `{}` is not under a directory this server allows (config `allowed_dirs`)",
                    d.host
                ));
            }
            if d.guest.is_empty() || d.guest.contains('\0') {
                return bad("dirs: the guest path must not be empty".into());
            }
            d.host = canonical.to_string_lossy().into_owned();
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.stop.is_cancelled() {
            return Err(ServiceError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        Ok(())
    }

    /// Queues one task. When this returns, the task is durable.
    pub async fn submit(&self, s: &TaskSubmit) -> Result<TaskRecord> {
        self.check_open()?;
        if let Some(run_id) = &s.run {
            match self.inner.db.get_run(run_id).await? {
                None => return Err(ServiceError::NotFound(format!("no run {run_id}"))),
                Some(r) if r.state != RunState::Running => {
                    return Err(ServiceError::RunFinished(Box::new(r)));
                }
                Some(_) => {}
            }
        }
        if s.workspace.is_some() {
            return Err(ServiceError::InvalidSpec(
                "`workspace` belongs to the tasks of a run that has a workspace (POST /v1/runs)"
                    .into(),
            ));
        }
        let t = self.new_task(s, s.run.clone(), false, now_millis()).await?;
        let record = self.inner.db.insert_task(t).await.map_err(|e| match e {
            DbError::RunNotFound(id) => ServiceError::NotFound(format!("no run {id}")),
            e => e.into(),
        })?;
        self.inner.metrics.count_submitted();
        self.inner.wake.notify_one();
        Ok(record)
    }

    /// Creates a run and queues its tasks, all in one transaction.
    pub async fn submit_run(&self, r: &RunSubmit) -> Result<RunView> {
        self.submit_run_with_stdin(r, None).await
    }

    /// [`Service::submit_run`], giving the task with key `stdin.0` this
    /// process's `stdin.1` as its stdin (local pipelines). It is attached
    /// before the task can be dispatched, and is not recorded.
    pub async fn submit_run_with_stdin(
        &self,
        r: &RunSubmit,
        stdin: Option<(String, wasmtask_runtime::Stdin)>,
    ) -> Result<RunView> {
        self.check_open()?;
        if r.tasks.is_empty() {
            return Err(ServiceError::InvalidSpec(
                "a run needs at least one task".into(),
            ));
        }
        if r.tasks.len() > MAX_RUN_TASKS {
            return Err(ServiceError::InvalidSpec(format!(
                "a run holds at most {MAX_RUN_TASKS} tasks"
            )));
        }
        // Keys default to the task's position.
        let keys: Vec<String> = r
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| t.key.clone().unwrap_or_else(|| i.to_string()))
            .collect();
        check_graph(&keys, &r.tasks)?;
        if r.timeout_ms == Some(0) {
            return Err(ServiceError::InvalidSpec(
                "timeout_ms must be positive".into(),
            ));
        }
        let run_id = db::new_run_id();
        let now = now_millis();
        let mut tasks = Vec::with_capacity(r.tasks.len());
        for (t, key) in r.tasks.iter().zip(&keys) {
            if t.stream || t.run.is_some() {
                return Err(ServiceError::InvalidSpec(format!(
                    "task `{key}`: `stream` and `run` are not allowed inside a run"
                )));
            }
            if t.workspace.is_some() && r.workspace.is_none() {
                return Err(ServiceError::InvalidSpec(format!(
                    "task `{key}`: `workspace` is set but the run has no workspace"
                )));
            }
            let mut nt = self
                .new_task(t, Some(run_id.clone()), true, now)
                .await
                .map_err(|e| prefix(e, key))?;
            nt.spec.key = Some(key.clone());
            tasks.push(nt);
        }
        // Everything else is checked: make the workspace (a copy may take a
        // while; off the async runtime) and mount it in every task that asks.
        let workspace = match &r.workspace {
            None => None,
            Some(spec) => {
                let (spec, allowed, root, id) = (
                    spec.clone(),
                    self.inner.cfg.allowed_dirs.clone(),
                    self.workspace_root(),
                    run_id.clone(),
                );
                let ws = tokio::task::spawn_blocking(move || {
                    Workspace::prepare(&spec, &allowed, &root, &id)
                })
                .await
                .map_err(|e| ServiceError::Internal(e.into()))?
                .map_err(|e| match e {
                    crate::workspace::WorkspaceError::Copy { .. } => {
                        ServiceError::Internal(e.into())
                    }
                    e => ServiceError::InvalidSpec(e.to_string()),
                })?;
                Some(ws)
            }
        };
        if let Some(ws) = &workspace {
            for (nt, t) in tasks.iter_mut().zip(&r.tasks) {
                let access = t.workspace.unwrap_or(WorkspaceAccess::Ro);
                if access == WorkspaceAccess::None {
                    continue;
                }
                nt.spec.dirs.push(DirSpec {
                    host: ws.host.to_string_lossy().into_owned(),
                    guest: ws.guest.clone(),
                    writable: access == WorkspaceAccess::Rw,
                });
                if nt.spec.cwd.is_none() {
                    nt.spec.cwd = Some(ws.guest.clone());
                }
            }
            lock(&self.inner.state)
                .workspaces
                .insert(run_id.clone(), ws.clone());
        }
        let mut attached = None;
        if let Some((key, input)) = stdin {
            let Some(t) = tasks
                .iter()
                .find(|t| t.spec.key.as_deref() == Some(key.as_str()))
            else {
                if let Some(ws) = lock(&self.inner.state).workspaces.remove(&run_id) {
                    ws.discard();
                }
                return Err(ServiceError::InvalidSpec(format!(
                    "no task `{key}` to give stdin to"
                )));
            };
            lock(&self.inner.stdin).insert(t.id.clone(), input);
            attached = Some(t.id.clone());
        }
        let inserted = self
            .inner
            .db
            .insert_run(
                NewRun {
                    id: run_id.clone(),
                    name: r.name.clone(),
                    fail_fast: r.fail_fast,
                    created_at: now,
                    timeout_ms: r.timeout_ms,
                    workspace: workspace.as_ref().map(Workspace::record),
                },
                tasks,
            )
            .await;
        let view = match inserted {
            Ok(v) => v,
            Err(e) => {
                if let Some(ws) = lock(&self.inner.state).workspaces.remove(&run_id) {
                    ws.discard();
                }
                if let Some(id) = attached {
                    lock(&self.inner.stdin).remove(&id);
                }
                return Err(e.into());
            }
        };
        for _ in &view.tasks {
            self.inner.metrics.count_submitted();
        }
        if let Some(ms) = r.timeout_ms {
            self.arm_run_timeout(run_id.clone(), now, ms);
        }
        self.inner.wake.notify_one();
        Ok(view)
    }

    /// Aborts run `run_id`, created at `created_at`, once `timeout_ms` have
    /// passed since (at once if they have), unless it has ended by then or
    /// the service stops first.
    fn arm_run_timeout(&self, run_id: String, created_at: UnixMillis, timeout_ms: u64) {
        let deadline = created_at.saturating_add(i64::try_from(timeout_ms).unwrap_or(i64::MAX));
        let after = Duration::from_millis(
            u64::try_from(deadline.saturating_sub(now_millis())).unwrap_or(0),
        );
        let svc = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = svc.inner.stop.cancelled() => {}
                _ = tokio::time::sleep(after) => {
                    let c = Cancel {
                        actor: "timeout".into(),
                        reason: Some(format!("run timeout: not finished after {timeout_ms} ms")),
                        grace_ms: None,
                        wait: None,
                    };
                    match svc.abort(&run_id, c).await {
                        Ok(_) | Err(ServiceError::RunFinished(_)) => {}
                        Err(e) => tracing::warn!(run = %run_id, error = %e, "run timeout abort failed"),
                    }
                }
            }
        });
    }

    /// The host directory of a run's workspace while the run lasts.
    pub fn workspace_of(&self, run_id: &str) -> Option<PathBuf> {
        lock(&self.inner.state)
            .workspaces
            .get(run_id)
            .map(|w| w.host.clone())
    }

    pub async fn get_task(&self, id: &str) -> Result<TaskRecord> {
        self.inner
            .db
            .get_task(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no task {id}")))
    }

    pub async fn list_tasks(&self, filter: TaskFilter) -> Result<Vec<TaskRecord>> {
        self.inner.db.list_tasks(filter).await.map_err(|e| match e {
            DbError::BadCursor(c) => ServiceError::InvalidSpec(format!("bad cursor `{c}`")),
            e => e.into(),
        })
    }

    pub async fn get_run(&self, id: &str) -> Result<RunView> {
        self.inner
            .db
            .run_view(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no run {id}")))
    }

    pub async fn list_runs(
        &self,
        limit: Option<usize>,
        cursor: Option<String>,
    ) -> Result<Vec<RunRecord>> {
        self.inner
            .db
            .list_runs(limit, cursor)
            .await
            .map_err(|e| match e {
                DbError::BadCursor(c) => ServiceError::InvalidSpec(format!("bad cursor `{c}`")),
                e => e.into(),
            })
    }

    // -----------------------------------------------------------------
    // Cancel and abort
    // -----------------------------------------------------------------

    /// Cancels a task: a queued one at once, a running one gracefully (then
    /// by force) or at once with grace 0. The cancel record is committed
    /// before this returns.
    pub async fn cancel(&self, id: &str, c: Cancel) -> Result<CancelResult> {
        let grace_ms = match c.grace_ms {
            Some(g) => g,
            None => self.get_task(id).await?.spec.grace_ms.unwrap_or(0),
        };
        let reason = c
            .reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| format!("canceled by {}", c.actor));
        // Queue the cancel record, then deliver at once: the guest stops while
        // the record commits. The task's own end is written after the record
        // (it is queued behind it), so the race is still decided by the record.
        let decided = self
            .inner
            .db
            .enqueue_cancel(
                id,
                CancelRequest {
                    actor: c.actor.clone(),
                    reason: reason.clone(),
                    grace_ms,
                    requested_at: now_millis(),
                },
            )
            .await?;
        // A handle keeps the earliest deadline and the first reason, so
        // delivering this request is the same as delivering the record's.
        let done_rx = {
            let mut st = lock(&self.inner.state);
            match st.tasks.get_mut(id) {
                Some(entry) => {
                    let grace = Duration::from_millis(grace_ms);
                    match &entry.handle {
                        Some(h) => {
                            h.cancel(reason.clone(), grace);
                        }
                        None => {
                            let keep = match &entry.pending {
                                Some((_, g)) => grace < *g,
                                None => true,
                            };
                            if keep {
                                entry.pending = Some((reason.clone(), grace));
                            }
                        }
                    }
                    Some(entry.done.subscribe())
                }
                None => None,
            }
        };
        let decision = decided.await?;
        self.inner.metrics.count_cancel();
        let record = match decision {
            CancelDecision::NotFound => {
                return Err(ServiceError::NotFound(format!("no task {id}")));
            }
            CancelDecision::AlreadyFinished(r) => {
                return Err(ServiceError::TaskFinished(Box::new(r)));
            }
            CancelDecision::CanceledBeforeStart(r) => {
                if let Some(run_id) = r.run_id.clone() {
                    self.run_progress(&run_id).await;
                }
                self.inner.wake.notify_one();
                return Ok(CancelResult {
                    task: r,
                    done: true,
                });
            }
            CancelDecision::Requested { record, .. } => record,
        };
        let Some(mut done_rx) = done_rx else {
            // Not running here. It may just have ended (then the record says
            // so); otherwise the cancel cannot be delivered.
            let now = self.get_task(id).await?;
            if now.state.is_terminal() {
                return Ok(CancelResult {
                    task: now,
                    done: true,
                });
            }
            let why = "the task is not running in this server process (another process may be running it); the cancel is recorded and can be retried";
            self.inner
                .db
                .append_events(vec![NewEvent::task(
                    id,
                    EventKind::TaskCancelFailed,
                    json!({"reason": why, "actor": c.actor}),
                )])
                .await?;
            tracing::warn!(task = %id, "cancel could not be delivered: {why}");
            return Ok(CancelResult {
                task: now,
                done: false,
            });
        };
        if let Some(wait) = c.wait.filter(|w| !w.is_zero()) {
            let ended = tokio::time::timeout(wait, done_rx.wait_for(|d| d.is_some()))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|d| d.clone()));
            let now = match ended {
                Some(Ended(Some(record))) => (*record).clone(),
                _ => self.get_task(id).await?,
            };
            let done = now.state.is_terminal();
            return Ok(CancelResult { task: now, done });
        }
        Ok(CancelResult {
            task: record,
            done: false,
        })
    }

    /// Aborts a run: no more of its tasks start, queued ones are canceled at
    /// once and running ones in parallel.
    pub async fn abort(&self, run_id: &str, c: Cancel) -> Result<AbortResult> {
        let reason = c
            .reason
            .clone()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| format!("run aborted by {}", c.actor));
        // Claim the run's cancels before the abort is committed: a task of
        // the run that ends meanwhile (a queued one canceled below, say)
        // runs `run_progress`, which must see that this abort is delivering
        // the cancels with its own grace rather than start a second,
        // grace-less delivery of its own.
        let claimed = lock(&self.inner.state).aborting.insert(run_id.to_owned());
        let decision = self
            .inner
            .db
            .request_run_abort(
                run_id,
                RunAbortRequest {
                    actor: c.actor.clone(),
                    reason: reason.clone(),
                    requested_at: now_millis(),
                },
            )
            .await;
        let unclaim = || {
            if claimed {
                lock(&self.inner.state).aborting.remove(run_id);
            }
        };
        match decision {
            Err(e) => {
                unclaim();
                return Err(e.into());
            }
            Ok(RunAbortDecision::NotFound) => {
                unclaim();
                return Err(ServiceError::NotFound(format!("no run {run_id}")));
            }
            Ok(RunAbortDecision::AlreadyFinished(r)) => {
                unclaim();
                return Err(ServiceError::RunFinished(Box::new(r)));
            }
            Ok(RunAbortDecision::Requested { .. }) => {}
        }
        self.cancel_run_tasks(run_id, &c.actor, &reason, c.grace_ms, c.wait)
            .await?;
        self.run_progress(run_id).await;
        let view = self.get_run(run_id).await?;
        let done = view.run.state.is_terminal();
        Ok(AbortResult { view, done })
    }

    /// Cancels every unfinished task of a run, in parallel, and waits up to
    /// `wait` for them to end.
    async fn cancel_run_tasks(
        &self,
        run_id: &str,
        actor: &str,
        reason: &str,
        grace_ms: Option<u64>,
        wait: Option<Duration>,
    ) -> Result<()> {
        let view = self.get_run(run_id).await?;
        let mut set = tokio::task::JoinSet::new();
        for t in view.tasks.into_iter().filter(|t| !t.state.is_terminal()) {
            let svc = self.clone();
            let c = Cancel {
                actor: actor.to_owned(),
                reason: Some(reason.to_owned()),
                grace_ms,
                wait,
            };
            set.spawn(async move {
                match svc.cancel(&t.id, c).await {
                    Ok(_) | Err(ServiceError::TaskFinished(_)) => {}
                    Err(e) => tracing::warn!(task = %t.id, error = %e, "cannot cancel a task of an aborted run"),
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    }

    /// Moves a run along after one of its tasks changed: applies fail-fast,
    /// cancels tasks whose needs can no longer be met, and finishes the run
    /// when every task is terminal. Errors are logged (the next change or a
    /// restart retries).
    ///
    /// Boxed: it is part of a cycle of futures (cancel → run progress →
    /// fail-fast abort → cancel) whose `Send`-ness the compiler can only see
    /// through a named type.
    pub fn run_progress<'a>(
        &'a self,
        run_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let Err(e) = self.try_run_progress(run_id).await {
                tracing::warn!(run = %run_id, error = %e, "cannot update the run");
            }
        })
    }

    async fn try_run_progress(&self, run_id: &str) -> Result<()> {
        let Some(p) = self.inner.db.run_progress(run_id).await? else {
            return Ok(());
        };
        if p.run.state.is_terminal() {
            return Ok(());
        }
        if p.unfinished == 0 {
            // A fail-fast abort (or a run timeout) means the run failed; an
            // operator's abort means it was aborted.
            let state = if p
                .run
                .abort
                .as_ref()
                .is_some_and(|a| a.actor == "fail_fast" || a.actor == "timeout")
            {
                RunState::Failed
            } else if p.run.abort.is_some() {
                RunState::Aborted
            } else if p.succeeded == p.total {
                RunState::Succeeded
            } else {
                RunState::Failed
            };
            // The workspace is cleaned up before the run's end is committed,
            // so whoever sees `run.finished` sees the cleanup done. Only one
            // caller finishes a run (several task ends may race here).
            let workspace = {
                let mut st = lock(&self.inner.state);
                if !st.finishing.insert(run_id.to_owned()) {
                    return Ok(());
                }
                st.workspaces.remove(run_id)
            };
            if let Some(ws) = workspace {
                self.finish_workspace(run_id, ws, state).await;
            }
            let finished = self.inner.db.finish_run(run_id, state, now_millis()).await;
            {
                let mut st = lock(&self.inner.state);
                st.finishing.remove(run_id);
                st.aborting.remove(run_id);
            }
            finished?;
            return Ok(());
        }
        if p.run.state == RunState::Aborting {
            // An abort that nobody in this process is delivering — one a
            // restart interrupted: finish canceling. Its grace is not kept
            // (nothing of the run is running after a restart: recovery
            // settled those tasks), so each task's own grace applies.
            let first = lock(&self.inner.state).aborting.insert(run_id.to_owned());
            if first {
                let abort = p.run.abort.clone();
                let svc = self.clone();
                let run_id = run_id.to_owned();
                tokio::spawn(async move {
                    let (actor, reason) = abort
                        .map(|a| (a.actor, a.reason))
                        .unwrap_or_else(|| ("server".into(), "run aborted".into()));
                    let _ = svc
                        .cancel_run_tasks(&run_id, &actor, &reason, None, None)
                        .await;
                    svc.run_progress(&run_id).await;
                });
            }
            return Ok(());
        }
        if p.run.fail_fast
            && let Some(bad) = &p.first_failure
        {
            let first = lock(&self.inner.state).aborting.insert(run_id.to_owned());
            if first {
                let key = bad.key.clone().unwrap_or_else(|| bad.task_id.clone());
                let reason = format!("fail_fast: task `{key}` ended {}", bad.state);
                let svc = self.clone();
                let run_id = run_id.to_owned();
                tokio::spawn(async move {
                    let c = Cancel {
                        actor: "fail_fast".into(),
                        reason: Some(reason),
                        grace_ms: None,
                        wait: None,
                    };
                    match svc.abort(&run_id, c).await {
                        Ok(_) => {}
                        Err(e) => {
                            // Let the next change of the run try again (or,
                            // if it finished meanwhile, forget it).
                            lock(&svc.inner.state).aborting.remove(&run_id);
                            if !matches!(e, ServiceError::RunFinished(_)) {
                                tracing::warn!(run = %run_id, error = %e, "fail_fast abort failed");
                            }
                        }
                    }
                });
            }
        }
        Ok(())
    }

    /// Applies a workspace's cleanup policy after its run ended, and says so
    /// in the run's trail.
    async fn finish_workspace(&self, run_id: &str, ws: Workspace, state: RunState) {
        let host = ws.host.display().to_string();
        let result = tokio::task::spawn_blocking(move || ws.finish(state)).await;
        let (message, data) = match result {
            Ok(Ok(true)) => ("workspace deleted", json!({"path": host, "deleted": true})),
            Ok(Ok(false)) => ("workspace kept", json!({"path": host, "deleted": false})),
            Ok(Err(e)) => {
                tracing::warn!(run = %run_id, path = %host, error = %e, "cannot delete the workspace");
                (
                    "workspace could not be deleted",
                    json!({"path": host, "deleted": false, "error": e.to_string()}),
                )
            }
            Err(e) => {
                tracing::warn!(run = %run_id, error = %e, "workspace cleanup died");
                return;
            }
        };
        let mut data = data;
        data["level"] = json!("info");
        data["source"] = json!("host");
        data["message"] = json!(message);
        let event = NewEvent {
            task_id: None,
            run_id: Some(run_id.to_owned()),
            kind: EventKind::TaskLog,
            at: now_millis(),
            data,
        };
        if let Err(e) = self.inner.db.append_events(vec![event]).await {
            tracing::warn!(run = %run_id, error = %e, "cannot record the workspace cleanup");
        }
    }

    // -----------------------------------------------------------------
    // Dispatch
    // -----------------------------------------------------------------

    async fn dispatch_loop(self) {
        loop {
            if let Err(e) = self.dispatch_pass().await {
                tracing::warn!(error = %e, "dispatch pass failed");
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(DISPATCH_TICK) => {}
            }
        }
    }

    async fn dispatch_pass(&self) -> Result<()> {
        if self.inner.stop.is_cancelled() {
            return Ok(());
        }
        // Tasks already being started are still `queued` until their start
        // commits: pass them over undecoded. Read no more than there is room
        // for (a pass runs after every submit and every task end, so reading
        // the whole queue each time would cost O(queue) per task).
        let (room, skip) = {
            let st = lock(&self.inner.state);
            let room = self.inner.cfg.max_running.saturating_sub(st.tasks.len());
            (room, st.starting.clone())
        };
        if room == 0 {
            return Ok(());
        }
        let queued = self
            .inner
            .db
            .queued_for_dispatch(DISPATCH_BATCH, room, skip)
            .await?;
        // Runs' task states by key, read once per pass (without decoding
        // the runs' tasks).
        let mut runs: HashMap<String, Option<db::RunGate>> = HashMap::new();
        for task in queued {
            if lock(&self.inner.state).tasks.len() >= self.inner.cfg.max_running {
                break;
            }
            if let Some(run_id) = task.run_id.clone() {
                if !runs.contains_key(&run_id) {
                    let gate = self.inner.db.run_gate(&run_id).await?;
                    runs.insert(run_id.clone(), gate);
                }
                let Some(Some(gate)) = runs.get(&run_id) else {
                    continue;
                };
                if gate.run.state != RunState::Running {
                    // Aborting: its queued tasks are being canceled.
                    continue;
                }
                match needs_status(&task, gate) {
                    Needs::Met => {}
                    Needs::Waiting => continue,
                    Needs::Broken(reason) => {
                        let svc = self.clone();
                        let id = task.id.clone();
                        tokio::spawn(async move {
                            let c = Cancel {
                                actor: "run".into(),
                                reason: Some(reason),
                                grace_ms: Some(0),
                                wait: None,
                            };
                            if let Err(e) = svc.cancel(&id, c).await {
                                tracing::debug!(task = %id, error = %e, "cannot cancel a task whose needs failed");
                            }
                        });
                        continue;
                    }
                }
            }
            // Take the locks and a place in the map, or leave it queued.
            let (done_tx, _) = watch::channel(None);
            {
                let mut st = lock(&self.inner.state);
                if st.tasks.contains_key(&task.id) {
                    continue;
                }
                if task.locks.iter().any(|k| st.locks.contains_key(k)) {
                    continue;
                }
                for k in &task.locks {
                    st.locks.insert(k.clone(), task.id.clone());
                }
                st.starting.insert(task.id.clone());
                st.tasks.insert(
                    task.id.clone(),
                    Entry {
                        handle: None,
                        pending: None,
                        done: done_tx,
                    },
                );
            }
            let svc = self.clone();
            tokio::spawn(async move { svc.execute(task).await });
        }
        Ok(())
    }

    /// Runs one attempt of a task the dispatcher picked, and records how it
    /// ended.
    async fn execute(self, task: db::QueuedTask) {
        let id = task.id.clone();
        let span =
            tracing::info_span!("task", task = %id, plugin = %task.plugin_name, run = ?task.run_id);
        let ended = tracing::Instrument::instrument(self.clone().execute_inner(task), span)
            .await
            .ok()
            .flatten();
        // Whatever happened, this process no longer runs it.
        let (locks, entry) = {
            let mut st = lock(&self.inner.state);
            let entry = st.tasks.remove(&id);
            st.starting.remove(&id);
            let locks: Vec<String> = st
                .locks
                .iter()
                .filter(|(_, holder)| **holder == id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &locks {
                st.locks.remove(k);
            }
            (locks, entry)
        };
        if !locks.is_empty() {
            // Normally already released (and recorded) when the guest
            // stopped; this covers the paths that never started it.
            tracing::debug!(task = %id, "locks released after the task ended");
        }
        if let Some(e) = entry {
            e.done.send_replace(Some(Ended(ended.map(Arc::new))));
        }
        self.inner.wake.notify_one();
    }

    /// One attempt; returns the task's record as committed at its end (and
    /// its run's progress), or `None` when an error left it unknown.
    async fn execute_inner(self, task: db::QueuedTask) -> Result<Option<TaskRecord>> {
        let id = task.id.clone();
        if !task.locks.is_empty() {
            let events = task
                .locks
                .iter()
                .map(|k| NewEvent::task(&id, EventKind::TaskLockAcquired, json!({"lock": k})))
                .collect();
            self.inner.db.append_events(events).await?;
        }
        let decision = self.inner.db.mark_started(&id).await;
        // Started, not startable or unknown: no longer `queued` as far as
        // this process can tell (an error removes the task from the map
        // below anyway).
        lock(&self.inner.state).starting.remove(&id);
        let record = match decision? {
            StartDecision::Started(r) => r,
            StartDecision::NotStartable(r) => {
                self.release_locks(&id, &task.locks, Vec::new()).await;
                if let Some(run_id) = &r.run_id {
                    self.run_progress(run_id).await;
                }
                return Ok(Some(r));
            }
        };
        let started = Instant::now();
        let final_record = match self.start_guest(&record).await {
            Ok((report, tail)) => {
                // The guest's last events go with its locks' release, or else
                // with its end.
                let tail = self.release_locks(&id, &record.spec.locks, tail).await;
                let finish = exec::finish(report);
                if let Some(e) = &finish.error
                    && e.kind == ErrorKind::Trap
                {
                    self.inner
                        .metrics
                        .count_trap(e.detail.as_deref().unwrap_or("unknown"));
                }
                if let Some(c) = &finish.cancel_stopped {
                    self.inner
                        .metrics
                        .observe_cancel_latency(Duration::from_micros(c.latency_us));
                }
                self.inner.db.finish_with_events(&id, finish, tail).await?
            }
            Err(message) => {
                self.release_locks(&id, &record.spec.locks, Vec::new())
                    .await;
                tracing::warn!(task = %id, "cannot start: {message}");
                self.inner.db.finish(&id, start_failed(message)).await?
            }
        };
        self.inner.metrics.observe_task_duration(started.elapsed());
        tracing::info!(state = %final_record.state, "task ended");
        // A run's progress (its end, fail-fast) is committed before anyone
        // waiting for this task hears of its end (`execute` tells them): an
        // abort that waits reports the run's outcome.
        if let Some(run_id) = &final_record.run_id {
            self.run_progress(run_id).await;
        }
        Ok(Some(final_record))
    }

    /// Compiles (if needed) and spawns the guest, then waits for it.
    async fn start_guest(
        &self,
        record: &TaskRecord,
    ) -> Result<(wasmtask_runtime::TaskReport, Vec<NewEvent>), String> {
        let id = &record.id;
        let plugin = self.compiled(&record.plugin_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(exec::EVENT_BUFFER);
        let io = LocalIo {
            tee: false,
            stdin: lock(&self.inner.stdin).remove(id),
        };
        let request = exec::request(plugin, &record.plugin_name, &record.spec, io, Some(tx))
            .map_err(|e| e.to_string())?;
        let pump = exec::pump_events(self.inner.db.clone(), id.clone(), rx, None);
        let running = match self.inner.rt.spawn(request) {
            Ok(r) => r,
            Err(e) => {
                let _ = pump.await;
                return Err(e.to_string());
            }
        };
        {
            let mut st = lock(&self.inner.state);
            if let Some(entry) = st.tasks.get_mut(id) {
                let handle = running.cancel_handle();
                if let Some((reason, grace)) = entry.pending.take() {
                    handle.cancel(reason, grace);
                }
                entry.handle = Some(handle);
            }
        }
        let report = running.wait().await;
        // The guest's last events, if the pump still held them: they are
        // stored with the task's end.
        let tail = pump.await.unwrap_or_default();
        Ok((report, tail))
    }

    /// Releases the task's locks and records it, after `events` (the
    /// guest's last) in the same write. Returns `events` untouched when the
    /// task held no locks (nothing is written then).
    async fn release_locks(
        &self,
        id: &str,
        keys: &[String],
        events: Vec<NewEvent>,
    ) -> Vec<NewEvent> {
        if keys.is_empty() {
            return events;
        }
        let mut events = events;
        events.extend(
            keys.iter()
                .map(|k| NewEvent::task(id, EventKind::TaskLockReleased, json!({"lock": k}))),
        );
        if let Err(e) = self.inner.db.append_events(events).await {
            tracing::warn!(task = %id, error = %e, "cannot record released locks");
        }
        {
            let mut st = lock(&self.inner.state);
            for k in keys {
                if st.locks.get(k).is_some_and(|h| h == id) {
                    st.locks.remove(k);
                }
            }
        }
        self.inner.wake.notify_one();
        Vec::new()
    }

    // -----------------------------------------------------------------
    // Shutdown
    // -----------------------------------------------------------------

    /// Stops dispatching and refuses new submissions. Running tasks go on.
    pub fn stop_accepting(&self) {
        self.inner.ready.store(false, Ordering::Release);
        self.inner.stop.cancel();
    }

    /// A token cancelled when the service stops accepting work (SSE streams
    /// end with it).
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// Waits up to `wait` for running tasks to end by themselves, then
    /// cancels the rest with `grace` and waits for them to stop.
    pub async fn drain(&self, wait: Duration, grace: Duration) {
        let deadline = Instant::now() + wait;
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids: Vec<String> = lock(&self.inner.state).tasks.keys().cloned().collect();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let svc = self.clone();
            set.spawn(async move {
                let c = Cancel {
                    actor: "server".into(),
                    reason: Some("server_shutdown".into()),
                    grace_ms: Some(millis(grace)),
                    wait: None,
                };
                if let Err(e) = svc.cancel(&id, c).await {
                    tracing::debug!(task = %id, error = %e, "shutdown cancel");
                }
            });
        }
        while set.join_next().await.is_some() {}
        // Give the guests their grace plus a margin to stop and be recorded.
        let deadline = Instant::now() + grace + Duration::from_secs(5);
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

enum Needs {
    Met,
    Waiting,
    Broken(String),
}

fn needs_status(task: &db::QueuedTask, gate: &db::RunGate) -> Needs {
    for need in &task.needs {
        let Some(&state) = gate.states.get(need) else {
            return Needs::Broken(format!("needed task `{need}` does not exist"));
        };
        match state {
            TaskState::Succeeded => {}
            s if s.is_terminal() => {
                return Needs::Broken(format!("needed task `{need}` ended {s}"));
            }
            _ => return Needs::Waiting,
        }
    }
    Needs::Met
}

/// Refuses duplicate keys, unknown needs and cycles.
fn check_graph(keys: &[String], tasks: &[TaskSubmit]) -> Result<()> {
    let bad = |m: String| Err(ServiceError::InvalidSpec(m));
    let mut index = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        if k.is_empty() || k.len() > MAX_KEY_BYTES {
            return bad(format!(
                "task {i}: a key must have 1 to {MAX_KEY_BYTES} bytes"
            ));
        }
        if index.insert(k.as_str(), i).is_some() {
            return bad(format!("duplicate task key `{k}`"));
        }
    }
    for (t, k) in tasks.iter().zip(keys) {
        for n in &t.needs {
            if n == k {
                return bad(format!("task `{k}` needs itself"));
            }
            if !index.contains_key(n.as_str()) {
                return bad(format!("task `{k}` needs `{n}`, which is not in this run"));
            }
        }
    }
    // Kahn's algorithm: whatever cannot be ordered is on a cycle.
    let mut indegree: Vec<usize> = tasks.iter().map(|t| t.needs.len()).collect();
    let mut ready: Vec<usize> = (0..tasks.len()).filter(|&i| indegree[i] == 0).collect();
    let mut ordered = 0;
    while let Some(i) = ready.pop() {
        ordered += 1;
        for (j, t) in tasks.iter().enumerate() {
            let hits = t.needs.iter().filter(|n| **n == keys[i]).count();
            if hits > 0 {
                indegree[j] -= hits;
                if indegree[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if ordered < tasks.len() {
        let on_cycle: Vec<&str> = (0..tasks.len())
            .filter(|&i| indegree[i] > 0)
            .map(|i| keys[i].as_str())
            .collect();
        return bad(format!(
            "the needs of tasks {} form a cycle",
            on_cycle.join(", ")
        ));
    }
    Ok(())
}

fn prefix(e: ServiceError, key: &str) -> ServiceError {
    match e {
        ServiceError::InvalidSpec(m) => ServiceError::InvalidSpec(format!("task `{key}`: {m}")),
        ServiceError::UnknownPlugin(m) => ServiceError::UnknownPlugin(format!("task `{key}`: {m}")),
        e => e,
    }
}

fn validate_plugin_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with("sha256:");
    if ok {
        Ok(())
    } else {
        Err(ServiceError::InvalidSpec(format!(
            "plugin name `{name}`: use 1 to 128 characters among letters, digits, `-`, `_` and `.`"
        )))
    }
}

fn plugin_error(e: LoadError) -> ServiceError {
    ServiceError::InvalidPlugin(e.to_string())
}

/// The kind of a built-in component, read from its exports without
/// compiling it (commands export `wasi:cli/run`).
fn component_kind(bytes: &[u8]) -> PluginKind {
    // A core module (version 1, layer 0) can only be a preview-1 command.
    if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        return PluginKind::Command;
    }
    let needle = b"wasi:cli/run";
    if bytes.windows(needle.len()).any(|w| w == needle)
        && !bytes.windows(13).any(|w| w == b"wasmtask:task")
    {
        PluginKind::Command
    } else {
        PluginKind::Task
    }
}

fn start_failed(message: String) -> Finish {
    Finish {
        state: TaskState::Failed,
        finished_at: now_millis(),
        output: None,
        partial_output: None,
        progress: None,
        error: Some(TaskError {
            kind: ErrorKind::HostError,
            detail: None,
            message,
        }),
        exit_code: None,
        stdout: Default::default(),
        stderr: Default::default(),
        usage: Default::default(),
        cancel_stopped: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(key: &str, needs: &[&str]) -> TaskSubmit {
        TaskSubmit {
            plugin: "hello".into(),
            key: Some(key.into()),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            ..TaskSubmit::default()
        }
    }

    fn keys(ts: &[TaskSubmit]) -> Vec<String> {
        ts.iter()
            .map(|t| t.key.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn graphs_without_cycles_pass() {
        let ts = vec![t("a", &[]), t("b", &["a"]), t("c", &["a", "b"])];
        assert!(check_graph(&keys(&ts), &ts).is_ok());
    }

    #[test]
    fn cycles_duplicates_and_unknown_needs_are_refused() {
        let ts = vec![t("a", &["c"]), t("b", &["a"]), t("c", &["b"]), t("d", &[])];
        let e = check_graph(&keys(&ts), &ts).unwrap_err().to_string();
        assert!(e.contains("tasks a, b, c form a cycle"), "{e}");
        let ts = vec![t("a", &[]), t("a", &[])];
        assert!(
            check_graph(&keys(&ts), &ts)
                .unwrap_err()
                .to_string()
                .contains("duplicate")
        );
        let ts = vec![t("a", &["zz"])];
        assert!(
            check_graph(&keys(&ts), &ts)
                .unwrap_err()
                .to_string()
                .contains("zz")
        );
        let ts = vec![t("a", &["a"])];
        assert!(
            check_graph(&keys(&ts), &ts)
                .unwrap_err()
                .to_string()
                .contains("itself")
        );
    }

    #[test]
    fn builtin_kinds_are_read_from_the_component() {
        let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        for p in builtin::PLUGINS {
            // A plugin with a `main` is a `wasi:cli` command.
            let expected = if plugins.join(p.name).join("src/main.rs").exists() {
                PluginKind::Command
            } else {
                PluginKind::Task
            };
            assert_eq!(component_kind(p.bytes), expected, "{}", p.name);
        }
    }

    #[test]
    fn plugin_names_are_checked() {
        assert!(validate_plugin_name("my-plugin_1.2").is_ok());
        for bad in ["", "a b", "../x", "sha256:abc", "é"] {
            assert!(validate_plugin_name(bad).is_err(), "{bad}");
        }
    }
}
