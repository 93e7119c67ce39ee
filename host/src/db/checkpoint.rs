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
//!
//! Under a steady stream of writes and reads the WAL never started over:
//! SQLite starts it from the beginning only in a write transaction that
//! begins once every frame was copied back *and* no reader is reading from
//! the WAL, and with the dispatcher reading all the time that moment did not
//! come. The file grew without bound (640 MiB over 40,000 trivial tasks) and
//! every commit appended to new file blocks, which the kernel allocates and
//! zeroes: a fifth of the writer's time. So when the WAL is longer than
//! [`RESTART_FRAMES`], the checkpointer pauses the writer at its next
//! transaction boundary ([`super::writer::Pause`]) and runs a `RESTART`
//! checkpoint: it copies the frames appended since its last pass and waits
//! for the readers still in the WAL (each one query) to finish, so the
//! writer's next transaction starts the WAL over and writes into blocks the
//! file already has.

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use rusqlite::Connection;

use super::writer::Pause;
use super::{DbError, DbOptions, Result, schema};

/// How often the WAL is checkpointed.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// WAL length (frames of one page) from which the checkpointer pauses the
/// writer to start the WAL over: 16 MiB with 4 KiB pages.
pub const RESTART_FRAMES: i64 = 4096;

/// Most extra `PASSIVE` passes before pausing the writer.
const CATCH_UP_PASSES: usize = 3;

/// Frames arriving during a pass below which the checkpointer pauses the
/// writer: copying that many takes about a millisecond.
const PAUSE_FRAMES: i64 = 256;

/// How long the checkpointer waits for the writer to reach a transaction
/// boundary before finishing without it (a writer waiting for work is not
/// appending).
const PATIENCE: Duration = Duration::from_millis(50);

/// Starts the checkpointer; it stops when `stop` (its sender) is dropped.
pub(super) fn spawn(
    path: PathBuf,
    options: &DbOptions,
    pause: Arc<Pause>,
) -> Result<mpsc::Sender<()>> {
    let conn = schema::open_checkpointer(&path, options)?;
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("wasmtask-db-checkpoint".into())
        .spawn(move || {
            // Ends when every sender is gone (the database handle dropped).
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                if let Err(e) = checkpoint(&conn, &pause) {
                    tracing::warn!(error = %e, path = %path.display(), "WAL checkpoint failed");
                }
            }
        })
        .map_err(DbError::WriterThread)?;
    Ok(stop)
}

/// Runs a checkpoint in `mode`; returns the frames in the WAL (-1 when the
/// database is not in WAL mode).
fn run(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get(1)
    })
}

/// One round: a `PASSIVE` checkpoint; when the WAL is long, more of them
/// until few frames arrive during one (each copies what arrived during the
/// one before), then a `RESTART` one with the writer paused, which has only
/// those few left to copy.
fn checkpoint(conn: &Connection, pause: &Pause) -> rusqlite::Result<()> {
    let mut last = run(conn, "PASSIVE")?;
    if last < RESTART_FRAMES {
        return Ok(());
    }
    for _ in 0..CATCH_UP_PASSES {
        let next = run(conn, "PASSIVE")?;
        let arrived = next - last;
        last = next;
        if arrived <= PAUSE_FRAMES {
            break;
        }
    }
    let started = std::time::Instant::now();
    let (restart, held) = pause.hold(PATIENCE, || run(conn, "RESTART"));
    let restart = restart?;
    tracing::debug!(
        frames_last_pass = last,
        frames_restart = restart,
        held,
        paused_us = started.elapsed().as_micros() as u64,
        "WAL checkpointed to start over"
    );
    Ok(())
}
