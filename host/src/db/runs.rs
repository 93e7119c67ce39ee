//! Runs: groups of tasks created together, aborted together, finished once.
//!
//! A run is `running` from creation, `aborting` once an abort is recorded,
//! and ends `succeeded`, `failed` or `aborted`; a terminal state never changes
//! again. Like tasks, every change reads the current row and decides inside
//! the writer's transaction, and the event announcing it (`run.created`,
//! `run.abort_requested`, `run.finished`) is written in the same transaction.
//! What a run's state *means* for its tasks (stop dispatching, cancel them) is
//! the service's business; this module only records it.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::json;

use super::{
    DbError, MAX_ACTOR_BYTES, MAX_REASON_BYTES, NewRun, NewTask, Result, RunAbortDecision,
    RunAbortRequest, RunFailure, RunGate, RunProgress, events, from_sql_u64, tasks, to_sql_u64,
    truncate_utf8,
};
use crate::model::{
    EventKind, NewEvent, RunAbort, RunRecord, RunState, RunView, TaskRecord, TaskState, UnixMillis,
};

/// Runs per page when the caller names no limit.
pub const DEFAULT_RUNS_PAGE: usize = 50;
/// Most runs per page.
pub const MAX_RUNS_PAGE: usize = 1000;

const RUN_COLUMNS: &str =
    "id, name, state, fail_fast, created_at, finished_at, abort_actor, abort_reason,
     abort_requested_at, timeout_ms, workspace";

// ---------------------------------------------------------------------------
// Row mapping and reads (also used inside write jobs)

/// The one mapping from a row of [`RUN_COLUMNS`] to a [`RunRecord`].
fn run_from_row(row: &Row<'_>) -> Result<RunRecord> {
    let id: String = row.get("id")?;
    let state: String = row.get("state")?;
    let Some(state) = RunState::parse(&state) else {
        return Err(DbError::Corrupt {
            id,
            what: "run state",
            detail: state,
        });
    };
    let abort = match (
        row.get::<_, Option<String>>("abort_actor")?,
        row.get::<_, Option<String>>("abort_reason")?,
        row.get::<_, Option<UnixMillis>>("abort_requested_at")?,
    ) {
        (Some(actor), reason, Some(requested_at)) => Some(RunAbort {
            actor,
            reason: reason.unwrap_or_default(),
            requested_at,
        }),
        _ => None,
    };
    let workspace = match row.get::<_, Option<String>>("workspace")? {
        None => None,
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| DbError::Corrupt {
            id: id.clone(),
            what: "run workspace",
            detail: e.to_string(),
        })?),
    };
    Ok(RunRecord {
        timeout_ms: row.get::<_, Option<i64>>("timeout_ms")?.map(from_sql_u64),
        workspace,
        name: row.get("name")?,
        state,
        fail_fast: row.get("fail_fast")?,
        created_at: row.get("created_at")?,
        finished_at: row.get("finished_at")?,
        abort,
        id,
    })
}

pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<RunRecord>> {
    conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?
        .query_and_then([id], run_from_row)?
        .next()
        .transpose()
}

/// [`get`] for a run the current job knows exists.
fn get_existing(conn: &Connection, id: &str) -> Result<RunRecord> {
    get(conn, id)?.ok_or_else(|| DbError::RunNotFound(id.to_owned()))
}

/// Whether a run with this id is stored.
pub(super) fn exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .exists([id])?)
}

/// The run and all its tasks (by `queued_at`, then insertion order), from
/// one snapshot.
pub(super) fn view(conn: &Connection, id: &str) -> Result<Option<RunView>> {
    let tx = conn.unchecked_transaction()?;
    let Some(run) = get(&tx, id)? else {
        return Ok(None);
    };
    let tasks = tasks::of_run(&tx, id)?;
    Ok(Some(RunView { run, tasks }))
}

