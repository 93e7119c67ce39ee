//! The event trail: append (bounded) and page through it.
//!
//! Bounds, because event data comes from guests and clients: a `message`
//! string longer than [`MAX_EVENT_MESSAGE_BYTES`] is cut (at a character
//! boundary) and `message_truncated: true` is added; then data whose JSON text
//! is still longer than [`MAX_EVENT_DATA_BYTES`] is replaced by
//! `{"truncated": true, "bytes": N}` with N its original length. Coalescing
//! floods of log/progress events is the executor's job; this is the last line.

use rusqlite::{Connection, Row, params};
use serde_json::{Map, Value};

use super::{DbError, Result, tasks, truncate_utf8};
use crate::model::{Event, EventKind, NewEvent, Progress};

/// Largest stored event data, as JSON text, in bytes (16 KiB).
pub const MAX_EVENT_DATA_BYTES: usize = 16 * 1024;
/// Longest `message` string kept in event data and in a task's progress, in
/// bytes (4 KiB).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4 * 1024;
/// Most events returned by one page.
pub const MAX_EVENTS_PAGE: usize = 1000;

/// Stores one event (bounded) and returns its `seq`.
pub(super) fn insert(conn: &Connection, event: &NewEvent) -> Result<i64> {
    let data = bounded_data(&event.data)?;
    insert_row(conn, event, event.run_id.as_deref(), &data)
}

