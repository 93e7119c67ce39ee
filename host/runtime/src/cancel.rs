//! Per-task cancel state and how a cancel travels.
//!
//! # The model
//!
//! Every task attempt owns one [`CancelState`], shared (through an `Arc`) by
//! three parties: the caller's [`CancelHandle`], the store's epoch-deadline
//! callback, and the task's driver future (see `task.rs`). A cancel is either
//! *requested* (graceful: the guest may see it and return early) or *forced*
//! (the guest is stopped without its cooperation).
//!
//! A cancel travels like this:
//!
//! 1. [`CancelHandle::cancel`] records the request (reason, grace, time). With
//!    a grace period, it wakes the driver so that it arms a grace timer, and the
//!    guest can see the reason through `cancel-requested`. With no grace (or a
//!    later cancel with less grace that has already run out) it *forces*.
//! 2. Forcing sets the `forced` flag, **bumps the engine epoch** and fires the
//!    `hard` token.
//! 3. Each mechanism then covers one case:
//!    - a guest *executing wasm* reaches an epoch check within microseconds
//!      (the bump makes every running store's deadline due at once); its
//!      callback sees `forced` and traps. Other stores see the same bump, find
//!      nothing for them, and merely yield their thread once: a cancel never
//!      traps a neighbour;
//!    - a guest *blocked in a host or WASI call* (sleep, stdin, poll) never
//!      reaches an epoch check, so the driver races the guest's call future
//!      against the `hard` token and drops the call future, which makes
//!      wasmtime unwind the guest's fiber;
//!    - a guest *waiting in the guest pool's run queue* (time-sliced out) is
//!      moved to its front: the driver waits on the `hard` token through an
//!      urgent waker (see `scheduler.rs`), so the next free guest thread runs
//!      the driver, which drops the guest without running any more of it.
//! 4. The driver drops the store (never reused) and measures request → stop.
//!
//! Timeouts take the same path as a forced cancel, with [`StopCause::Timeout`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why the host stopped (or is stopping) a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    Cancel,
    Timeout,
}

/// A cancel request as the host recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub reason: String,
    pub grace: Duration,
    /// Monotonic time of the first request (latency is measured from here).
    pub requested_at: Instant,
    /// Wall-clock time of the first request.
    pub requested_wall: SystemTime,
}

/// What [`CancelHandle::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAck {
    /// The first request for this task; the guest may see it during grace.
    Requested,
    /// The first request, with no grace: the guest is being stopped now.
    Forced,
    /// A repeat that shortened the grace and forced the stop now.
    Escalated,
    /// A repeat that changed nothing (the first request stands).
    AlreadyRequested,
    /// The task has already ended; nothing to do.
    AlreadyFinished,
}

/// The cancel state of one task attempt. See the module docs.
#[derive(Debug)]
pub struct CancelState {
    request: Mutex<Option<CancelRequest>>,
    forced: AtomicBool,
    cause: Mutex<Option<StopCause>>,
    observed: AtomicBool,
    finished: AtomicBool,
    hard: CancellationToken,
    changed: Notify,
    /// The task's flag on the guest pool: set by the waker of whatever
    /// stops or re-arms it, so that its driver runs ahead of the queue.
    urgent: Arc<AtomicBool>,
    engine: wasmtime::Engine,
}

impl CancelState {
    pub(crate) fn new(engine: wasmtime::Engine) -> CancelState {
        CancelState {
            request: Mutex::new(None),
            forced: AtomicBool::new(false),
            cause: Mutex::new(None),
            observed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            hard: CancellationToken::new(),
            changed: Notify::new(),
            urgent: Arc::new(AtomicBool::new(false)),
            engine,
        }
    }

    /// The pending request, if any.
    pub fn request(&self) -> Option<CancelRequest> {
        self.request.lock().map(|r| r.clone()).unwrap_or(None)
    }

