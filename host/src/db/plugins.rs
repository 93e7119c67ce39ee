//! Plugins and runs: the rows tasks refer to.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::json;

use super::{DbError, NewRun, PluginRow, Result, RunRow, events, from_sql_u64, to_sql_u64};
use crate::model::{EventKind, NewEvent, PluginKind};

const PLUGIN_COLUMNS: &str = "id, name, kind, size_bytes, created_at";

pub(super) fn upsert(conn: &Connection, p: &PluginRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO plugins (id, name, kind, size_bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, kind = excluded.kind,
             size_bytes = excluded.size_bytes",
    )?
    .execute(params![
        p.id,
        p.name,
        p.kind.as_str(),
        to_sql_u64(p.size_bytes),
        p.created_at
    ])?;
    Ok(())
}

pub(super) fn get(conn: &Connection, id_or_name: &str) -> Result<Option<PluginRow>> {
    let by_id = conn
        .prepare_cached(&format!(
            "SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id = ?1"
        ))?
        .query_and_then([id_or_name], plugin_from_row)?
        .next()
        .transpose()?;
    if by_id.is_some() {
        return Ok(by_id);
    }
    conn.prepare_cached(&format!(
        "SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = ?1
         ORDER BY created_at DESC, id DESC LIMIT 1"
    ))?
    .query_and_then([id_or_name], plugin_from_row)?
    .next()
    .transpose()
}

pub(super) fn list(conn: &Connection) -> Result<Vec<PluginRow>> {
    conn.prepare_cached(&format!(
        "SELECT {PLUGIN_COLUMNS} FROM plugins ORDER BY name, created_at DESC, id"
    ))?
    .query_and_then([], plugin_from_row)?
    .collect()
}

/// Whether a plugin with this digest is stored.
pub(super) fn exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM plugins WHERE id = ?1")?
        .exists([id])?)
}

fn plugin_from_row(row: &Row<'_>) -> Result<PluginRow> {
    let id: String = row.get("id")?;
    let kind: String = row.get("kind")?;
    let Some(kind) = PluginKind::parse(&kind) else {
        return Err(DbError::Corrupt {
            id,
            what: "plugin kind",
            detail: kind,
        });
    };
    Ok(PluginRow {
        name: row.get("name")?,
        kind,
        size_bytes: from_sql_u64(row.get("size_bytes")?),
        created_at: row.get("created_at")?,
        id,
    })
}

/// The state a run is created in.
const RUN_RUNNING: &str = "running";

pub(super) fn insert_run(conn: &Connection, run: &NewRun) -> Result<RunRow> {
    if run_exists(conn, &run.id)? {
        return Err(DbError::RunExists(run.id.clone()));
    }
    conn.prepare_cached("INSERT INTO runs (id, name, state, created_at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![run.id, run.name, RUN_RUNNING, run.created_at])?;
    events::insert(
        conn,
        &NewEvent {
            task_id: None,
            run_id: Some(run.id.clone()),
            kind: EventKind::RunCreated,
            at: run.created_at,
            data: json!({ "name": run.name }),
        },
    )?;
    get_run(conn, &run.id)?.ok_or_else(|| DbError::RunNotFound(run.id.clone()))
}

pub(super) fn get_run(conn: &Connection, id: &str) -> Result<Option<RunRow>> {
    Ok(conn
        .prepare_cached("SELECT id, name, state, created_at, finished_at FROM runs WHERE id = ?1")?
        .query_row([id], |row| {
            Ok(RunRow {
                id: row.get("id")?,
                name: row.get("name")?,
                state: row.get("state")?,
                created_at: row.get("created_at")?,
                finished_at: row.get("finished_at")?,
            })
        })
        .optional()?)
}

pub(super) fn run_exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .exists([id])?)
}