/// Stores `event` with `run_id` in place of its own and `data` (already
/// bounded) as its data.
fn insert_row(
    conn: &Connection,
    event: &NewEvent,
    run_id: Option<&str>,
    data: &str,
) -> Result<i64> {
    conn.prepare_cached(
        "INSERT INTO events (task_id, run_id, kind, at, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        event.task_id,
        run_id,
        event.kind.as_str(),
        event.at,
        data
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Events only the database writes, in the transaction of the change they
/// announce.
fn is_reserved(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::TaskQueued
            | EventKind::TaskStarted
            | EventKind::TaskCancelRequested
            | EventKind::TaskCancelAcknowledged
            | EventKind::TaskCancelForced
            | EventKind::TaskSucceeded
            | EventKind::TaskFailed
            | EventKind::TaskTimedOut
            | EventKind::TaskCanceled
            | EventKind::RunCreated
            | EventKind::RunAbortRequested
            | EventKind::RunFinished
    )
}

/// `append_events`: stores `events` in order, applying progress and
/// checkpoints to their (non-terminal) task.
pub(super) fn append(conn: &Connection, events: &[NewEvent]) -> Result<()> {
    // Every check first, so that a refused batch is refused before it
    // changes a row: then the writer has nothing to undo (see `writer.rs`).
    // Appended events never change a task's state, so the states read here
    // hold for the whole batch.
    let mut checked = Vec::with_capacity(events.len());
    for event in events {
        if is_reserved(event.kind) {
            return Err(DbError::ReservedEvent {
                kind: event.kind.as_str(),
            });
        }
        let (state, run_id) = match event.task_id.as_deref() {
            Some(task_id) => {
                let Some((state, task_run_id)) = tasks::state_and_run(conn, task_id)? else {
                    return Err(DbError::TaskNotFound(task_id.to_owned()));
                };
                (Some(state), event.run_id.clone().or(task_run_id))
            }
            None => {
                if let Some(run_id) = event.run_id.as_deref()
                    && !super::runs::exists(conn, run_id)?
                {
                    return Err(DbError::RunNotFound(run_id.to_owned()));
                }
                (None, event.run_id.clone())
            }
        };
        checked.push((event, state, run_id, bounded_data(&event.data)?));
    }
    for (event, state, run_id, data) in checked {
        if let (Some(task_id), Some(state)) = (event.task_id.as_deref(), state)
            && !state.is_terminal()
        {
            match event.kind {
                EventKind::TaskProgress => {
                    if let Some(progress) = progress_of(&event.data) {
                        tasks::set_progress(conn, task_id, &progress)?;
                    }
                }
                EventKind::TaskCheckpoint => {
                    if let Some(partial) = event.data.get("partial_output") {
                        tasks::set_partial_output(conn, task_id, partial)?;
                    }
                }
                _ => {}
            }
        }
        insert_row(conn, event, run_id.as_deref(), &data)?;
    }
    Ok(())
}

/// The progress a `task.progress` event reports: `fraction` (clamped to
/// 0..=1) and an optional `message`. `None` without a numeric fraction.
fn progress_of(data: &Value) -> Option<Progress> {
    let fraction = data.get("fraction")?.as_f64()?.clamp(0.0, 1.0);
    let mut message = data
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    truncate_utf8(&mut message, MAX_EVENT_MESSAGE_BYTES);
    Some(Progress {
        fraction: fraction as f32,
        message,
    })
}

/// Applies the bounds of the module docs and returns the JSON text to store.
pub(super) fn bounded_data(data: &Value) -> Result<String> {
    let cut = match data {
        Value::Object(map) => match map.get("message") {
            Some(Value::String(message)) if message.len() > MAX_EVENT_MESSAGE_BYTES => {
                let mut map = map.clone();
                let mut message = message.clone();
                truncate_utf8(&mut message, MAX_EVENT_MESSAGE_BYTES);
                map.insert("message".into(), Value::String(message));
                map.insert("message_truncated".into(), Value::Bool(true));
                Some(Value::Object(map))
            }
            _ => None,
        },
        _ => None,
    };
    let text =
        serde_json::to_string(cut.as_ref().unwrap_or(data)).map_err(|source| DbError::Encode {
            what: "event data",
            source,
        })?;
    if text.len() <= MAX_EVENT_DATA_BYTES {
        return Ok(text);
    }
    let mut replaced = Map::new();
    replaced.insert("truncated".into(), Value::Bool(true));
    replaced.insert("bytes".into(), Value::from(text.len()));
    Ok(Value::Object(replaced).to_string())
}

pub(super) fn list_for_task(
    conn: &Connection,
    task_id: Option<&str>,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Event>> {
    let limit = page_limit(limit);
    match task_id {
        Some(task_id) => conn
            .prepare_cached(
                "SELECT seq, task_id, run_id, kind, at, data FROM events
                 WHERE task_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?
            .query_and_then(params![task_id, after_seq, limit], event_from_row)?
            .collect(),
        None => conn
            .prepare_cached(
                "SELECT seq, task_id, run_id, kind, at, data FROM events
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_and_then(params![after_seq, limit], event_from_row)?
            .collect(),
    }
}

pub(super) fn list_for_run(
    conn: &Connection,
    run_id: &str,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Event>> {
    conn.prepare_cached(
        "SELECT seq, task_id, run_id, kind, at, data FROM events
         WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?
    .query_and_then(
        params![run_id, after_seq, page_limit(limit)],
        event_from_row,
    )?
    .collect()
}

fn page_limit(limit: usize) -> i64 {
    i64::try_from(limit.min(MAX_EVENTS_PAGE)).unwrap_or(0)
}

fn event_from_row(row: &Row<'_>) -> Result<Event> {
    let seq: i64 = row.get("seq")?;
    let corrupt = |what, detail: String| DbError::Corrupt {
        id: format!("event {seq}"),
        what,
        detail,
    };
    let kind: String = row.get("kind")?;
    let Some(kind) = EventKind::parse(&kind) else {
        return Err(corrupt("event kind", kind));
    };
    let data: String = row.get("data")?;
    let data = serde_json::from_str(&data).map_err(|e| corrupt("event data", e.to_string()))?;
    Ok(Event {
        seq,
        task_id: row.get("task_id")?,
        run_id: row.get("run_id")?,
        kind,
        at: row.get("at")?,
        data,
    })
}
