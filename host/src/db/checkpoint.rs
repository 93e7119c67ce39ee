//! WAL checkpoints on a thread of their own.
//!
//! SQLite's default is to checkpoint inside the commit that makes the WAL
//! exceed 1,000 pages: that commit copies the pages back into the database
//! file and `fsync`s both files, on the writer thread, so every write queued
//! behind it waits. With `synchronous = NORMAL` that is the only `fsync` a
//! commit ever does, and under a loaded disk it took tens of milliseconds
//! (an HTTP cancel waited 30–40 ms behind one). So the writer's connection
//! turns automatic checkpoints off, and this thread runs a `PASSIVE`
//! checkpoint (it never blocks the writer or the readers) every
//! [`INTERVAL`], on its own connection. A checkpoint with nothing new to copy
//! costs a look at the WAL index.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use super::{DbError, DbOptions, Result, schema};

/// How often the WAL is checkpointed.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Starts the checkpointer; it stops when `stop` (its sender) is dropped.
pub(super) fn spawn(path: PathBuf, options: &DbOptions) -> Result<mpsc::Sender<()>> {
    let conn = schema::open_checkpointer(&path, options)?;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("wasmtask-db-checkpoint".into())
        .spawn(move || {
            // Ends when every sender is gone (the database handle dropped).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, path = %path.display(), "WAL checkpoint failed");
                }
            }
        })
        .map_err(DbError::WriterThread)?;
    Ok(stop)
}
