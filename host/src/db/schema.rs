//! Connection set-up and versioned schema migrations.
//!
//! `PRAGMA user_version` holds the number of [`MIGRATIONS`] applied. Opening
//! applies the missing ones in order, inside one `BEGIN IMMEDIATE`
//! transaction together with the new `user_version`, so a crash mid-migration
//! leaves the previous version intact and two processes opening the same file
//! at once migrate it only once. A file whose version is higher than this
//! build knows is refused rather than misread.
//!
//! Migrations are append-only: a released step is never edited; a change
//! is a new step at the end.

use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{DbError, DbOptions, Result};

/// Prepared statements kept per connection. The writer uses about 25 distinct
/// statements and a listing adds one per filter combination; beyond
/// rusqlite's default of 16 they would be evicted and compiled again.
const STATEMENT_CACHE: usize = 64;

/// Process-wide SQLite settings, applied once before the first connection
/// opens: memory statistics off. With them on (the default), every
/// allocation SQLite makes takes a global mutex to count it, which was a
/// tenth of the writer's time; nothing here reads those statistics.
fn configure_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `SQLITE_CONFIG_MEMSTATUS` takes one `int`. SQLite refuses
        // (SQLITE_MISUSE) a configuration change once it is initialized,
        // for instance when another connection of this process opened
        // first; the setting is then left as it was, which is harmless.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                std::ffi::c_int::from(0u8),
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite memory statistics left on");
        }
    });
}

/// Settings every connection gets, so cached statements stay compiled.
///
/// The query-planner stability guarantee (QPSG) keeps SQLite from re-planning
/// a statement when a new value is bound. Without it, this SQLite (built with
/// STAT4) recompiled the task select (`tasks LEFT JOIN cancels … WHERE t.id =
/// ?`) on every execution, which was a third of the writer's CPU time. Our
/// statements are key lookups and index range scans whose best plan does not
/// depend on the values.
fn tune(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Schema steps; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6];

/// Version 1: plugins, runs, tasks, cancels and events.
///
/// Tables are STRICT, so a value of the wrong type is refused rather than
/// stored. JSON is stored as TEXT. Booleans are 0/1 INTEGERs. `u64` values
/// are stored as INTEGER (saturating at `i64::MAX`).
const V1: &str = r#"
CREATE TABLE plugins (
    id          TEXT PRIMARY KEY,               -- content digest, lowercase hex
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('task', 'command')),
    size_bytes  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX plugins_by_name ON plugins (name, created_at);

CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
) STRICT;

-- One row per task, holding its current attempt.
CREATE TABLE tasks (
    id                  TEXT PRIMARY KEY,
    plugin_id           TEXT NOT NULL REFERENCES plugins (id),
    plugin_name         TEXT NOT NULL,
    plugin_kind         TEXT NOT NULL CHECK (plugin_kind IN ('task', 'command')),
    run_id              TEXT REFERENCES runs (id),
    state               TEXT NOT NULL CHECK (state IN ('queued', 'running', 'cancel_requested',
                            'succeeded', 'failed', 'timed_out', 'canceled')),
    spec                TEXT NOT NULL,          -- model::TaskSpec as JSON
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 1,
    queued_at           INTEGER NOT NULL,
    started_at          INTEGER,
    cancel_requested_at INTEGER,
    finished_at         INTEGER,
    output              TEXT,                   -- JSON
    partial_output      TEXT,                   -- JSON, latest checkpoint
    progress_fraction   REAL,
    progress_message    TEXT,
    error_kind          TEXT,
    error_detail        TEXT,
    error_message       TEXT,
    exit_code           INTEGER,
    stdout              BLOB NOT NULL DEFAULT x'',
    stdout_total        INTEGER NOT NULL DEFAULT 0,
    stdout_truncated    INTEGER NOT NULL DEFAULT 0,
    stderr              BLOB NOT NULL DEFAULT x'',
    stderr_total        INTEGER NOT NULL DEFAULT 0,
    stderr_truncated    INTEGER NOT NULL DEFAULT 0,
    peak_memory_bytes   INTEGER NOT NULL DEFAULT 0,
    fuel_consumed       INTEGER
) STRICT;
-- Listings are newest (or oldest) first by (queued_at, id), optionally
-- filtered; each filter has an index ending in the sort key so a page is an
-- index range scan.
CREATE INDEX tasks_by_queued ON tasks (queued_at, id);
CREATE INDEX tasks_by_state ON tasks (state, queued_at, id);
CREATE INDEX tasks_by_run ON tasks (run_id, queued_at, id);
CREATE INDEX tasks_by_plugin_name ON tasks (plugin_name, queued_at, id);

