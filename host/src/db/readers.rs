//! A small pool of read-only connections, used from blocking threads.
//!
//! In WAL mode each read sees the last committed state and never waits for the
//! writer, so reads need no coordination beyond handing each blocking thread
//! its own connection (a `rusqlite::Connection` is not `Sync`). At most
//! [`DbOptions::readers`](super::DbOptions) reads run at once (a semaphore
//! the caller acquires before it takes a blocking thread), so there is always
//! an idle connection for a read that holds a permit: connections are opened
//! on first use and then reused, never opened per burst.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use super::{DbOptions, Result, schema};

pub(super) struct Readers {
    path: PathBuf,
    options: DbOptions,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    pub(super) fn new(path: PathBuf, options: &DbOptions) -> Readers {
        Readers {
            path,
            options: options.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(options.readers.max(1))),
        }
    }

    /// Waits for a turn to read; hold the permit while calling [`Readers::with`].
    pub(super) async fn acquire(&self) -> std::result::Result<OwnedSemaphorePermit, AcquireError> {
        Arc::clone(&self.permits).acquire_owned().await
    }

    /// Runs `work` on an idle (or new) connection. Call from a blocking
    /// thread, holding a permit from [`Readers::acquire`].
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
        // With the permits there are never more connections than `readers`;
        // the bound is kept anyway in case a caller skipped `acquire`.
        if idle.len() < self.options.readers.max(1) {
            idle.push(conn);
        }
        result
    }
}
