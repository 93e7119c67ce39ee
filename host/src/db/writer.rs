//! The single writer thread and its group commit.
//!
//! One OS thread owns the read-write connection. It waits for a job, then
//! drains whatever else is queued (up to [`MAX_BATCH`]) and runs the lot in one
//! `BEGIN IMMEDIATE … COMMIT`:
//!
//! ```text
//! BEGIN IMMEDIATE
//!   <job 1>                -- succeeded
//!   <job 2>                -- failed before changing anything: nothing to undo
//!   …
//! COMMIT                   -- then every reply is sent
//! ```
//!
//! Why: a commit costs a WAL append (and an `fsync` with `power_safe`), so
//! sharing one commit among every job that arrived meanwhile is what makes
//! thousands of durable submissions per second possible, while a lone job
//! still commits at once (the writer never waits to fill a batch).
//!
//! A failed job must leave no trace. Almost every job that fails does so
//! before it changes a row (a check: unknown plugin, task exists, …), which
//! the writer sees from SQLite's count of changed rows, and then there is
//! nothing to undo. A job that fails after changing rows (or panics after)
//! makes the writer roll the whole transaction back and run it again with a
//! savepoint around each job (`SAVEPOINT job; <job>; ROLLBACK TO job`), so
//! only that job's changes are undone. The failed job is not run again (its
//! error is its answer); the jobs before it are, which is why a job's work
//! is `FnMut`: a job may run more than once, and only its last run, the one
//! committed, is answered. Savepoints are not the default because SQLite
//! copies every page a job first touches into a statement journal to be
//! able to undo it: a fifth of the writer's time on small writes.
//!
//! Replies go out only after `COMMIT` succeeded, so an acknowledged write is
//! durable. If the transaction fails as a whole (an error at `COMMIT`, or
//! SQLite rolling the transaction back by itself after an I/O error or a full
//! disk), every job that ran in it is answered with
//! [`DbError::TransactionFailed`] and the jobs not yet run go on in a fresh
//! transaction. A job that panics is answered with [`DbError::JobPanicked`]
//! (its changes undone as above); the writer keeps going.
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
use tokio::sync::{mpsc, watch};
use wasmtask_runtime::wake::ReportSender;

use super::{DbError, Result, WriteStats};

/// Most jobs committed in one transaction. Bounds the latency a job waits
/// behind others in its batch (a batch of trivial jobs commits in a few ms);
/// jobs beyond it go in the next batch.
pub const MAX_BATCH: usize = 256;

/// A unit of work for the writer, with its reply channel.
pub(super) trait Job: Send {
    /// Runs the work (again, if it ran in a transaction that was rolled
    /// back); `true` if it succeeded and its changes should be kept. Never
    /// called once the job [`failed`](Job::failed): a failed (or panicked)
    /// job's error stands.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Whether the job already failed: it is not run again, its error stands.
    fn failed(&self) -> bool;
    /// Sends the result; `failed` is set when the whole transaction failed.
    fn reply(self: Box<Self>, failed: Option<&str>);
}

struct Pending<T, F> {
    work: F,
    outcome: Option<Result<T>>,
    reply: ReportSender<Result<T>>,
}

/// Wraps `work` and the channel its result goes to.
pub(super) fn job<T, F>(work: F, reply: ReportSender<Result<T>>) -> Box<dyn Job>
where
    T: Send + 'static,
    F: FnMut(&Connection) -> Result<T> + Send + 'static,
{
    Box::new(Pending {
        work,
        outcome: None,
        reply,
    })
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> Result<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = catch_unwind(AssertUnwindSafe(|| (self.work)(conn)))
            .unwrap_or(Err(DbError::JobPanicked));
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn failed(&self) -> bool {
        matches!(self.outcome, Some(Err(_)))
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
        self.reply.send(result);
    }
}

/// Writer counters, shared with [`super::Db`].
#[derive(Debug, Default)]
pub(super) struct Stats {
    batches: AtomicU64,
    jobs: AtomicU64,
    failed_batches: AtomicU64,
    redone_batches: AtomicU64,
    pauses: AtomicU64,
    paused_us: AtomicU64,
    paused_max_us: AtomicU64,
}

impl Stats {
    fn record_pause(&self, held: std::time::Duration) {
        let us = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        self.pauses.fetch_add(1, Ordering::Relaxed);
        self.paused_us.fetch_add(us, Ordering::Relaxed);
        self.paused_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self, queued: usize) -> WriteStats {
        WriteStats {
            batches: self.batches.load(Ordering::Relaxed),
            jobs: self.jobs.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            redone_batches: self.redone_batches.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
            paused_us: self.paused_us.load(Ordering::Relaxed),
            paused_max_us: self.paused_max_us.load(Ordering::Relaxed),
            queued,
        }
    }
}