/// What the dispatcher needs to start a run's task, from one snapshot
/// without decoding the run's tasks: the run, and each keyed task's state.
pub(super) fn gate(conn: &Connection, id: &str) -> Result<Option<RunGate>> {
    let tx = conn.unchecked_transaction()?;
    let Some(run) = get(&tx, id)? else {
        return Ok(None);
    };
    let mut states = std::collections::HashMap::new();
    let mut statement = tx.prepare_cached(
        "SELECT json_extract(spec, '$.key'), state, id FROM tasks
         WHERE run_id = ?1 AND json_extract(spec, '$.key') IS NOT NULL",
    )?;
    let mut rows = statement.query([id])?;
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        let state: String = r.get(1)?;
        let Some(state) = TaskState::parse(&state) else {
            return Err(DbError::Corrupt {
                id: r.get(2)?,
                what: "task state",
                detail: state,
            });
        };
        states.insert(key, state);
    }
    Ok(Some(RunGate { run, states }))
}

/// What moving a run along needs, read in one snapshot without loading its
/// tasks: counts from the `(run_id, state)` index, and the first task (in
/// finishing order) whose end trips fail-fast — failed, timed out, or
/// canceled by anyone but the run itself (`run`, `fail_fast`). Called each
/// time a task of the run ends, so it must not cost a read of every task.
pub(super) fn progress(conn: &Connection, id: &str) -> Result<Option<RunProgress>> {
    let tx = conn.unchecked_transaction()?;
    let Some(run) = get(&tx, id)? else {
        return Ok(None);
    };
    let (total, unfinished, succeeded) = tx
        .prepare_cached(
            "SELECT COUNT(*),
                    COALESCE(SUM(state IN ('queued', 'running', 'cancel_requested')), 0),
                    COALESCE(SUM(state = 'succeeded'), 0)
             FROM tasks WHERE run_id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
    let first_failure = tx
        .prepare_cached(
            "SELECT t.id, json_extract(t.spec, '$.key'), t.state
             FROM tasks t LEFT JOIN cancels c ON c.task_id = t.id
             WHERE t.run_id = ?1
               AND (t.state IN ('failed', 'timed_out')
                    OR (t.state = 'canceled'
                        AND (c.actor IS NULL OR c.actor NOT IN ('run', 'fail_fast'))))
             ORDER BY t.finished_at, t.rowid LIMIT 1",
        )?
        .query_and_then([id], |r| -> Result<RunFailure> {
            let task_id: String = r.get(0)?;
            let state: String = r.get(2)?;
            let Some(state) = TaskState::parse(&state) else {
                return Err(DbError::Corrupt {
                    id: task_id,
                    what: "task state",
                    detail: state,
                });
            };
            Ok(RunFailure {
                key: r.get(1)?,
                task_id,
                state,
            })
        })?
        .next()
        .transpose()?;
    Ok(Some(RunProgress {
        run,
        total: from_sql_u64(total),
        unfinished: from_sql_u64(unfinished),
        succeeded: from_sql_u64(succeeded),
        first_failure,
    }))
}

/// Newest first by `(created_at, id)`, keyset paging after `cursor` (a run id).
pub(super) fn list(
    conn: &Connection,
    limit: Option<usize>,
    cursor: Option<&str>,
) -> Result<Vec<RunRecord>> {
    let limit = limit.unwrap_or(DEFAULT_RUNS_PAGE).min(MAX_RUNS_PAGE);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // The cursor lookup and the page come from one snapshot.
    let tx = conn.unchecked_transaction()?;
    let page = match cursor {
        None => tx
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs ORDER BY created_at DESC, id DESC LIMIT ?1"
            ))?
            .query_and_then([limit], run_from_row)?
            .collect::<Result<Vec<_>>>()?,
        Some(cursor) => {
            let created_at: Option<UnixMillis> = tx
                .prepare_cached("SELECT created_at FROM runs WHERE id = ?1")?
                .query_row([cursor], |row| row.get(0))
                .optional()?;
            let Some(created_at) = created_at else {
                return Err(DbError::BadCursor(cursor.to_owned()));
            };
            tx.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE (created_at, id) < (?1, ?2)
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
            ))?
            .query_and_then(params![created_at, cursor, limit], run_from_row)?
            .collect::<Result<Vec<_>>>()?
        }
    };
    Ok(page)
}

/// Which of `ids` name a stored run.
pub(super) fn existing(conn: &Connection, ids: Vec<String>) -> Result<HashSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?;
    let mut found = HashSet::new();
    for id in ids {
        if stmt.exists([&id])? {
            found.insert(id);
        }
    }
    Ok(found)
}

