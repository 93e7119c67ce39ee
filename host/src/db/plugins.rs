//! Plugins: the components tasks run, known by content digest.

use rusqlite::{Connection, Row, params};

use super::{DbError, PluginRow, Result, from_sql_u64, to_sql_u64};
use crate::model::PluginKind;

/// A plugin row is one name registration joined with its content.
const PLUGIN_SELECT: &str = "SELECT p.id, n.name, p.kind, p.size_bytes, n.created_at
     FROM plugin_names n JOIN plugins p ON p.id = n.plugin_id";

/// Stores the content (if new) and registers `p.name` for it as of
/// `p.created_at`; registering a name again for the same content moves it
/// to that time (so it is the name's newest again). Other names of the
/// content are kept.
pub(super) fn upsert(conn: &Connection, p: &PluginRow) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO plugins (id, kind, size_bytes, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, size_bytes = excluded.size_bytes",
    )?
    .execute(params![
        p.id,
        p.kind.as_str(),
        to_sql_u64(p.size_bytes),
        p.created_at
    ])?;
    conn.prepare_cached(
        "INSERT INTO plugin_names (name, plugin_id, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name, plugin_id) DO UPDATE SET created_at = excluded.created_at",
    )?
    .execute(params![p.name, p.id, p.created_at])?;
    Ok(())
}

/// By digest (with its newest name), or else the newest registration of
/// that name.
pub(super) fn get(conn: &Connection, id_or_name: &str) -> Result<Option<PluginRow>> {
    let by_id = conn
        .prepare_cached(&format!(
            "{PLUGIN_SELECT} WHERE p.id = ?1 ORDER BY n.created_at DESC, n.name LIMIT 1"
        ))?
        .query_and_then([id_or_name], plugin_from_row)?
        .next()
        .transpose()?;
    if by_id.is_some() {
        return Ok(by_id);
    }
    conn.prepare_cached(&format!(
        "{PLUGIN_SELECT} WHERE n.name = ?1 ORDER BY n.created_at DESC, p.id DESC LIMIT 1"
    ))?
    .query_and_then([id_or_name], plugin_from_row)?
    .next()
    .transpose()
}

/// Every registration, by name, newest first within a name.
pub(super) fn list(conn: &Connection) -> Result<Vec<PluginRow>> {
    conn.prepare_cached(&format!(
        "{PLUGIN_SELECT} ORDER BY n.name, n.created_at DESC, p.id"
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