-- At most one cancel per task (repeats are idempotent).
CREATE TABLE cancels (
    task_id      TEXT PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL,
    grace_ms     INTEGER NOT NULL,
    requested_at INTEGER NOT NULL,
    stopped_at   INTEGER,
    acknowledged INTEGER NOT NULL DEFAULT 0,
    forced       INTEGER NOT NULL DEFAULT 0,
    latency_us   INTEGER
) STRICT;

-- AUTOINCREMENT: a seq is never reused, even after old events are deleted,
-- so a client resuming a stream from its last seq never skips or repeats.
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT REFERENCES tasks (id) ON DELETE CASCADE,
    run_id  TEXT REFERENCES runs (id) ON DELETE CASCADE,
    kind    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    data    TEXT NOT NULL                       -- JSON
) STRICT;
CREATE INDEX events_by_task ON events (task_id, seq);
CREATE INDEX events_by_run ON events (run_id, seq);
"#;

/// Version 2: run states, fail-fast and aborts.
///
/// Runs get `fail_fast`, the abort record (`abort_actor`, `abort_reason`,
/// `abort_requested_at`, all set together when an abort is requested) and a
/// state limited to `running | aborting | succeeded | failed | aborted`.
///
/// Done in place: `ADD COLUMN` keeps every row (v1 runs are all `running`,
/// which stays valid). The state rule is enforced by triggers rather than a
/// `CHECK`, because adding a `CHECK` to an existing column means rebuilding
/// the table, and dropping `runs` with foreign keys on would cascade-delete
/// the events of every run. A trigger refuses the same values a `CHECK`
/// would (the error names the rule).
const V2: &str = r#"
ALTER TABLE runs ADD COLUMN fail_fast INTEGER NOT NULL DEFAULT 0 CHECK (fail_fast IN (0, 1));
ALTER TABLE runs ADD COLUMN abort_actor TEXT;
ALTER TABLE runs ADD COLUMN abort_reason TEXT;
ALTER TABLE runs ADD COLUMN abort_requested_at INTEGER;

CREATE TRIGGER runs_state_on_insert BEFORE INSERT ON runs
WHEN NEW.state NOT IN ('running', 'aborting', 'succeeded', 'failed', 'aborted')
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: runs.state');
END;
CREATE TRIGGER runs_state_on_update BEFORE UPDATE OF state ON runs
WHEN NEW.state NOT IN ('running', 'aborting', 'succeeded', 'failed', 'aborted')
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: runs.state');
END;

-- Run listings are newest first by (created_at, id); unfinished runs are
-- looked up by state at start-up.
CREATE INDEX runs_by_created ON runs (created_at, id);
CREATE INDEX runs_by_state ON runs (state, created_at, id);
"#;

/// Version 3: a plugin can have several names.
///
/// A name is a registration of content under that name (`plugin_names`); a
/// name can point at several contents over time (the newest registration is
/// the one a task by that name gets) and one content can carry several
/// names (uploading a built-in's bytes as `my-spin` keeps `spin-loop`). The
/// one name a v2 row had becomes its first registration.
const V3: &str = r#"
CREATE TABLE plugin_names (
    name        TEXT NOT NULL,
    plugin_id   TEXT NOT NULL REFERENCES plugins (id),
    created_at  INTEGER NOT NULL,               -- when this name last pointed here
    PRIMARY KEY (name, plugin_id)
) STRICT;
CREATE INDEX plugin_names_by_plugin ON plugin_names (plugin_id, created_at);
INSERT INTO plugin_names (name, plugin_id, created_at) SELECT name, id, created_at FROM plugins;
DROP INDEX plugins_by_name;
ALTER TABLE plugins DROP COLUMN name;
"#;

