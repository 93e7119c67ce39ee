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

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

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
pub(super) fn spawn(
    conn: Connection,
    queue: usize,
    stats: Arc<Stats>,
) -> Result<mpsc::Sender<Box<dyn Job>>> {
    let (sender, receiver) = mpsc::channel(queue);
    std::thread::Builder::new()
        .name("wasmtask-db-writer".into())
        .spawn(move || run(conn, receiver, &stats))
        .map_err(DbError::WriterThread)?;
    Ok(sender)
}

fn run(conn: Connection, mut receiver: mpsc::Receiver<Box<dyn Job>>, stats: &Stats) {
    let mut batch = VecDeque::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push_back(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push_back(job),
                Err(_) => break,
            }
        }
        commit_batch(&conn, &mut batch, stats);
    }
    // Every `Db` is gone. Dropping the connection checkpoints the WAL.
    tracing::debug!("database writer stopped");
}

/// Runs every job of `queue` in as few transactions as possible (one, unless
/// a transaction fails as a whole) and replies to each.
fn commit_batch(conn: &Connection, queue: &mut VecDeque<Box<dyn Job>>, stats: &Stats) {
    while !queue.is_empty() {
        let mut done = Vec::with_capacity(queue.len());
        let outcome = run_transaction(conn, queue, &mut done);
        if outcome.is_err() && !conn.is_autocommit() {
            // Best effort: a failed ROLLBACK leaves nothing better to do, and
            // SQLite rolls back an open transaction when the next BEGIN fails.
            let _ = conn.execute_batch("ROLLBACK");
        }
        match outcome {
            Ok(()) => {
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
/// `done`. On an error of the transaction itself, returns it; the jobs left in
/// `queue` have not run.
fn run_transaction(
    conn: &Connection,
    queue: &mut VecDeque<Box<dyn Job>>,
    done: &mut Vec<Box<dyn Job>>,
) -> Result<()> {
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
    conn.execute_batch("COMMIT")?;
    Ok(())
}
