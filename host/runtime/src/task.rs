//! Running one task attempt: the driver future and its report.
//!
//! [`Runtime::spawn`] builds the sandbox and the cancel state, then spawns a
//! *driver* on the guest pool (`scheduler.rs`), inside the caller's tokio
//! runtime. The driver
//! 1. waits for admission (bounded by `max_concurrent`; cancellable),
//! 2. creates a fresh `Store` (never reused after the attempt),
//! 3. instantiates and calls the guest, racing it against the cancel token,
//!    the grace deadline and the timeout (each wrapped in [`Urgent`], so that
//!    any of them firing puts the driver at the front of the run queue),
//! 4. drops the guest future (unwinding a blocked fiber) and the store, and
//! 5. returns a [`TaskReport`] that says exactly what happened.
//!
//! The report is raw fact (the guest returned, trapped, hit a limit, was
//! stopped by force); deciding the task's final *state* from it (for example
//! a completion that beat a cancel) is the caller's job.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use wasmtime::{Store, Trap, UpdateDeadline};

use crate::cancel::{CancelHandle, CancelRequest, CancelState, StopCause};
use crate::engine::{Plugin, PluginKind, Prepared, Runtime, wt};
use crate::host::{GuestEvent, GuestTaskError, Shared, StoreData};
use crate::limits::{LimitHit, LimitKind, Limiter, TaskLimits};
use crate::sandbox::{self, Capture, Captured, LineSink, SandboxError, WasiSpec};
use crate::scheduler::{Urgent, YieldOnce};

/// Everything needed to run one attempt.
#[derive(Debug)]
pub struct TaskRequest {
    pub plugin: Plugin,
    /// The plugin's name (argv[0] for commands; for logs).
    pub name: String,
    /// Input bytes for task plugins (ignored by commands).
    pub input: Vec<u8>,
    pub wasi: WasiSpec,
    pub limits: TaskLimits,
    /// Where guest logs/progress/checkpoints are reported, if anywhere.
    pub events: Option<mpsc::Sender<GuestEvent>>,
}

/// Why a task could not be started (caused by the request).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("max memory {asked} bytes exceeds this host's ceiling of {ceiling} bytes")]
    MemoryCeiling { asked: u64, ceiling: u64 },
    #[error(transparent)]
    Load(#[from] crate::engine::LoadError),
    #[error("spawn needs a tokio runtime")]
    NoRuntime,
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEnd {
    /// A task plugin returned output bytes.
    Returned(Vec<u8>),
    /// A task plugin returned an error.
    GuestError {
        kind: GuestErrorKind,
        message: String,
    },
    /// A command exited with this code (0 = success).
    Exited(i32),
    /// The guest trapped. `kind` is snake_case (`stack_overflow`,
    /// `unreachable`, …); `message` includes the wasm backtrace.
    Trapped { kind: String, message: String },
    /// A limit was hit (and the guest could not carry on).
    LimitExceeded(LimitHit),
    /// The wall-clock timeout passed and the guest was stopped.
    TimedOut,
    /// The host stopped the guest because of a cancel.
    Cancelled,
    /// The host could not start the guest (instantiation failed).
    StartFailed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestErrorKind {
    Cancelled,
    InvalidInput,
    Failed,
}

impl GuestErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestErrorKind::Cancelled => "cancelled",
            GuestErrorKind::InvalidInput => "invalid_input",
            GuestErrorKind::Failed => "failed",
        }
    }
}

/// The cancel, as it played out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelOutcome {
    pub request: CancelRequest,
    /// The guest read the request through `cancel-requested`.
    pub observed: bool,
    /// The host stopped the guest (trap or drop) rather than the guest
    /// returning by itself.
    pub forced: bool,
    pub stopped_wall: SystemTime,
    /// Request → guest stopped and store dropped.
    pub latency: Duration,
}

