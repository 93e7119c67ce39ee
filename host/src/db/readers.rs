//! A small pool of read-only connections, used from blocking threads.
//!
//! In WAL mode each read sees the last committed state and never waits for the
//! writer, so reads need no coordination beyond handing each blocking thread
//! its own connection (a `rusqlite::Connection` is not `Sync`). Idle
//! connections are kept up to [`DbOptions::max_idle_readers`](super::DbOptions);
//! a burst beyond that opens extra connections and closes them afterwards.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use rusqlite::Connection;

use super::{DbOptions, Result, schema};

pub(super) struct Readers {
    path: PathBuf,
    options: DbOptions,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    pub(super) fn new(path: PathBuf, options: &DbOptions) -> Readers {
        Readers {
            path,
            options: options.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `work` on an idle (or new) connection. Call from a blocking thread.
    pub(super) fn with<T>(&self, work: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        // The lock guards a Vec push/pop only: a poisoned lock still holds a
        // valid Vec.
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => schema::open_reader(&self.path, &self.options)?,
        };
        let result = work(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.options.max_idle_readers {
            idle.push(conn);
        }
        result
    }
}
