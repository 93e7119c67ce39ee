//! Tasks and their cancel records: the state machine, decided inside the
//! writer's transaction, and the one place a row becomes a [`TaskRecord`].
//!
//! Every function that changes a task reads its current row first and
//! decides from it; since the writer runs one job at a time, the read and the
//! write cannot be separated by another change. A `cancels` row exists only
//! for a task that is (or was, before it ended) `cancel_requested`, or that was
//! canceled while queued.

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, named_params, params, params_from_iter};
use serde_json::{Map, Value, json};

use super::events::{self, MAX_EVENT_MESSAGE_BYTES};
use super::{
    CancelDecision, CancelRequest, DbError, MAX_ACTOR_BYTES, MAX_REASON_BYTES, NewTask, QueuedTask,
    Recovery, Result, StartDecision, TaskFilter, from_sql_u64, plugins, runs, to_sql_u64,
    truncate_utf8,
};
use crate::model::{
    CancelRecord, CancelStop, Captured, ErrorKind, EventKind, Finish, NewEvent, PluginKind,
    Progress, TaskError, TaskRecord, TaskState, UnixMillis, Usage, now_millis,
};

/// Tasks per page when the filter names no limit.
pub const DEFAULT_TASKS_PAGE: usize = 50;
/// Most tasks per page.
pub const MAX_TASKS_PAGE: usize = 1000;
/// Largest partial output kept on a task row, as JSON text (1 MiB); a larger
/// checkpoint is stored as `{"truncated": true, "bytes": N}`. Checkpoints are
/// written repeatedly, so they get a bound; final `output` is bounded by the
/// executor's limits instead.
pub const MAX_PARTIAL_OUTPUT_BYTES: usize = 1024 * 1024;
/// Longest stored error message and detail, in bytes (8 KiB).
pub const MAX_ERROR_TEXT_BYTES: usize = 8 * 1024;

const HOST_RESTART_RUNNING: &str = "the host process ended while the task was running";
const HOST_RESTART_CANCELING: &str = "the host process ended while the task was being canceled";

/// The select every task read goes through: the task row and its cancel
/// record in one statement, hence one consistent snapshot.
const SELECT_TASK: &str = "SELECT t.*,
        c.actor AS c_actor, c.reason AS c_reason, c.grace_ms AS c_grace_ms,
        c.requested_at AS c_requested_at, c.stopped_at AS c_stopped_at,
        c.acknowledged AS c_acknowledged, c.forced AS c_forced, c.latency_us AS c_latency_us
    FROM tasks t LEFT JOIN cancels c ON c.task_id = t.id";

/// The columns of [`SELECT_TASK`], in order: `t.*` in the table's order, then
/// the cancel record. Rows are read by position ([`col!`]): looking a column
/// up by name scans every column name of the statement, and that was a
/// tenth of the task service's time. A test checks this list against the
/// statement.
const TASK_COLUMNS: [&str; 37] = [
    "id",
    "plugin_id",
    "plugin_name",
    "plugin_kind",
    "run_id",
    "state",
    "spec",
    "attempt",
    "max_attempts",
    "queued_at",
    "started_at",
    "cancel_requested_at",
    "finished_at",
    "output",
    "partial_output",
    "progress_fraction",
    "progress_message",
    "error_kind",
    "error_detail",
    "error_message",
    "exit_code",
    "stdout",
    "stdout_total",
    "stdout_truncated",
    "stderr",
    "stderr_total",
    "stderr_truncated",
    "peak_memory_bytes",
    "fuel_consumed",
    "c_actor",
    "c_reason",
    "c_grace_ms",
    "c_requested_at",
    "c_stopped_at",
    "c_acknowledged",
    "c_forced",
    "c_latency_us",
];