/// Lets the checkpointer stop the writer between two transactions, to
/// start the WAL over (see `checkpoint.rs`).
#[derive(Debug, Default)]
pub(super) struct Pause {
    /// Whether a pause is wanted. Changed only with `held` locked, so a
    /// waiter that checks it under the lock never misses a change.
    wanted: std::sync::atomic::AtomicBool,
    /// Whether the writer is stopped at a boundary.
    held: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Pause {
    /// Called by the writer outside any transaction: waits while a pause is
    /// wanted, and returns how long it waited if it did. One atomic load
    /// when no pause is wanted.
    fn wait_if_wanted(&self) -> Option<std::time::Duration> {
        if !self.wanted.load(Ordering::Acquire) {
            return None;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if !self.wanted.load(Ordering::Acquire) {
            return None;
        }
        let since = std::time::Instant::now();
        *held = true;
        self.changed.notify_all();
        while self.wanted.load(Ordering::Acquire) {
            held = self.changed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        *held = false;
        Some(since.elapsed())
    }

    /// Called by the checkpointer: runs `work` while the writer is stopped
    /// between transactions. Waits at most `patience` for the writer to stop;
    /// a writer that does not is idle (waiting for a job), and then `work`
    /// runs anyway. Returns whether the writer was held.
    pub(super) fn hold<T>(
        &self,
        patience: std::time::Duration,
        work: impl FnOnce() -> T,
    ) -> (T, bool) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.wanted.store(true, Ordering::Release);
        let (held, _) = self
            .changed
            .wait_timeout_while(held, patience, |held| !*held)
            .unwrap_or_else(|e| e.into_inner());
        let was_held = *held;
        drop(held);
        // Released on the way out, even if `work` panics: a writer left
        // waiting would stop every write.
        let _release = Release(self);
        (work(), was_held)
    }

    fn release(&self) {
        let _held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.wanted.store(false, Ordering::Release);
        self.changed.notify_all();
    }
}

/// Ends a pause when dropped.
struct Release<'a>(&'a Pause);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Starts the writer thread on `conn`; it runs until every sender is dropped.
/// `last_seq` receives the highest committed event `seq` after each batch.
pub(super) fn spawn(
    conn: Connection,
    queue: usize,
    stats: Arc<Stats>,
    last_seq: Arc<watch::Sender<i64>>,
    pause: Arc<Pause>,
) -> Result<mpsc::Sender<Box<dyn Job>>> {
    let (sender, receiver) = mpsc::channel(queue);
    std::thread::Builder::new()
        .name("wasmtask-db-writer".into())
        .spawn(move || run(conn, receiver, &stats, &last_seq, &pause))
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
    pause: &Pause,
) {
    let mut batch = VecDeque::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        if let Some(held) = pause.wait_if_wanted() {
            stats.record_pause(held);
        }
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

/// How a transaction isolates its jobs from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// No savepoints: a job that fails after changing rows stops the
    /// transaction ([`Outcome::Redo`]).
    Shared,
    /// A savepoint around each job, so a failed job's changes are undone
    /// alone.
    Savepoints,
}

/// What became of one transaction.
enum Outcome {
    /// Committed, with the highest event `seq` it made visible (`None` if
    /// that could not be read; the next batch publishes it).
    Committed(Option<i64>),
    /// A job failed after changing rows: roll back, run again with
    /// savepoints.
    Redo,
}

/// Runs every job of `queue` in as few transactions as possible (one, unless
/// a job fails after changing rows or a transaction fails as a whole) and
/// replies to each.
fn commit_batch(
    conn: &Connection,
    queue: &mut VecDeque<Box<dyn Job>>,
    stats: &Stats,
    last_seq: &watch::Sender<i64>,
) {
    let mut isolation = Isolation::Shared;
    while !queue.is_empty() {
        let mut done = Vec::with_capacity(queue.len());
        let outcome = run_transaction(conn, queue, &mut done, isolation);
        if !matches!(outcome, Ok(Outcome::Committed(_))) && !conn.is_autocommit() {
            // Best effort: a failed ROLLBACK leaves nothing better to do, and
            // SQLite rolls back an open transaction when the next BEGIN fails.
            let _ = conn.execute_batch("ROLLBACK");
        }
        match outcome {
            Ok(Outcome::Committed(seq)) => {
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
            Ok(Outcome::Redo) => {
                // Everything that ran goes back, in order; the failed job
                // keeps its error and is skipped, the rest run again.
                stats.redone_batches.fetch_add(1, Ordering::Relaxed);
                for job in done.into_iter().rev() {
                    queue.push_front(job);
                }
                isolation = Isolation::Savepoints;
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
/// `done`. On an error of the transaction itself, returns it; the jobs left
/// in `queue` have not run.
fn run_transaction(
    conn: &Connection,
    queue: &mut VecDeque<Box<dyn Job>>,
    done: &mut Vec<Box<dyn Job>>,
    isolation: Isolation,
) -> Result<Outcome> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // Nothing can run: fail the whole queue rather than spin on it.
        done.extend(queue.drain(..));
        return Err(e.into());
    }
    while let Some(mut job) = queue.pop_front() {
        if job.failed() {
            // Failed in a transaction that was rolled back: nothing to run.
            done.push(job);
            continue;
        }
        match isolation {
            Isolation::Shared => {
                let before = conn.total_changes();
                let ok = job.run(conn);
                done.push(job);
                if conn.is_autocommit() {
                    return Err(rolled_back());
                }
                if !ok && conn.total_changes() != before {
                    return Ok(Outcome::Redo);
                }
            }
            Isolation::Savepoints => {
                let opened = conn.execute_batch("SAVEPOINT job");
                let ok = opened.is_ok() && job.run(conn);
                done.push(job);
                opened?;
                if conn.is_autocommit() {
                    return Err(rolled_back());
                }
                if ok {
                    conn.execute_batch("RELEASE job")?;
                } else {
                    conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
                }
            }
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
    Ok(Outcome::Committed(seq))
}

fn rolled_back() -> DbError {
    DbError::TransactionFailed("sqlite rolled the transaction back after an error".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    use super::*;

    /// A stand-in writer: counts the transactions it would run, stopping
    /// at each boundary if a pause is wanted (and noting how long).
    fn writer(
        pause: &Arc<Pause>,
        stop: &Arc<AtomicBool>,
    ) -> (
        Arc<AtomicUsize>,
        Arc<std::sync::Mutex<Vec<Duration>>>,
        std::thread::JoinHandle<()>,
    ) {
        let count = Arc::new(AtomicUsize::new(0));
        let holds: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
        let (p, s, c, h) = (
            Arc::clone(pause),
            Arc::clone(stop),
            Arc::clone(&count),
            Arc::clone(&holds),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(held) = p.wait_if_wanted() {
                    h.lock().unwrap().push(held);
                }
                c.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
        });
        (count, holds, thread)
    }

    /// Asserts the stand-in writer runs again (within 10 s).
    fn resumes(count: &AtomicUsize) {
        let (after, deadline) = (
            count.load(Ordering::Relaxed),
            std::time::Instant::now() + Duration::from_secs(10),
        );
        while count.load(Ordering::Relaxed) == after {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer stayed paused"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_pause_holds_the_writer_between_transactions_until_the_work_is_done() {
        let pause = Arc::new(Pause::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (count, holds, thread) = writer(&pause, &stop);
        let ((), held) = pause.hold(Duration::from_secs(10), || {
            let before = count.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                count.load(Ordering::Relaxed),
                before,
                "the writer ran while held"
            );
        });
        assert!(held);
        resumes(&count);
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
        // The writer saw one pause, as long as the work held it.
        let holds = holds.lock().unwrap();
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert!(holds[0] >= Duration::from_millis(50), "{holds:?}");
    }

    #[test]
    fn a_pause_without_a_writer_at_a_boundary_goes_ahead_after_its_patience() {
        let pause = Pause::default();
        let ((), held) = pause.hold(Duration::from_millis(20), || {});
        assert!(!held);
        // Released: a writer arriving later does not stop.
        assert_eq!(pause.wait_if_wanted(), None);
    }

    #[test]
    fn a_panic_in_the_paused_work_releases_the_writer() {
        let pause = Arc::new(Pause::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (count, _, thread) = writer(&pause, &stop);
        let p = Arc::clone(&pause);
        let result = std::thread::spawn(move || {
            p.hold(Duration::from_secs(10), || {
                panic!("the checkpoint panics (on purpose)")
            })
        })
        .join();
        assert!(result.is_err());
        resumes(&count);
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
    }
}
