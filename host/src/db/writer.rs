//! The single writer thread and its group commit.
//!
//! One OS thread owns the read-write connection. It waits for a job, then
//! drains whatever else is queued (up to [`MAX_BATCH`]) and runs the lot in one
//! `BEGIN IMMEDIATE … COMMIT`:
//!
//! ```text
//! BEGIN IMMEDIATE
//!   SAVEPOINT job; <job 1>; RELEASE job            -- job 1 succeeded
//!   SAVEPOINT job; <job 2>; ROLLBACK TO job; RELEASE job   -- job 2 failed: only its changes undone
//!   …
//! COMMIT                                            -- then every reply is sent
//! ```
//!
//! Why: a commit costs a WAL append (and an `fsync` with `power_safe`), so
//! sharing one commit among every job that arrived meanwhile is what makes
//! thousands of durable submissions per second possible, while a lone job
//! still commits at once (the writer never waits to fill a batch).
//!
//! Replies go out only after `COMMIT` succeeded, so an acknowledged write is
//! durable. If the transaction fails as a whole (an error at `COMMIT`, or
//! SQLite rolling the transaction back by itself after an I/O error or a full
//! disk), every job that ran in it is answered with
//! [`DbError::TransactionFailed`] and the jobs not yet run go on in a fresh
//! transaction. A job that panics is rolled back to its savepoint and
//! answered with [`DbError::JobPanicked`]; the writer keeps going.
//!
//! Event watch: just before `COMMIT` the writer reads the highest event `seq`
//! (`MAX(seq)`, one seek at the end of the rowid tree), and once `COMMIT`
//! succeeded — before any reply — publishes it on a `watch` channel if it grew
//! ([`super::Db::watch_events`]). Whoever sees `N` there can read every event
//! up to `N`. Events written by another process sharing the file are
//! published with this writer's next batch.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::{DbError, Result, WriteStats};

/// Most jobs committed in one transaction. Bounds the latency a job waits
/// behind others in its batch (a batch of trivial jobs commits in a few ms);
/// jobs beyond it go in the next batch.
pub const MAX_BATCH: usize = 256;

/// A unit of work for the writer, with its reply channel.
pub(super) trait Job: Send {
    /// Runs the work (inside the savepoint the writer opened); `true` if it
    /// succeeded and its changes should be kept.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the result; `failed` is set when the whole transaction failed.
    fn reply(self: Box<Self>, failed: Option<&str>);
}

struct Pending<T, F> {
    work: Option<F>,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

/// Wraps `work` and the channel its result goes to.
pub(super) fn job<T, F>(work: F, reply: oneshot::Sender<Result<T>>) -> Box<dyn Job>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    Box::new(Pending {
        work: Some(work),
        outcome: None,
        reply,
    })
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = match self.work.take() {
            Some(work) => {
                catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or(Err(DbError::JobPanicked))
            }
            // Never run twice; answer with an error rather than panicking.
            None => Err(DbError::JobPanicked),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn reply(self: Box<Self>, failed: Option<&str>) {
        let result = match (self.outcome, failed) {
            // The job's own error explains more than the transaction's.
            (Some(Err(e)), _) => Err(e),
            (_, Some(message)) => Err(DbError::TransactionFailed(message.to_owned())),
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(DbError::TransactionFailed("the job did not run".into())),
        };
        // The caller may have stopped waiting; the write stands regardless.
        let _ = self.reply.send(result);
    }
}

/// Writer counters, shared with [`super::Db`].
#[derive(Debug, Default)]
pub(super) struct Stats {
    batches: AtomicU64,
    jobs: AtomicU64,
    failed_batches: AtomicU64,
}

impl Stats {
    pub(super) fn snapshot(&self, queued: usize) -> WriteStats {
        WriteStats {
            batches: self.batches.load(Ordering::Relaxed),
            jobs: self.jobs.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            queued,
        }
    }
}

/// Starts the writer thread on `conn`; it runs until every sender is dropped.
/// `last_seq` receives the highest committed event `seq` after each batch.
pub(super) fn spawn(
    conn: Connection,
    queue: usize,
    stats: Arc<Stats>,
    last_seq: Arc<watch::Sender<i64>>,
) -> Result<mpsc::Sender<Box<dyn Job>>> {
    let (sender, receiver) = mpsc::channel(queue);
    std::thread::Builder::new()
        .name("wasmtask-db-writer".into())
        .spawn(move || run(conn, receiver, &stats, &last_seq))
        .map_err(DbError::WriterThread)?;
    Ok(sender)
}

/// The highest event `seq` stored, 0 when there is none.
pub(super) fn max_event_seq(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")?
        .query_row([], |row| row.get(0))?)
}