/// The position of a column of [`SELECT_TASK`], found at compile time.
const fn column(name: &str) -> usize {
    let mut i = 0;
    while i < TASK_COLUMNS.len() {
        let (a, b) = (TASK_COLUMNS[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    // Evaluated only in constants (`col!`): a typo fails the build.
    #[allow(clippy::panic)]
    {
        panic!("not a column of SELECT_TASK")
    }
}

/// `col!("state")`: the position of that column, as a constant.
macro_rules! col {
    ($name:literal) => {{
        const AT: usize = column($name);
        AT
    }};
}

/// Outcome columns of one attempt, reset when a new attempt starts.
const RESET_ATTEMPT: &str = "cancel_requested_at = NULL, finished_at = NULL, output = NULL,
    partial_output = NULL, progress_fraction = NULL, progress_message = NULL,
    error_kind = NULL, error_detail = NULL, error_message = NULL, exit_code = NULL,
    stdout = x'', stdout_total = 0, stdout_truncated = 0,
    stderr = x'', stderr_total = 0, stderr_truncated = 0,
    peak_memory_bytes = 0, fuel_consumed = NULL";

// ---------------------------------------------------------------------------
// Row mapping

fn corrupt(id: &str, what: &'static str, detail: impl Into<String>) -> DbError {
    DbError::Corrupt {
        id: id.to_owned(),
        what,
        detail: detail.into(),
    }
}

fn json_column(row: &Row<'_>, id: &str, at: usize) -> Result<Option<Value>> {
    let text: Option<String> = row.get(at)?;
    let name = TASK_COLUMNS.get(at).copied().unwrap_or("json");
    text.map(|text| serde_json::from_str(&text).map_err(|e| corrupt(id, name, e.to_string())))
        .transpose()
}

/// A captured stream: its data column, then `_total` and `_truncated`.
fn captured(row: &Row<'_>, data: usize) -> Result<Captured> {
    Ok(Captured {
        data: row.get(data)?,
        total_bytes: from_sql_u64(row.get(data + 1)?),
        truncated: row.get(data + 2)?,
    })
}

/// The one mapping from a row of [`SELECT_TASK`] to a [`TaskRecord`].
fn task_from_row(row: &Row<'_>) -> Result<TaskRecord> {
    let id: String = row.get(col!("id"))?;

    let state: String = row.get(col!("state"))?;
    let state = TaskState::parse(&state).ok_or_else(|| corrupt(&id, "state", state.clone()))?;
    let kind: String = row.get(col!("plugin_kind"))?;
    let plugin_kind =
        PluginKind::parse(&kind).ok_or_else(|| corrupt(&id, "plugin kind", kind.clone()))?;
    let spec: String = row.get(col!("spec"))?;
    let spec = serde_json::from_str(&spec).map_err(|e| corrupt(&id, "spec", e.to_string()))?;

    let progress = match row.get::<_, Option<f64>>(col!("progress_fraction"))? {
        Some(fraction) => Some(Progress {
            fraction: fraction as f32,
            message: row
                .get::<_, Option<String>>(col!("progress_message"))?
                .unwrap_or_default(),
        }),
        None => None,
    };
    let error = match row.get::<_, Option<String>>(col!("error_kind"))? {
        Some(kind) => Some(TaskError {
            kind: ErrorKind::parse(&kind)
                .ok_or_else(|| corrupt(&id, "error kind", kind.clone()))?,
            detail: row.get(col!("error_detail"))?,
            message: row
                .get::<_, Option<String>>(col!("error_message"))?
                .unwrap_or_default(),
        }),
        None => None,
    };
    let cancel = match row.get::<_, Option<String>>(col!("c_actor"))? {
        Some(actor) => Some(CancelRecord {
            actor,
            reason: row.get(col!("c_reason"))?,
            grace_ms: from_sql_u64(row.get(col!("c_grace_ms"))?),
            requested_at: row.get(col!("c_requested_at"))?,
            stopped_at: row.get(col!("c_stopped_at"))?,
            acknowledged: row.get(col!("c_acknowledged"))?,
            forced: row.get(col!("c_forced"))?,
            latency_us: row
                .get::<_, Option<i64>>(col!("c_latency_us"))?
                .map(from_sql_u64),
        }),
        None => None,
    };

    Ok(TaskRecord {
        plugin_id: row.get(col!("plugin_id"))?,
        plugin_name: row.get(col!("plugin_name"))?,
        plugin_kind,
        state,
        run_id: row.get(col!("run_id"))?,
        spec,
        attempt: row.get(col!("attempt"))?,
        max_attempts: row.get(col!("max_attempts"))?,
        queued_at: row.get(col!("queued_at"))?,
        started_at: row.get(col!("started_at"))?,
        cancel_requested_at: row.get(col!("cancel_requested_at"))?,
        finished_at: row.get(col!("finished_at"))?,
        output: json_column(row, &id, col!("output"))?,
        partial_output: json_column(row, &id, col!("partial_output"))?,
        progress,
        error,
        exit_code: row.get(col!("exit_code"))?,
        stdout: captured(row, col!("stdout"))?,
        stderr: captured(row, col!("stderr"))?,
        usage: Usage {
            peak_memory_bytes: from_sql_u64(row.get(col!("peak_memory_bytes"))?),
            fuel_consumed: row
                .get::<_, Option<i64>>(col!("fuel_consumed"))?
                .map(from_sql_u64),
        },
        cancel,
        id,
    })
}

// ---------------------------------------------------------------------------
// Reads (also used inside write jobs)

pub(super) fn load(conn: &Connection, id: &str) -> Result<Option<TaskRecord>> {
    conn.prepare_cached(&format!("{SELECT_TASK} WHERE t.id = ?1"))?
        .query_and_then([id], task_from_row)?
        .next()
        .transpose()
}

/// [`load`] for a task the current job knows exists.
fn load_existing(conn: &Connection, id: &str) -> Result<TaskRecord> {
    load(conn, id)?.ok_or_else(|| DbError::TaskNotFound(id.to_owned()))
}

/// A task's state and run, for event appends.
pub(super) fn state_and_run(
    conn: &Connection,
    id: &str,
) -> Result<Option<(TaskState, Option<String>)>> {
    let found = conn
        .prepare_cached("SELECT state, run_id FROM tasks WHERE id = ?1")?
        .query_row([id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })
        .optional()?;
    match found {
        Some((state, run_id)) => match TaskState::parse(&state) {
            Some(state) => Ok(Some((state, run_id))),
            None => Err(corrupt(id, "state", state)),
        },
        None => Ok(None),
    }
}

pub(super) fn list(conn: &Connection, filter: &TaskFilter) -> Result<Vec<TaskRecord>> {
    let limit = filter
        .limit
        .unwrap_or(DEFAULT_TASKS_PAGE)
        .min(MAX_TASKS_PAGE);
    if limit == 0 {
        return Ok(Vec::new());
    }
    // The cursor lookup and the page come from one snapshot.
    let tx = conn.unchecked_transaction()?;
    let mut clauses: Vec<&str> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    if let Some(state) = filter.state {
        clauses.push("t.state = ?");
        values.push(SqlValue::Text(state.as_str().to_owned()));
    }
    if let Some(run_id) = &filter.run_id {
        clauses.push("t.run_id = ?");
        values.push(SqlValue::Text(run_id.clone()));
    }
    if let Some(plugin) = &filter.plugin {
        clauses.push("t.plugin_name = ?");
        values.push(SqlValue::Text(plugin.clone()));
    }
    if let Some(cursor) = &filter.cursor {
        let queued_at: Option<i64> = tx
            .prepare_cached("SELECT queued_at FROM tasks WHERE id = ?1")?
            .query_row([cursor], |row| row.get(0))
            .optional()?;
        let Some(queued_at) = queued_at else {
            return Err(DbError::BadCursor(cursor.clone()));
        };
        clauses.push(if filter.oldest_first {
            "(t.queued_at, t.id) > (?, ?)"
        } else {
            "(t.queued_at, t.id) < (?, ?)"
        });
        values.push(SqlValue::Integer(queued_at));
        values.push(SqlValue::Text(cursor.clone()));
    }
    let mut sql = String::from(SELECT_TASK);
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    sql.push_str(if filter.oldest_first {
        " ORDER BY t.queued_at ASC, t.id ASC LIMIT ?"
    } else {
        " ORDER BY t.queued_at DESC, t.id DESC LIMIT ?"
    });
    values.push(SqlValue::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    let page = {
        let mut statement = tx.prepare_cached(&sql)?;
        statement
            .query_and_then(params_from_iter(values), task_from_row)?
            .collect::<Result<Vec<_>>>()?
    };
    Ok(page)
}

/// Queued tasks for the dispatcher, oldest first, among the oldest `scan`:
/// rows whose id is in `skip` (already being started) are passed over
/// without being decoded, and the scan stops once `want` of the tasks
/// returned have neither locks nor needs (those could not be held back).
/// Tasks with locks or needs are returned too but do not count: they may
/// wait, and must not hide the runnable tasks behind them.
pub(super) fn queued_for_dispatch(
    conn: &Connection,
    scan: usize,
    want: usize,
    skip: &std::collections::HashSet<String>,
) -> Result<Vec<QueuedTask>> {
    /// The parts of a stored spec the dispatcher reads (the rest is checked
    /// and skipped, not built).
    #[derive(serde::Deserialize)]
    struct Gates {
        #[serde(default)]
        locks: Vec<String>,
        #[serde(default)]
        needs: Vec<String>,
    }
    let mut out = Vec::new();
    if want == 0 || scan == 0 {
        return Ok(out);
    }
    let mut statement = conn.prepare_cached(
        "SELECT id, plugin_name, run_id, spec FROM tasks WHERE state = 'queued'
         ORDER BY queued_at ASC, id ASC LIMIT ?1",
    )?;
    let mut rows = statement.query([i64::try_from(scan).unwrap_or(i64::MAX)])?;
    let mut free = 0;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        if skip.contains(&id) {
            continue;
        }
        let spec = row.get_ref(3)?.as_str().map_err(rusqlite::Error::from)?;
        let gates: Gates =
            serde_json::from_str(spec).map_err(|e| corrupt(&id, "spec", e.to_string()))?;
        let task = QueuedTask {
            plugin_name: row.get(1)?,
            run_id: row.get(2)?,
            locks: gates.locks,
            needs: gates.needs,
            id,
        };
        if task.locks.is_empty() && task.needs.is_empty() {
            free += 1;
        }
        out.push(task);
        if free >= want {
            break;
        }
    }
    Ok(out)
}

/// Every task of a run, by `queued_at` and then insertion order (`rowid`:
/// tasks inserted together, e.g. by one `insert_run`, often share a
/// millisecond, and their ids need not sort as they were given).
pub(super) fn of_run(conn: &Connection, run_id: &str) -> Result<Vec<TaskRecord>> {
    conn.prepare_cached(&format!(
        "{SELECT_TASK} WHERE t.run_id = ?1 ORDER BY t.queued_at, t.rowid"
    ))?
    .query_and_then([run_id], task_from_row)?
    .collect()
}

/// How many tasks are in each state, in [`TaskState::ALL`] order, zeros included.
pub(super) fn count_by_state(conn: &Connection) -> Result<Vec<(TaskState, u64)>> {
    let mut counts: Vec<(TaskState, u64)> = TaskState::ALL.iter().map(|&s| (s, 0)).collect();
    let mut statement = conn.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (state, n) = row?;
        let Some(slot) = counts.iter_mut().find(|(s, _)| s.as_str() == state) else {
            return Err(corrupt("tasks", "state", state));
        };
        slot.1 = from_sql_u64(n);
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------
// Writes (each runs inside the writer's transaction)

fn task_event(task: &TaskRecord, kind: EventKind, at: UnixMillis, data: Value) -> NewEvent {
    NewEvent {
        task_id: Some(task.id.clone()),
        run_id: task.run_id.clone(),
        kind,
        at,
        data,
    }
}

fn json_text(value: &Value, what: &'static str) -> Result<String> {
    serde_json::to_string(value).map_err(|source| DbError::Encode { what, source })
}

/// JSON text of a partial output, bounded by [`MAX_PARTIAL_OUTPUT_BYTES`].
fn partial_output_text(value: &Value) -> Result<String> {
    let text = json_text(value, "partial output")?;
    if text.len() <= MAX_PARTIAL_OUTPUT_BYTES {
        return Ok(text);
    }
    Ok(json!({ "truncated": true, "bytes": text.len() }).to_string())
}

/// Microseconds from `from` to `to` (both in ms), never negative.
fn latency_us(from: UnixMillis, to: UnixMillis) -> u64 {
    u64::try_from(to.saturating_sub(from))
        .unwrap_or(0)
        .saturating_mul(1000)
}

/// A small summary for terminal events: attempt, error kind/detail, exit
/// code, the cancel, and the state the executor reported when the database
/// decided otherwise.
fn terminal_data(task: &TaskRecord, reported: TaskState, extra: &[(&str, Value)]) -> Value {
    let mut data = Map::new();
    data.insert("attempt".into(), json!(task.attempt));
    if reported != task.state {
        data.insert("reported_state".into(), json!(reported.as_str()));
    }
    if let Some(error) = &task.error {
        data.insert(
            "error".into(),
            json!({ "kind": error.kind.as_str(), "detail": error.detail }),
        );
    }
    if let Some(code) = task.exit_code {
        data.insert("exit_code".into(), json!(code));
    }
    if let Some(cancel) = &task.cancel {
        data.insert(
            "cancel".into(),
            json!({
                "actor": cancel.actor,
                "reason": cancel.reason,
                "grace_ms": cancel.grace_ms,
                "acknowledged": cancel.acknowledged,
                "forced": cancel.forced,
                "latency_us": cancel.latency_us,
            }),
        );
    }
    for (key, value) in extra {
        data.insert((*key).to_owned(), value.clone());
    }
    Value::Object(data)
}

pub(super) fn insert(conn: &Connection, t: &NewTask) -> Result<TaskRecord> {
    if !plugins::exists(conn, &t.plugin_id)? {
        return Err(DbError::PluginNotFound(t.plugin_id.clone()));
    }
    if let Some(run_id) = &t.run_id
        && !runs::exists(conn, run_id)?
    {
        return Err(DbError::RunNotFound(run_id.clone()));
    }
    if conn
        .prepare_cached("SELECT 1 FROM tasks WHERE id = ?1")?
        .exists([&t.id])?
    {
        return Err(DbError::TaskExists(t.id.clone()));
    }
    let spec = serde_json::to_string(&t.spec).map_err(|source| DbError::Encode {
        what: "task spec",
        source,
    })?;
    conn.prepare_cached(
        "INSERT INTO tasks (id, plugin_id, plugin_name, plugin_kind, run_id, state, spec,
             attempt, max_attempts, queued_at)
         VALUES (:id, :plugin_id, :plugin_name, :plugin_kind, :run_id, 'queued', :spec,
             0, :max_attempts, :queued_at)",
    )?
    .execute(named_params! {
        ":id": t.id,
        ":plugin_id": t.plugin_id,
        ":plugin_name": t.plugin_name,
        ":plugin_kind": t.plugin_kind.as_str(),
        ":run_id": t.run_id,
        ":spec": spec,
        ":max_attempts": t.max_attempts.max(1),
        ":queued_at": t.queued_at,
    })?;
    // The record as written, built here rather than read back: a read and
    // a decode of the spec per submission, in the writer, which every
    // submission goes through. (Tests compare it with what `load` reads.)
    let task = TaskRecord {
        id: t.id.clone(),
        plugin_id: t.plugin_id.clone(),
        plugin_name: t.plugin_name.clone(),
        plugin_kind: t.plugin_kind,
        state: TaskState::Queued,
        run_id: t.run_id.clone(),
        spec: t.spec.clone(),
        attempt: 0,
        max_attempts: t.max_attempts.max(1),
        queued_at: t.queued_at,
        started_at: None,
        cancel_requested_at: None,
        finished_at: None,
        output: None,
        partial_output: None,
        progress: None,
        error: None,
        exit_code: None,
        stdout: Captured::default(),
        stderr: Captured::default(),
        usage: Usage::default(),
        cancel: None,
    };
    events::insert(
        conn,
        &task_event(
            &task,
            EventKind::TaskQueued,
            t.queued_at,
            json!({ "plugin": t.plugin_name, "max_attempts": task.max_attempts }),
        ),
    )?;
    Ok(task)
}

pub(super) fn mark_started(conn: &Connection, id: &str) -> Result<StartDecision> {
    let now = now_millis();
    let changed = conn
        .prepare_cached(&format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, started_at = ?2,
                 {RESET_ATTEMPT}
             WHERE id = ?1 AND state = 'queued'"
        ))?
        .execute(params![id, now])?;
    let task = load_existing(conn, id)?;
    if changed == 0 {
        return Ok(StartDecision::NotStartable(task));
    }
    events::insert(
        conn,
        &task_event(
            &task,
            EventKind::TaskStarted,
            now,
            json!({ "attempt": task.attempt }),
        ),
    )?;
    Ok(StartDecision::Started(task))
}

fn insert_cancel(
    conn: &Connection,
    id: &str,
    actor: &str,
    reason: &str,
    req: &CancelRequest,
    stop: Option<&CancelStop>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO cancels (task_id, actor, reason, grace_ms, requested_at, stopped_at,
             acknowledged, forced, latency_us)
         VALUES (:id, :actor, :reason, :grace_ms, :requested_at, :stopped_at,
             :acknowledged, :forced, :latency_us)",
    )?
    .execute(named_params! {
        ":id": id,
        ":actor": actor,
        ":reason": reason,
        ":grace_ms": to_sql_u64(req.grace_ms),
        ":requested_at": req.requested_at,
        ":stopped_at": stop.map(|s| s.stopped_at),
        ":acknowledged": stop.is_some_and(|s| s.acknowledged),
        ":forced": stop.is_some_and(|s| s.forced),
        ":latency_us": stop.map(|s| to_sql_u64(s.latency_us)),
    })?;
    Ok(())
}

fn set_cancel_stop(conn: &Connection, id: &str, stop: &CancelStop) -> Result<()> {
    conn.prepare_cached(
        "UPDATE cancels SET stopped_at = ?2, acknowledged = ?3, forced = ?4, latency_us = ?5
         WHERE task_id = ?1",
    )?
    .execute(params![
        id,
        stop.stopped_at,
        stop.acknowledged,
        stop.forced,
        to_sql_u64(stop.latency_us)
    ])?;
    Ok(())
}

pub(super) fn request_cancel(
    conn: &Connection,
    id: &str,
    req: &CancelRequest,
) -> Result<CancelDecision> {
    let Some(task) = load(conn, id)? else {
        return Ok(CancelDecision::NotFound);
    };
    let mut actor = req.actor.clone();
    truncate_utf8(&mut actor, MAX_ACTOR_BYTES);
    let mut reason = req.reason.clone();
    truncate_utf8(&mut reason, MAX_REASON_BYTES);
    let requested = json!({ "actor": actor, "reason": reason, "grace_ms": req.grace_ms });

    match task.state {
        TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut | TaskState::Canceled => {
            Ok(CancelDecision::AlreadyFinished(task))
        }
        TaskState::Queued => {
            // Never started, so stopped the instant it was asked.
            let finished_at = now_millis().max(req.requested_at);
            conn.prepare_cached(
                "UPDATE tasks SET state = 'canceled', cancel_requested_at = ?2, finished_at = ?3
                 WHERE id = ?1",
            )?
            .execute(params![id, req.requested_at, finished_at])?;
            let stop = CancelStop {
                stopped_at: req.requested_at,
                acknowledged: false,
                forced: false,
                latency_us: 0,
            };
            insert_cancel(conn, id, &actor, &reason, req, Some(&stop))?;
            let task = load_existing(conn, id)?;
            events::insert(
                conn,
                &task_event(
                    &task,
                    EventKind::TaskCancelRequested,
                    req.requested_at,
                    requested,
                ),
            )?;
            let data = terminal_data(&task, TaskState::Canceled, &[("before_start", json!(true))]);
            events::insert(
                conn,
                &task_event(&task, EventKind::TaskCanceled, finished_at, data),
            )?;
            Ok(CancelDecision::CanceledBeforeStart(task))
        }
        TaskState::Running => {
            conn.prepare_cached(
                "UPDATE tasks SET state = 'cancel_requested', cancel_requested_at = ?2
                 WHERE id = ?1",
            )?
            .execute(params![id, req.requested_at])?;
            insert_cancel(conn, id, &actor, &reason, req, None)?;
            let task = load_existing(conn, id)?;
            events::insert(
                conn,
                &task_event(
                    &task,
                    EventKind::TaskCancelRequested,
                    req.requested_at,
                    requested,
                ),
            )?;
            Ok(CancelDecision::Requested {
                record: task,
                first: true,
                escalated: false,
            })
        }
        TaskState::CancelRequested => {
            let Some(stored) = &task.cancel else {
                return Err(corrupt(
                    id,
                    "cancel record",
                    "missing for a cancel_requested task",
                ));
            };
            if req.grace_ms >= stored.grace_ms {
                return Ok(CancelDecision::Requested {
                    record: task,
                    first: false,
                    escalated: false,
                });
            }
            let previous = stored.grace_ms;
            conn.prepare_cached("UPDATE cancels SET grace_ms = ?2 WHERE task_id = ?1")?
                .execute(params![id, to_sql_u64(req.grace_ms)])?;
            let task = load_existing(conn, id)?;
            let mut data = requested;
            if let Value::Object(map) = &mut data {
                map.insert("escalated".into(), json!(true));
                map.insert("previous_grace_ms".into(), json!(previous));
            }
            events::insert(
                conn,
                &task_event(
                    &task,
                    EventKind::TaskCancelRequested,
                    req.requested_at,
                    data,
                ),
            )?;
            Ok(CancelDecision::Requested {
                record: task,
                first: false,
                escalated: true,
            })
        }
    }
}

pub(super) fn finish(conn: &Connection, id: &str, f: &Finish) -> Result<TaskRecord> {
    if !f.state.is_terminal() {
        return Err(DbError::NotTerminal {
            id: id.to_owned(),
            state: f.state,
        });
    }
    // The state and the cancel request only: the whole record is decoded
    // once, after the update.
    let (state, cancel_requested_at) = conn
        .prepare_cached(
            "SELECT t.state, c.requested_at FROM tasks t
                 LEFT JOIN cancels c ON c.task_id = t.id WHERE t.id = ?1",
        )?
        .query_row([id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?))
        })
        .optional()?
        .ok_or_else(|| DbError::TaskNotFound(id.to_owned()))?;
    let state = TaskState::parse(&state).ok_or_else(|| corrupt(id, "state", state.clone()))?;
    if state.is_terminal() {
        return load_existing(conn, id);
    }
    let final_state = match (f.state, cancel_requested_at.is_some()) {
        (TaskState::Canceled, false) => return Err(DbError::CancelNotRequested(id.to_owned())),
        // Once a cancel is recorded, a later trap or error is its consequence.
        (TaskState::Failed | TaskState::TimedOut, true) => TaskState::Canceled,
        (state, _) => state,
    };

    let output = f
        .output
        .as_ref()
        .map(|v| json_text(v, "output"))
        .transpose()?;
    let partial_output = f
        .partial_output
        .as_ref()
        .map(partial_output_text)
        .transpose()?;
    let (progress_fraction, progress_message) = match &f.progress {
        Some(p) => {
            let mut message = p.message.clone();
            truncate_utf8(&mut message, MAX_EVENT_MESSAGE_BYTES);
            (Some(f64::from(p.fraction.clamp(0.0, 1.0))), Some(message))
        }
        None => (None, None),
    };
    let (error_kind, error_detail, error_message) = match &f.error {
        Some(e) => {
            let mut detail = e.detail.clone();
            if let Some(detail) = &mut detail {
                truncate_utf8(detail, MAX_ERROR_TEXT_BYTES);
            }
            let mut message = e.message.clone();
            truncate_utf8(&mut message, MAX_ERROR_TEXT_BYTES);
            (Some(e.kind.as_str()), detail, Some(message))
        }
        None => (None, None, None),
    };

    conn.prepare_cached(
        "UPDATE tasks SET state = :state, finished_at = :finished_at, output = :output,
             partial_output = COALESCE(:partial_output, partial_output),
             progress_fraction = COALESCE(:progress_fraction, progress_fraction),
             progress_message = CASE WHEN :progress_fraction IS NULL THEN progress_message
                                     ELSE :progress_message END,
             error_kind = :error_kind, error_detail = :error_detail,
             error_message = :error_message, exit_code = :exit_code,
             stdout = :stdout, stdout_total = :stdout_total, stdout_truncated = :stdout_truncated,
             stderr = :stderr, stderr_total = :stderr_total, stderr_truncated = :stderr_truncated,
             peak_memory_bytes = :peak_memory_bytes, fuel_consumed = :fuel_consumed
         WHERE id = :id",
    )?
    .execute(named_params! {
        ":id": id,
        ":state": final_state.as_str(),
        ":finished_at": f.finished_at,
        ":output": output,
        ":partial_output": partial_output,
        ":progress_fraction": progress_fraction,
        ":progress_message": progress_message,
        ":error_kind": error_kind,
        ":error_detail": error_detail,
        ":error_message": error_message,
        ":exit_code": f.exit_code,
        ":stdout": f.stdout.data,
        ":stdout_total": to_sql_u64(f.stdout.total_bytes),
        ":stdout_truncated": f.stdout.truncated,
        ":stderr": f.stderr.data,
        ":stderr_total": to_sql_u64(f.stderr.total_bytes),
        ":stderr_truncated": f.stderr.truncated,
        ":peak_memory_bytes": to_sql_u64(f.usage.peak_memory_bytes),
        ":fuel_consumed": f.usage.fuel_consumed.map(to_sql_u64),
    })?;

    let stop = match (cancel_requested_at, &f.cancel_stopped) {
        (Some(_), Some(stop)) => Some(stop.clone()),
        // Ended while a cancel was pending, but not because of it as far as
        // the executor said (e.g. it completed first): stopped, not
        // acknowledged, not forced.
        (Some(requested_at), None) => Some(CancelStop {
            stopped_at: f.finished_at,
            acknowledged: false,
            forced: false,
            latency_us: latency_us(requested_at, f.finished_at),
        }),
        (None, Some(_)) => {
            tracing::warn!(
                task = id,
                "cancel stop reported for a task without a cancel record"
            );
            None
        }
        (None, None) => None,
    };
    if let Some(stop) = &stop {
        set_cancel_stop(conn, id, stop)?;
    }

    let task = load_existing(conn, id)?;
    if let Some(stop) = &stop {
        let data = json!({ "latency_us": stop.latency_us });
        if stop.acknowledged {
            events::insert(
                conn,
                &task_event(
                    &task,
                    EventKind::TaskCancelAcknowledged,
                    stop.stopped_at,
                    data.clone(),
                ),
            )?;
        }
        if stop.forced {
            events::insert(
                conn,
                &task_event(&task, EventKind::TaskCancelForced, stop.stopped_at, data),
            )?;
        }
    }
    if let Some(kind) = EventKind::for_terminal(final_state) {
        let data = terminal_data(&task, f.state, &[]);
        events::insert(conn, &task_event(&task, kind, f.finished_at, data))?;
    }
    Ok(task)
}