    /// Whether the guest must be stopped now (checked by the epoch callback).
    pub(crate) fn is_forced(&self) -> bool {
        self.forced.load(Ordering::Acquire)
    }

    /// The reason the guest sees through `cancel-requested`; marks the request
    /// as observed by the guest.
    pub(crate) fn observe(&self) -> Option<String> {
        let reason = self.request().map(|r| r.reason);
        if reason.is_some() {
            self.observed.store(true, Ordering::Release);
        }
        reason
    }

    /// Whether the guest has seen the pending request.
    pub fn observed(&self) -> bool {
        self.observed.load(Ordering::Acquire)
    }

    pub(crate) fn cause(&self) -> Option<StopCause> {
        self.cause.lock().map(|c| *c).unwrap_or(None)
    }

    pub(crate) fn urgent(&self) -> &Arc<AtomicBool> {
        &self.urgent
    }

    pub(crate) fn hard_token(&self) -> &CancellationToken {
        &self.hard
    }

    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }

    pub(crate) fn mark_finished(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// When the grace of the pending request runs out.
    pub(crate) fn grace_deadline(&self) -> Option<Instant> {
        self.request().map(|r| r.requested_at + r.grace)
    }

    /// Stop the guest now: flag, bump the epoch, fire the hard token. The
    /// first cause wins (a timeout that fires during a cancel stays a cancel).
    pub(crate) fn force(&self, cause: StopCause) {
        if let Ok(mut c) = self.cause.lock() {
            c.get_or_insert(cause);
        }
        self.forced.store(true, Ordering::Release);
        // The bump makes every running store's deadline due now, so the target
        // reaches its callback within microseconds instead of at the next tick.
        self.engine.increment_epoch();
        self.hard.cancel();
    }

    fn cancel(&self, reason: String, grace: Duration) -> CancelAck {
        if self.finished.load(Ordering::Acquire) {
            return CancelAck::AlreadyFinished;
        }
        let now = Instant::now();
        let (ack, force_now) = {
            let Ok(mut slot) = self.request.lock() else {
                // A poisoned lock means a panic elsewhere; stopping is the safe side.
                self.force(StopCause::Cancel);
                return CancelAck::Forced;
            };
            match slot.as_mut() {
                None => {
                    *slot = Some(CancelRequest {
                        reason,
                        grace,
                        requested_at: now,
                        requested_wall: SystemTime::now(),
                    });
                    if grace.is_zero() {
                        (CancelAck::Forced, true)
                    } else {
                        (CancelAck::Requested, false)
                    }
                }
                Some(existing) => {
                    let new_deadline = now + grace;
                    if new_deadline < existing.requested_at + existing.grace {
                        // Keep who asked first and when; only shorten the grace.
                        existing.grace =
                            new_deadline.saturating_duration_since(existing.requested_at);
                        if grace.is_zero() {
                            (CancelAck::Escalated, true)
                        } else {
                            (CancelAck::AlreadyRequested, false)
                        }
                    } else {
                        (CancelAck::AlreadyRequested, false)
                    }
                }
            }
        };
        if force_now {
            self.force(StopCause::Cancel);
        } else {
            self.changed.notify_one();
        }
        ack
    }
}

/// A cheap, cloneable handle to cancel one task attempt from anywhere.
#[derive(Debug, Clone)]
pub struct CancelHandle {
    pub(crate) state: std::sync::Arc<CancelState>,
}

impl CancelHandle {
    /// Ask the task to stop. With `grace` > 0 the guest sees the request and
    /// may return early; when the grace runs out the host stops it by force.
    /// With `grace` = 0 the guest is stopped at once. Repeats are idempotent,
    /// except that a repeat with a shorter grace brings the forced stop
    /// forward.
    pub fn cancel(&self, reason: impl Into<String>, grace: Duration) -> CancelAck {
        self.state.cancel(reason.into(), grace)
    }

    /// The request recorded so far, if any.
    pub fn request(&self) -> Option<CancelRequest> {
        self.state.request()
    }
}