/// Publishes `seq` unless watchers already saw as much (it never goes back).
fn publish(last_seq: &watch::Sender<i64>, seq: i64) {
    last_seq.send_if_modified(|current| {
        if seq > *current {
            *current = seq;
            true
        } else {
            false
        }
    });
}

fn run(
    conn: Connection,
    mut receiver: mpsc::Receiver<Box<dyn Job>>,
    stats: &Stats,
    last_seq: &watch::Sender<i64>,
) {
    let mut batch = VecDeque::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push_back(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push_back(job),
                Err(_) => break,
            }
        }
        commit_batch(&conn, &mut batch, stats, last_seq);
    }
    // Every `Db` is gone. Dropping the connection checkpoints the WAL.
    tracing::debug!("database writer stopped");
}

/// Runs every job of `queue` in as few transactions as possible (one, unless
/// a transaction fails as a whole) and replies to each.
fn commit_batch(
    conn: &Connection,
    queue: &mut VecDeque<Box<dyn Job>>,
    stats: &Stats,
    last_seq: &watch::Sender<i64>,
) {
    while !queue.is_empty() {
        let mut done = Vec::with_capacity(queue.len());
        let outcome = run_transaction(conn, queue, &mut done);
        if outcome.is_err() && !conn.is_autocommit() {
            // Best effort: a failed ROLLBACK leaves nothing better to do, and
            // SQLite rolls back an open transaction when the next BEGIN fails.
            let _ = conn.execute_batch("ROLLBACK");
        }
        match outcome {
            Ok(seq) => {
                // Committed: watchers may now read these events; tell them
                // before anyone is answered.
                if let Some(seq) = seq {
                    publish(last_seq, seq);
                }
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.jobs.fetch_add(done.len() as u64, Ordering::Relaxed);
                for job in done {
                    job.reply(None);
                }
            }
            Err(e) => {
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, jobs = done.len(), "database write transaction failed");
                let message = e.to_string();
                for job in done {
                    job.reply(Some(&message));
                }
            }
        }
    }
}

/// One transaction: runs jobs from the front of `queue`, moving each into
/// `done`, and returns the highest event `seq` it committed with (`None` if
/// that could not be read; the next batch publishes it). On an error of the
/// transaction itself, returns it; the jobs left in `queue` have not run.
fn run_transaction(
    conn: &Connection,
    queue: &mut VecDeque<Box<dyn Job>>,
    done: &mut Vec<Box<dyn Job>>,
) -> Result<Option<i64>> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Nothing can run: fail the whole queue rather than spin on it.
        done.extend(queue.drain(..));
        return Err(e.into());
    }
    while let Some(mut job) = queue.pop_front() {
        let opened = conn.execute_batch("SAVEPOINT job");
        let ok = opened.is_ok() && job.run(conn);
        done.push(job);
        opened?;
        if conn.is_autocommit() {
            return Err(DbError::TransactionFailed(
                "sqlite rolled the transaction back after an error".into(),
            ));
        }
        if ok {
            conn.execute_batch("RELEASE job")?;
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
        }
    }
    // Read inside the transaction: exactly what this COMMIT makes visible.
    let seq = match max_event_seq(conn) {
        Ok(seq) => Some(seq),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the last event seq");
            None
        }
    };
    conn.execute_batch("COMMIT")?;
    Ok(seq)
}