/// What happened to one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskReport {
    pub end: TaskEnd,
    pub cancel: Option<CancelOutcome>,
    /// The last checkpoint (kept across forced stops).
    pub checkpoint: Option<Vec<u8>>,
    pub progress: Option<(f32, String)>,
    pub stdout: Captured,
    pub stderr: Captured,
    pub peak_memory: u64,
    pub fuel_consumed: Option<u64>,
    pub started_wall: SystemTime,
    pub finished_wall: SystemTime,
    pub duration: Duration,
}

/// A task that is running (or waiting for admission).
#[derive(Debug)]
pub struct RunningTask {
    cancel: CancelHandle,
    shared: Arc<Shared>,
    report: crate::wake::ReportReceiver<TaskReport>,
    started_wall: SystemTime,
}

impl RunningTask {
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Live view of progress/checkpoint while the task runs.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Resolves once the guest is instantiated and running its entry point
    /// (or has already ended).
    pub async fn started(&self) {
        let mut rx = self.shared.started.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits for the attempt to end. Never fails: a driver that died is
    /// reported as [`TaskEnd::StartFailed`] with the reason.
    pub async fn wait(self) -> TaskReport {
        match self.report.await {
            Ok(r) => r,
            Err(_) => {
                let now = SystemTime::now();
                TaskReport {
                    end: TaskEnd::StartFailed(
                        "task driver died without a report (it panicked)".into(),
                    ),
                    cancel: None,
                    checkpoint: self.shared.checkpoint(),
                    progress: self.shared.progress(),
                    stdout: Captured::default(),
                    stderr: Captured::default(),
                    peak_memory: 0,
                    fuel_consumed: None,
                    started_wall: self.started_wall,
                    finished_wall: now,
                    duration: now.duration_since(self.started_wall).unwrap_or_default(),
                }
            }
        }
    }
}

/// The error the epoch callback traps with when the host stops a guest.
#[derive(Debug, thiserror::Error)]
#[error("stopped by the host ({0:?})")]
struct Stopped(StopCause);

enum GuestOut {
    Task(Result<Vec<u8>, GuestTaskError>),
    Command(Result<(), ()>),
}

enum Race {
    Finished(wasmtime::Result<GuestOut>),
    Stopped,
}

impl Runtime {
    /// Starts one attempt on the current tokio runtime.
    pub fn spawn(&self, req: TaskRequest) -> Result<RunningTask, StartError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        let cfg = &self.inner.config;
        let max_memory = req.limits.max_memory.unwrap_or(cfg.default_max_memory);
        if max_memory > cfg.memory_ceiling {
            return Err(StartError::MemoryCeiling {
                asked: max_memory,
                ceiling: cfg.memory_ceiling,
            });
        }
        let fuel = req.limits.fuel;
        let engine = if fuel.is_some() {
            self.inner.engines.fuel()?.0.clone()
        } else {
            self.inner.engines.plain.clone()
        };

        let shared = Arc::new(Shared::default());
        let sink = |stream| {
            req.events.as_ref().map(|tx| LineSink {
                stream,
                tx: tx.clone(),
                shared: Arc::clone(&shared),
                max_line: cfg.caps.max_message_bytes,
            })
        };
        let stdout = Capture::new(cfg.capture_limit, req.wasi.stdout_tee).with_sink(sink("stdout"));
        let stderr = Capture::new(cfg.capture_limit, req.wasi.stderr_tee).with_sink(sink("stderr"));
        let wasi = sandbox::build(req.wasi, &req.name, &stdout, &stderr)?;
        let cancel = Arc::new(CancelState::new(engine.clone()));
        let limiter = Limiter::new(max_memory, cfg);
        let started_wall = SystemTime::now();
        let driver = Driver {
            rt: self.clone(),
            plugin: req.plugin.clone(),
            fuel,
            engine,
            input: req.input,
            timeout: req.limits.timeout,
            cancel: Arc::clone(&cancel),
            shared: Arc::clone(&shared),
            stdout,
            stderr,
            started_wall,
        };
        let data = StoreData::new(
            wasi,
            limiter,
            Arc::clone(&cancel),
            Arc::clone(&shared),
            req.events,
            cfg.caps,
        );
        // The report goes from a guest thread to the waiter through the
        // runtime's I/O driver (`wake.rs`): one wake-up instead of two.
        let (tx, report) = crate::wake::report_channel(crate::wake::relay_for(&handle));
        self.inner
            .pool
            .spawn(handle, Arc::clone(cancel.urgent()), async move {
                // The caller may have stopped waiting; the report is then moot.
                tx.send(driver.run(data).await);
            });
        Ok(RunningTask {
            cancel: CancelHandle { state: cancel },
            shared,
            report,
            started_wall,
        })
    }
}

