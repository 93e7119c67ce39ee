//! The bridge between the runtime (wasmtime types) and the record (database
//! types): builds a runtime request from a [`TaskSpec`], pumps guest events
//! into the event trail, and turns a [`TaskReport`] into a [`Finish`].
//!
//! Deciding the final state from the report is done here, from facts only:
//! - the guest returned (or returned `cancelled`) after it *saw* a pending
//!   cancel → `canceled`, acknowledged, its output kept;
//! - the guest returned without having seen the cancel → `succeeded` (the
//!   completion beat the cancel; the cancel record says so);
//! - the host stopped it → `canceled`, forced; the last checkpoint is kept;
//! - everything else maps to `failed` with a typed error, or `timed_out`.
//!
//! The database then settles any remaining race in one transaction (a failure
//! after a recorded cancel becomes `canceled`).

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::mpsc;
use wasmtask_runtime::{
    GuestErrorKind, GuestEvent, Plugin, Preopen, Stdin, TaskEnd, TaskLimits, TaskReport,
    TaskRequest, Tee, WasiSpec,
};

use crate::db::Db;
use crate::model::{
    CancelStop, Captured, ErrorKind, EventKind, Finish, NewEvent, PluginKind, Progress, TaskError,
    TaskSpec, TaskState, UnixMillis, Usage,
};

/// Host-side I/O choices that are not part of the stored spec.
#[derive(Debug, Default)]
pub struct LocalIo {
    /// Mirror the guest's stdout/stderr to this process's own streams.
    pub tee: bool,
    /// Overrides the spec's stdin (e.g. the CLI's own stdin).
    pub stdin: Option<Stdin>,
}

/// Why a spec cannot run (the submitter's mistake).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("input must be JSON: {0}")]
    Input(String),
}

pub fn plugin_kind(kind: wasmtask_runtime::PluginKind) -> PluginKind {
    match kind {
        wasmtask_runtime::PluginKind::Task => PluginKind::Task,
        wasmtask_runtime::PluginKind::Command => PluginKind::Command,
    }
}

/// Builds the runtime request for one attempt.
pub fn request(
    plugin: Plugin,
    name: &str,
    spec: &TaskSpec,
    io: LocalIo,
    events: Option<mpsc::Sender<GuestEvent>>,
) -> Result<TaskRequest, SpecError> {
    let input = match &spec.input {
        Some(v) => serde_json::to_vec(v).map_err(|e| SpecError::Input(e.to_string()))?,
        None => Vec::new(),
    };
    let stdin = match io.stdin {
        Some(s) => s,
        None => match &spec.stdin {
            Some(text) => Stdin::Bytes(text.clone().into_bytes()),
            None => Stdin::Empty,
        },
    };
    let wasi = WasiSpec {
        args: spec.args.clone(),
        env: spec.env.clone(),
        stdin,
        dirs: spec
            .dirs
            .iter()
            .map(|d| Preopen {
                host: PathBuf::from(&d.host),
                guest: d.guest.clone(),
                writable: d.writable,
            })
            .collect(),
        cwd: spec.cwd.clone(),
        stdout_tee: io.tee.then_some(Tee::Stdout),
        stderr_tee: io.tee.then_some(Tee::Stderr),
    };
    Ok(TaskRequest {
        plugin,
        name: name.to_owned(),
        input,
        wasi,
        limits: TaskLimits {
            timeout: spec.limits.timeout_ms.map(Duration::from_millis),
            max_memory: spec.limits.max_memory_bytes,
            fuel: spec.limits.fuel,
        },
        events,
    })
}

/// Sees each guest event as it is pumped (the CLI prints logs with it).
pub type EventObserver = Box<dyn Fn(&GuestEvent) + Send + Sync>;

/// Events buffered per task before a guest flood starts being coalesced.
pub const EVENT_BUFFER: usize = 1024;

/// Turns one guest event into a trail event.
pub fn trail_event(task_id: &str, ev: &GuestEvent) -> NewEvent {
    use serde_json::json;
    match ev {
        GuestEvent::Log {
            level,
            message,
            fields,
        } => NewEvent::task(
            task_id,
            EventKind::TaskLog,
            json!({
                "level": level,
                "message": message,
                "fields": fields
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect::<serde_json::Map<_, _>>(),
            }),
        ),
        GuestEvent::Progress { fraction, message } => NewEvent::task(
            task_id,
            EventKind::TaskProgress,
            json!({"fraction": fraction, "message": message}),
        ),
        GuestEvent::Checkpoint { bytes } => {
            NewEvent::task(task_id, EventKind::TaskCheckpoint, json!({"bytes": bytes}))
        }
        GuestEvent::CancelObserved { reason } => NewEvent::task(
            task_id,
            EventKind::TaskLog,
            json!({"level": "info", "source": "host", "message": "the guest saw the cancel request", "reason": reason}),
        ),
        // A line of stdout/stderr is a log record tagged with its stream.
        GuestEvent::Output { stream, line } => NewEvent::task(
            task_id,
            EventKind::TaskLog,
            json!({"level": if *stream == "stderr" { "warn" } else { "info" }, "source": "guest", "stream": stream, "message": line}),
        ),
        GuestEvent::Dropped { count } => NewEvent::task(
            task_id,
            EventKind::TaskLog,
            json!({"level": "warn", "source": "host", "message": format!("{count} guest events dropped (flood)"), "dropped": count}),
        ),
    }
}

