//! Plugins: the components tasks run, known by content digest.

use rusqlite::{Connection, Row, params};

use super::{DbError, PluginRow, Result, from_sql_u64, to_sql_u64};
use crate::model::PluginKind;

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