struct Driver {
    rt: Runtime,
    plugin: Plugin,
    fuel: Option<u64>,
    engine: wasmtime::Engine,
    input: Vec<u8>,
    timeout: Option<Duration>,
    cancel: Arc<CancelState>,
    shared: Arc<Shared>,
    stdout: Capture,
    stderr: Capture,
    started_wall: SystemTime,
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

impl Driver {
    async fn run(self, mut data: StoreData) -> TaskReport {
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        data.deadline = deadline;

        // Admission: bounded concurrency (and pool slots). Cancellable.
        let urgent = self.cancel.urgent();
        let permit = tokio::select! {
            biased;
            _ = Urgent::new(urgent, self.cancel.hard_token().cancelled()) => None,
            p = Arc::clone(&self.rt.inner.admission).acquire_owned() => p.ok(),
        };
        let Some(_permit) = permit else {
            return self.report(TaskEnd::Cancelled, 0, None, started);
        };

        let mut store = Store::new(&self.engine, data);
        store.limiter(|d| &mut d.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            let data = ctx.data();
            if data.cancel.is_forced() {
                let cause = data.cancel.cause().unwrap_or(StopCause::Cancel);
                return Err(wasmtime::Error::new(Stopped(cause)));
            }
            if data.deadline.is_some_and(|d| Instant::now() >= d) {
                data.cancel.force(StopCause::Timeout);
                return Err(wasmtime::Error::new(Stopped(StopCause::Timeout)));
            }
            // End this poll: the guest goes to the back of the pool's run
            // queue and its thread takes the next guest (time slicing).
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(YieldOnce::default()),
            ))
        });
        if let Some(f) = self.fuel
            && let Err(e) = store.set_fuel(f)
        {
            return self.report(
                TaskEnd::StartFailed(format!("cannot set fuel: {e}")),
                0,
                None,
                started,
            );
        }

        let prepared = if self.fuel.is_some() {
            if self.plugin.inner.fuel.get().is_none() {
                // First fuel task of this plugin: compile the metered variant
                // off the async runtime.
                let (rt, plugin) = (self.rt.clone(), self.plugin.clone());
                let compiled =
                    tokio::task::spawn_blocking(move || rt.fuel_variant(&plugin).map(|_| ())).await;
                match compiled {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return self.report(TaskEnd::StartFailed(e.to_string()), 0, None, started);
                    }
                    Err(e) => {
                        return self.report(TaskEnd::StartFailed(e.to_string()), 0, None, started);
                    }
                }
            }
            self.plugin.inner.fuel.get()
        } else {
            Some(&self.plugin.inner.plain)
        };
        let Some(prepared) = prepared else {
            return self.report(
                TaskEnd::StartFailed("fuel variant of the plugin is missing".into()),
                0,
                None,
                started,
            );
        };

        let race = {
            let store_ref = &mut store;
            let input = &self.input;
            let started = &self.shared.started;
            let guest = async move {
                match prepared {
                    Prepared::Task(pre) => {
                        let inst = pre.instantiate_async(&mut *store_ref).await?;
                        started.send_replace(true);
                        let out = inst.call_run(&mut *store_ref, input).await?;
                        Ok(GuestOut::Task(out))
                    }
                    Prepared::Command(pre) => {
                        let cmd = pre.instantiate_async(&mut *store_ref).await?;
                        started.send_replace(true);
                        let out = cmd.wasi_cli_run().call_run(&mut *store_ref).await?;
                        Ok(GuestOut::Command(out))
                    }
                    Prepared::Core(pre) => {
                        let inst = pre.instantiate_async(&mut *store_ref).await?;
                        let start = inst.get_typed_func::<(), ()>(&mut *store_ref, "_start")?;
                        started.send_replace(true);
                        // Returning from `_start` is exit 0; `proc_exit(n)`
                        // arrives as an `I32Exit` error (classified below).
                        start.call_async(&mut *store_ref, ()).await?;
                        Ok(GuestOut::Command(Ok(())))
                    }
                }
            };
            tokio::pin!(guest);
            let urgent = self.cancel.urgent();
            loop {
                let grace = self.cancel.grace_deadline();
                let grace_at = grace.map(Into::into).unwrap_or_else(far_future);
                let deadline_at = deadline.map(Into::into).unwrap_or_else(far_future);
                tokio::select! {
                    biased;
                    _ = Urgent::new(urgent, self.cancel.hard_token().cancelled()) => break Race::Stopped,
                    _ = Urgent::new(urgent, self.cancel.changed()) => continue,
                    _ = Urgent::new(urgent, tokio::time::sleep_until(grace_at)), if grace.is_some() => {
                        self.cancel.force(StopCause::Cancel);
                    }
                    _ = Urgent::new(urgent, tokio::time::sleep_until(deadline_at)), if deadline.is_some() => {
                        self.cancel.force(StopCause::Timeout);
                    }
                    r = &mut guest => break Race::Finished(r),
                }
            }
            // The guest future (and with it a blocked fiber) is dropped here.
        };

        let limiter_hit = store.data().limiter.hit.clone();
        let peak = store.data().limiter.peak_memory;
        let fuel_consumed = self
            .fuel
            .and_then(|f| store.get_fuel().ok().map(|left| f.saturating_sub(left)));
        drop(store);

        let end = match race {
            Race::Stopped => self.stopped_end(),
            Race::Finished(Ok(GuestOut::Task(Ok(bytes)))) => TaskEnd::Returned(bytes),
            Race::Finished(Ok(GuestOut::Task(Err(e)))) => {
                let (kind, message) = match e {
                    GuestTaskError::Cancelled(m) => (GuestErrorKind::Cancelled, m),
                    GuestTaskError::InvalidInput(m) => (GuestErrorKind::InvalidInput, m),
                    GuestTaskError::Failed(m) => (GuestErrorKind::Failed, m),
                };
                match self.shared.limit_hit().or(limiter_hit) {
                    // The guest failed after the host refused it a resource:
                    // the limit is the cause worth reporting.
                    Some(hit) if kind == GuestErrorKind::Failed => TaskEnd::LimitExceeded(hit),
                    _ => TaskEnd::GuestError { kind, message },
                }
            }
            Race::Finished(Ok(GuestOut::Command(Ok(())))) => TaskEnd::Exited(0),
            Race::Finished(Ok(GuestOut::Command(Err(())))) => TaskEnd::Exited(1),
            Race::Finished(Err(e)) => self.classify_error(e, limiter_hit),
        };
        self.report(end, peak, fuel_consumed, started)
    }

    fn stopped_end(&self) -> TaskEnd {
        match self.cancel.cause() {
            Some(StopCause::Timeout) => TaskEnd::TimedOut,
            _ => TaskEnd::Cancelled,
        }
    }

    fn classify_error(&self, e: wasmtime::Error, limiter_hit: Option<LimitHit>) -> TaskEnd {
        if let Some(Stopped(cause)) = e.downcast_ref::<Stopped>() {
            return match cause {
                StopCause::Timeout => TaskEnd::TimedOut,
                StopCause::Cancel => TaskEnd::Cancelled,
            };
        }
        if self.cancel.is_forced() {
            return self.stopped_end();
        }
        if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return TaskEnd::Exited(exit.0);
        }
        if let Some(hit) = self.shared.limit_hit().or(limiter_hit) {
            return TaskEnd::LimitExceeded(hit);
        }
        if let Some(trap) = e.downcast_ref::<Trap>() {
            if *trap == Trap::OutOfFuel {
                return TaskEnd::LimitExceeded(LimitHit {
                    kind: LimitKind::Fuel,
                    requested: self.fuel.unwrap_or(0).saturating_add(1),
                    allowed: self.fuel.unwrap_or(0),
                });
            }
            let mut message = format!("{e:?}");
            if let Some(panic) = panic_line(&self.stderr.snapshot().data) {
                message = format!("guest panicked: {panic}\n{message}");
            }
            return TaskEnd::Trapped {
                kind: trap_kind(*trap),
                message: cap(message),
            };
        }
        TaskEnd::StartFailed(cap(format!("{:?}", wt(e))))
    }

    fn report(
        &self,
        end: TaskEnd,
        peak_memory: u64,
        fuel_consumed: Option<u64>,
        started: Instant,
    ) -> TaskReport {
        self.cancel.mark_finished();
        self.stdout.finish_stream();
        self.stderr.finish_stream();
        // Wake anyone waiting for the start: the attempt is over either way.
        self.shared.started.send_replace(true);
        let now = Instant::now();
        let finished_wall = SystemTime::now();
        let cancel = self.cancel.request().map(|request| CancelOutcome {
            observed: self.cancel.observed(),
            forced: matches!(end, TaskEnd::Cancelled),
            latency: now.saturating_duration_since(request.requested_at),
            stopped_wall: finished_wall,
            request,
        });
        TaskReport {
            end,
            cancel,
            checkpoint: self.shared.checkpoint(),
            progress: self.shared.progress(),
            stdout: self.stdout.snapshot(),
            stderr: self.stderr.snapshot(),
            peak_memory,
            fuel_consumed,
            started_wall: self.started_wall,
            finished_wall,
            duration: now.saturating_duration_since(started),
        }
    }
}