/// Runs still `running` or `aborting`, oldest first.
pub(super) fn unfinished(conn: &Connection) -> Result<Vec<RunRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE state IN ('running', 'aborting')
         ORDER BY created_at, id"
    ))?
    .query_and_then([], run_from_row)?
    .collect()
}

// ---------------------------------------------------------------------------
// Writes (each runs inside the writer's transaction)

fn run_event(run_id: &str, kind: EventKind, at: UnixMillis, data: serde_json::Value) -> NewEvent {
    NewEvent {
        task_id: None,
        run_id: Some(run_id.to_owned()),
        kind,
        at,
        data,
    }
}

/// The run, its `run.created` event, then each task with its `task.queued`
/// event. The caller's savepoint makes it all or nothing.
pub(super) fn insert(conn: &Connection, run: &NewRun, new_tasks: &[NewTask]) -> Result<RunView> {
    if exists(conn, &run.id)? {
        return Err(DbError::RunExists(run.id.clone()));
    }
    let workspace = run
        .workspace
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|source| DbError::Encode {
            what: "run workspace",
            source,
        })?;
    conn.prepare_cached(
        "INSERT INTO runs (id, name, state, fail_fast, created_at, timeout_ms, workspace)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        run.id,
        run.name,
        RunState::Running.as_str(),
        run.fail_fast,
        run.created_at,
        run.timeout_ms.map(to_sql_u64),
        workspace,
    ])?;
    events::insert(
        conn,
        &run_event(
            &run.id,
            EventKind::RunCreated,
            run.created_at,
            json!({ "name": run.name, "fail_fast": run.fail_fast, "tasks": new_tasks.len() }),
        ),
    )?;
    let mut records: Vec<TaskRecord> = Vec::with_capacity(new_tasks.len());
    for task in new_tasks {
        let task = NewTask {
            run_id: Some(run.id.clone()),
            ..task.clone()
        };
        records.push(tasks::insert(conn, &task)?);
    }
    Ok(RunView {
        run: get_existing(conn, &run.id)?,
        tasks: records,
    })
}

pub(super) fn request_abort(
    conn: &Connection,
    id: &str,
    req: &RunAbortRequest,
) -> Result<RunAbortDecision> {
    let Some(run) = get(conn, id)? else {
        return Ok(RunAbortDecision::NotFound);
    };
    match run.state {
        RunState::Succeeded | RunState::Failed | RunState::Aborted => {
            Ok(RunAbortDecision::AlreadyFinished(run))
        }
        RunState::Aborting => Ok(RunAbortDecision::Requested { run, first: false }),
        RunState::Running => {
            let mut actor = req.actor.clone();
            truncate_utf8(&mut actor, MAX_ACTOR_BYTES);
            let mut reason = req.reason.clone();
            truncate_utf8(&mut reason, MAX_REASON_BYTES);
            conn.prepare_cached(
                "UPDATE runs SET state = 'aborting', abort_actor = ?2, abort_reason = ?3,
                     abort_requested_at = ?4
                 WHERE id = ?1",
            )?
            .execute(params![id, actor, reason, req.requested_at])?;
            events::insert(
                conn,
                &run_event(
                    id,
                    EventKind::RunAbortRequested,
                    req.requested_at,
                    json!({ "actor": actor, "reason": reason }),
                ),
            )?;
            Ok(RunAbortDecision::Requested {
                run: get_existing(conn, id)?,
                first: true,
            })
        }
    }
}

pub(super) fn finish(
    conn: &Connection,
    id: &str,
    state: RunState,
    finished_at: UnixMillis,
) -> Result<RunRecord> {
    if !state.is_terminal() {
        return Err(DbError::RunNotTerminal {
            id: id.to_owned(),
            state,
        });
    }
    let run = get_existing(conn, id)?;
    if run.state.is_terminal() {
        return Ok(run);
    }
    conn.prepare_cached("UPDATE runs SET state = ?2, finished_at = ?3 WHERE id = ?1")?
        .execute(params![id, state.as_str(), finished_at])?;
    events::insert(
        conn,
        &run_event(
            id,
            EventKind::RunFinished,
            finished_at,
            json!({ "state": state.as_str() }),
        ),
    )?;
    get_existing(conn, id)
}