/// Sets a live task's latest progress (from a `task.progress` event).
pub(super) fn set_progress(conn: &Connection, id: &str, progress: &Progress) -> Result<()> {
    conn.prepare_cached(
        "UPDATE tasks SET progress_fraction = ?2, progress_message = ?3 WHERE id = ?1",
    )?
    .execute(params![id, f64::from(progress.fraction), progress.message])?;
    Ok(())
}

/// Sets a live task's partial output (from a `task.checkpoint` event).
pub(super) fn set_partial_output(conn: &Connection, id: &str, partial: &Value) -> Result<()> {
    let text = partial_output_text(partial)?;
    conn.prepare_cached("UPDATE tasks SET partial_output = ?2 WHERE id = ?1")?
        .execute(params![id, text])?;
    Ok(())
}

pub(super) fn recover(conn: &Connection) -> Result<Recovery> {
    let now = now_millis();
    let stranded: Vec<(String, String, u32, u32)> = conn
        .prepare_cached(
            "SELECT id, state, attempt, max_attempts FROM tasks
             WHERE state IN ('running', 'cancel_requested') ORDER BY queued_at, id",
        )?
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;

    let mut recovery = Recovery::default();
    let reason = [("reason", json!("host_restart"))];
    for (id, state, attempt, max_attempts) in stranded {
        if state == TaskState::Running.as_str() && attempt < max_attempts {
            conn.prepare_cached("UPDATE tasks SET state = 'queued' WHERE id = ?1")?
                .execute([&id])?;
            let task = load_existing(conn, &id)?;
            let data = json!({ "requeued": true, "reason": "host_restart", "attempt": attempt });
            events::insert(conn, &task_event(&task, EventKind::TaskQueued, now, data))?;
            recovery.requeued.push(id);
        } else if state == TaskState::Running.as_str() {
            conn.prepare_cached(
                "UPDATE tasks SET state = 'failed', finished_at = ?2, error_kind = ?3,
                     error_detail = NULL, error_message = ?4
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                now,
                ErrorKind::HostRestart.as_str(),
                HOST_RESTART_RUNNING
            ])?;
            let task = load_existing(conn, &id)?;
            let data = terminal_data(&task, TaskState::Failed, &reason);
            events::insert(conn, &task_event(&task, EventKind::TaskFailed, now, data))?;
            recovery.failed.push(id);
        } else {
            conn.prepare_cached(
                "UPDATE tasks SET state = 'canceled', finished_at = ?2, error_kind = ?3,
                     error_detail = NULL, error_message = ?4
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                now,
                ErrorKind::HostRestart.as_str(),
                HOST_RESTART_CANCELING
            ])?;
            let requested_at: Option<UnixMillis> = conn
                .prepare_cached("SELECT requested_at FROM cancels WHERE task_id = ?1")?
                .query_row([&id], |row| row.get(0))
                .optional()?;
            let stop = CancelStop {
                stopped_at: now,
                acknowledged: false,
                forced: true,
                latency_us: requested_at.map_or(0, |at| latency_us(at, now)),
            };
            set_cancel_stop(conn, &id, &stop)?;
            let task = load_existing(conn, &id)?;
            let forced = json!({ "reason": "host_restart", "latency_us": stop.latency_us });
            events::insert(
                conn,
                &task_event(&task, EventKind::TaskCancelForced, now, forced),
            )?;
            let data = terminal_data(&task, TaskState::Canceled, &reason);
            events::insert(conn, &task_event(&task, EventKind::TaskCanceled, now, data))?;
            recovery.canceled.push(id);
        }
    }
    if recovery != Recovery::default() {
        tracing::info!(
            requeued = recovery.requeued.len(),
            failed = recovery.failed.len(),
            canceled = recovery.canceled.len(),
            "recovered tasks left by a previous process"
        );
    }
    Ok(recovery)
}

#[cfg(test)]
mod column_tests {
    use super::*;

    /// Rows are read by position: the list must be the statement's columns.
    #[test]
    fn task_columns_are_the_columns_of_the_task_select() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn =
            super::super::schema::open_writer(&path, &super::super::DbOptions::default()).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let statement = conn.prepare(SELECT_TASK).unwrap();
        let names: Vec<String> = statement.column_names().map(str::to_owned).collect();
        assert_eq!(names, TASK_COLUMNS.map(str::to_owned).to_vec());
        assert_eq!(col!("c_latency_us"), TASK_COLUMNS.len() - 1);
        assert_eq!(col!("stdout") + 1, col!("stdout_total"));
        assert_eq!(col!("stderr") + 2, col!("stderr_truncated"));
    }
}