const MAX_MESSAGE: usize = 8 * 1024;

fn cap(s: String) -> String {
    crate::host::cap_string(s, MAX_MESSAGE)
}

/// The first line of a Rust panic message in the guest's stderr, if any.
fn panic_line(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.find("panicked at")?;
    let rest = &text[start..];
    // "panicked at src/lib.rs:3:5:\nmessage" — keep location and message.
    let mut lines = rest.lines();
    let first = lines.next()?.trim_end_matches(':').to_owned();
    Some(match lines.next() {
        Some(msg) => format!("{msg} ({first})"),
        None => first,
    })
}

/// `Trap::StackOverflow` → `stack_overflow`.
fn trap_kind(trap: Trap) -> String {
    let named = match trap {
        Trap::StackOverflow => "stack_overflow",
        Trap::MemoryOutOfBounds => "memory_out_of_bounds",
        Trap::UnreachableCodeReached => "unreachable",
        Trap::IntegerDivisionByZero => "integer_division_by_zero",
        Trap::IntegerOverflow => "integer_overflow",
        Trap::IndirectCallToNull => "indirect_call_to_null",
        Trap::BadSignature => "bad_signature",
        Trap::TableOutOfBounds => "table_out_of_bounds",
        Trap::BadConversionToInteger => "bad_conversion_to_integer",
        Trap::Interrupt => "interrupt",
        Trap::OutOfFuel => "out_of_fuel",
        _ => "",
    };
    if !named.is_empty() {
        return named.to_owned();
    }
    let mut out = String::new();
    for (i, ch) in format!("{trap:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Task => "task",
            PluginKind::Command => "command",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_line_finds_the_message() {
        let s = b"about to panic\nthread 'main' panicked at src/lib.rs:9:5:\npanicker: deliberate panic\nnote: run with";
        assert_eq!(
            panic_line(s).unwrap(),
            "panicker: deliberate panic (panicked at src/lib.rs:9:5)"
        );
        assert!(panic_line(b"all good").is_none());
    }

    #[test]
    fn trap_kinds_are_snake_case() {
        assert_eq!(trap_kind(Trap::StackOverflow), "stack_overflow");
        assert_eq!(trap_kind(Trap::NullReference), "null_reference");
    }
}