/// Version 4: an index on `(run_id, state)`, so that counting a run's
/// unfinished tasks each time one of them ends reads an index range, not
/// every task row of the run.
const V4: &str = r#"
CREATE INDEX tasks_by_run_state ON tasks (run_id, state);
"#;

/// Version 5: a run keeps its timeout and its prepared workspace (JSON:
/// host path, guest path, whether the run owns it, cleanup policy), so a
/// server started after another one died still times the run out and still
/// cleans its workspace copy up when it ends. Earlier runs have neither.
const V5: &str = r#"
ALTER TABLE runs ADD COLUMN timeout_ms INTEGER CHECK (timeout_ms IS NULL OR timeout_ms > 0);
ALTER TABLE runs ADD COLUMN workspace TEXT;
"#;

/// Version 6: facts about the database itself. `instance` is a random id
/// made once, when the database gets this version: the service keeps its
/// runs' workspace copies under `<workspace_dir>/<instance>/`, so a server
/// sweeping copies no run of its own has cannot touch those of a server
/// with another database that shares the directory.
const V6: &str = r#"
CREATE TABLE meta (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL
) STRICT;
INSERT INTO meta (key, value) VALUES ('instance', lower(hex(randomblob(8))));
"#;

/// This database's instance id (see [`V6`]).
pub(super) fn instance(conn: &Connection) -> Result<String> {
    Ok(
        conn.query_row("SELECT value FROM meta WHERE key = 'instance'", [], |row| {
            row.get(0)
        })?,
    )
}

/// Opens the read-write connection the writer thread owns: WAL, the chosen
/// `synchronous` level, foreign keys on, busy timeout set.
pub(super) fn open_writer(path: &Path, options: &DbOptions) -> Result<Connection> {
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = open_read_write(path, options)?;
    tune(&conn).map_err(open_err)?;
    // journal_mode answers with the mode in force: an in-memory database, for
    // one, stays in "memory" mode, and the concurrency model needs WAL.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DbError::NoWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open_err)?;
    // Statement journals (a savepoint per job when the writer runs a batch
    // again, see `writer.rs`, and statements that may fail after changing
    // rows) in memory: in a temporary file (the default) they cost a pwrite
    // per page, a fifth of the writer's time when every job had a savepoint.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(open_err)?;
    Ok(conn)
}

/// The writer's connection, with automatic checkpoints off: the
/// checkpointer thread does them (see `checkpoint.rs`).
pub(super) fn disable_autocheckpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_autocheckpoint = 0", [], |_| Ok(()))
}

/// The checkpointer's connection (read-write: a checkpoint writes the
/// database file).
pub(super) fn open_checkpointer(path: &Path, options: &DbOptions) -> Result<Connection> {
    open_read_write(path, options)
}

/// A read-write connection with the busy timeout and the `synchronous`
/// level set: what the writer and the checkpointer share.
fn open_read_write(path: &Path, options: &DbOptions) -> Result<Connection> {
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    configure_library();
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(options.busy_timeout).map_err(open_err)?;
    let synchronous = if options.power_safe { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open_err)?;
    Ok(conn)
}

/// Opens a read-only connection. Read-only at the SQLite level, so a read
/// path can never write by mistake.
pub(super) fn open_reader(path: &Path, options: &DbOptions) -> Result<Connection> {
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    configure_library();
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    tune(&conn).map_err(open_err)?;
    conn.busy_timeout(options.busy_timeout).map_err(open_err)?;
    Ok(conn)
}

/// The schema version of the open database.
pub(super) fn user_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |row| row.get(0))?)
}

/// Applies the missing migrations; returns the version now in force.
pub(super) fn migrate(conn: &mut Connection) -> Result<i64> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = user_version(&tx)?;
    if found > supported {
        return Err(DbError::SchemaTooNew { found, supported });
    }
    let applied = usize::try_from(found).unwrap_or(0);
    for step in MIGRATIONS.iter().skip(applied) {
        tx.execute_batch(step)?;
    }
    if found != supported {
        tx.pragma_update(None, "user_version", supported)?;
        tracing::info!(from = found, to = supported, "database schema migrated");
    }
    tx.commit()?;
    Ok(supported)
}