/// How long the pump holds a batch of guest events for more to join it
/// (or for the guest to end, when the batch goes with the task's final
/// write instead of a write of its own).
pub const EVENT_COALESCE: std::time::Duration = std::time::Duration::from_millis(10);

/// Drains guest events into the trail in batches until the guest's store is
/// gone (the channel closes). A batch waits up to [`EVENT_COALESCE`] for more
/// events before it is written (at most 256 at a time); the batch still
/// waiting when the channel closes is not written but returned, for the
/// caller to store with the task's end in one transaction (for a short task,
/// that saves a write). `observe` sees every event first (the CLI prints
/// logs with it).
pub fn pump_events(
    db: Db,
    task_id: String,
    mut rx: mpsc::Receiver<GuestEvent>,
    observe: Option<EventObserver>,
) -> tokio::task::JoinHandle<Vec<NewEvent>> {
    tokio::spawn(async move {
        let push = |ev: GuestEvent, batch: &mut Vec<NewEvent>| {
            if let Some(f) = &observe {
                f(&ev);
            }
            batch.push(trail_event(&task_id, &ev));
        };
        while let Some(first) = rx.recv().await {
            let mut batch = Vec::new();
            push(first, &mut batch);
            let hold = tokio::time::sleep(EVENT_COALESCE);
            tokio::pin!(hold);
            let mut closed = false;
            while batch.len() < 256 {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => push(ev, &mut batch),
                        None => {
                            closed = true;
                            break;
                        }
                    },
                    _ = &mut hold => break,
                }
            }
            if closed {
                return batch;
            }
            if let Err(e) = db.append_events(batch).await {
                tracing::warn!(task = %task_id, error = %e, "cannot store guest events");
            }
        }
        Vec::new()
    })
}

fn millis(t: std::time::SystemTime) -> UnixMillis {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Bytes a guest produced, as JSON when they are JSON, else as a string.
pub fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn captured(c: wasmtask_runtime::Captured) -> Captured {
    Captured {
        data: c.data,
        total_bytes: c.total_bytes,
        truncated: c.truncated,
    }
}

fn err(kind: ErrorKind, detail: Option<&str>, message: impl Into<String>) -> Option<TaskError> {
    Some(TaskError {
        kind,
        detail: detail.map(str::to_owned),
        message: message.into(),
    })
}

/// Decides the final state and record fields from what the runtime saw.
pub fn finish(report: TaskReport) -> Finish {
    let saw_cancel = report.cancel.as_ref().is_some_and(|c| c.observed);
    let cancel_pending = report.cancel.is_some();
    let mut output = None;
    let mut exit_code = None;
    let (state, error) = match &report.end {
        TaskEnd::Returned(bytes) => {
            output = Some(json_or_text(bytes));
            if saw_cancel {
                (TaskState::Canceled, None)
            } else {
                (TaskState::Succeeded, None)
            }
        }
        TaskEnd::GuestError { kind, message } => {
            let e = err(ErrorKind::GuestError, Some(kind.as_str()), message.clone());
            if *kind == GuestErrorKind::Cancelled && cancel_pending {
                (TaskState::Canceled, e)
            } else {
                (TaskState::Failed, e)
            }
        }
        TaskEnd::Exited(0) => {
            exit_code = Some(0);
            (TaskState::Succeeded, None)
        }
        TaskEnd::Exited(code) => {
            exit_code = Some(*code);
            (
                TaskState::Failed,
                err(
                    ErrorKind::ExitCode,
                    None,
                    format!("exited with code {code}"),
                ),
            )
        }
        TaskEnd::Trapped { kind, message } => (
            TaskState::Failed,
            err(ErrorKind::Trap, Some(kind), message.clone()),
        ),
        TaskEnd::LimitExceeded(hit) => (
            TaskState::Failed,
            err(
                ErrorKind::LimitExceeded,
                Some(hit.kind.as_str()),
                hit.to_string(),
            ),
        ),
        TaskEnd::TimedOut => (
            TaskState::TimedOut,
            err(
                ErrorKind::Timeout,
                None,
                "the wall-clock timeout passed; the guest was stopped",
            ),
        ),
        TaskEnd::Cancelled => {
            let message = match &report.cancel {
                Some(c) if !c.request.grace.is_zero() => format!(
                    "stopped by force after the {} ms grace ran out",
                    c.request.grace.as_millis()
                ),
                _ => "stopped by force".to_owned(),
            };
            (TaskState::Canceled, err(ErrorKind::Canceled, None, message))
        }
        TaskEnd::StartFailed(message) => (
            TaskState::Failed,
            err(ErrorKind::HostError, None, message.clone()),
        ),
    };
    let cancel_stopped = report.cancel.as_ref().map(|c| CancelStop {
        stopped_at: millis(c.stopped_wall),
        acknowledged: c.observed && !c.forced,
        forced: c.forced,
        latency_us: u64::try_from(c.latency.as_micros()).unwrap_or(u64::MAX),
    });
    Finish {
        state,
        finished_at: millis(report.finished_wall),
        output,
        partial_output: report.checkpoint.as_deref().map(json_or_text),
        progress: report
            .progress
            .map(|(fraction, message)| Progress { fraction, message }),
        error,
        exit_code,
        stdout: captured(report.stdout),
        stderr: captured(report.stderr),
        usage: Usage {
            peak_memory_bytes: report.peak_memory,
            fuel_consumed: report.fuel_consumed,
        },
        cancel_stopped,
    }
}
