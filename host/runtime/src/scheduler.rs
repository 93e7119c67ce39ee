//! The guest pool: where guests execute, how they share the CPUs, and why a
//! cancelled guest never waits for its turn.
//!
//! # The model
//!
//! Every task's driver (instantiation, the guest's calls, its cancel and
//! timeout races; see `task.rs`) is a future polled on the **guest pool**: a
//! fixed set of OS threads (by default one per CPU) at a lower OS priority
//! than the rest of the process. The tokio runtime, which serves the API,
//! drives timers and I/O and talks to SQLite, never executes wasm.
//!
//! - **Priority.** The guest threads run under `SCHED_IDLE` by default
//!   ([`GuestPriority`]). When an API request, a timer or the database
//!   writer needs a CPU that guests hold, the kernel hands it over at once
//!   instead of letting a guest finish its time slice. With guests at the
//!   API's priority every hop of an HTTP cancel waited for a slice (4.3 ms
//!   p50, 14.6 ms p99 for cancel → committed with every core busy); at
//!   `nice` +10 the kernel still let them finish theirs (2.1 ms p50), under
//!   `SCHED_IDLE` it did not (0.8 ms p50; see BENCHMARKS.md).
//! - **Time slicing.** A running guest's epoch deadline falls due every
//!   ticker tick (a few ms). Its callback yields once ([`YieldOnce`]): the
//!   poll returns, the guest goes to the back of the run queue, and the
//!   thread takes the next one. Guests that wait in a host or WASI call are
//!   not in the queue at all; their wake puts them at the back.
//! - **Slice ends are scheduling points.** At the end of each guest's
//!   slice the thread calls `sched_yield`. `SCHED_IDLE` is a weight
//!   (3 against 1,024), not a strict class: a waking thread preempts a guest
//!   at once, but a thread that was *preempted* (the SQLite writer by an API
//!   worker, say) goes back to the run queue, and when that CPU picks again
//!   an eligible guest can win; the kernel looks again only at its next
//!   event on that CPU, a wake-up or the scheduler tick (every 4 ms at
//!   `HZ=250`), and a guest in user code makes none. Traced with
//!   `perf sched` under part 2's load: in one run the writer alone waited
//!   over 1 ms behind a guest thread that way 19 times (up to 4.8 ms), and
//!   the API workers did too (making only the writer real-time did not
//!   shrink the tail). Yielding at every slice end bounds the wait by the
//!   epoch tick; over 4 interleaved pairs of 1,000 HTTP cancels under load,
//!   the share over 2 ms went from 3.5% to 2.1% (BENCHMARKS.md, part 2).
//!   A *woken* thread can be passed over too: traced again, control-plane
//!   threads woken onto a guest's CPU waited up to 4 ms behind it, and so
//!   did the ticker itself, so the slice end that should have bounded the
//!   wait came late. The ticker therefore runs in the real-time class
//!   where the process may (`make_realtime`): its wake preempts any guest,
//!   the tick is on time, and a wait behind a guest lasts about a slice
//!   at most (2.1 ms in three traced runs, with the 2 ms tick).
//! - **Cancel jumps the queue.** A cancel (and a grace period or timeout
//!   running out) marks the task *urgent* before waking it ([`Urgent`]); an
//!   urgent wake puts the task at the *front* of the run queue, moving it
//!   there if it already waits. The cancel also bumps the epoch, so the
//!   guests executing right now reach their callback within microseconds
//!   and yield their threads; the next thing a thread runs is the cancelled
//!   task's driver, which drops the guest without running any more of it. A
//!   naive one-tokio-task-per-guest design waited its turn behind every
//!   runnable guest: 0.2–0.7 s here with 1,000 spinning guests.
//!
//! The pool is a small executor of its own rather than a second tokio
//! runtime because tokio offers no way to put a woken task at the front of
//! its queue, and a task woken from a worker goes to that worker's LIFO slot
//! ahead of an earlier wake. Guest futures still use tokio's timers and I/O:
//! each poll runs inside the tokio runtime the task was spawned from
//! (`Handle::enter`), whose own workers drive them.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The threads guests execute on, and their run queue.
#[derive(Debug)]
pub struct GuestPool {
    shared: Arc<Shared>,
    threads: usize,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Arc<Job>>,
    stop: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a wake (blocked in a host call, or for admission).
    Idle,
    /// In the run queue.
    Queued,
    /// Being polled by a pool thread.
    Running,
    /// Woken while being polled: queued again when the poll returns.
    Notified,
    /// Finished (or panicked); its future is gone.
    Done,
}

struct Job {
    /// Guarded by `Shared::queue`: every transition takes that lock.
    state: Mutex<State>,
    future: Mutex<Option<BoxFuture>>,
    urgent: Arc<AtomicBool>,
    handle: tokio::runtime::Handle,
    pool: Weak<Shared>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("urgent", &self.urgent.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (each
    // critical section is a few assignments); keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Puts `job` in the queue (at the front if it is urgent) and wakes an
    /// idle thread for it.
    fn enqueue(&self, q: &mut Queue, job: Arc<Job>) {
        self.push(q, job);
        self.ready.notify_one();
    }

    fn push(&self, q: &mut Queue, job: Arc<Job>) {
        if job.urgent.load(Ordering::Acquire) {
            q.jobs.push_front(job);
        } else {
            q.jobs.push_back(job);
        }
    }
}

impl Wake for Job {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut q = lock(&pool.queue);
        let mut state = lock(&self.state);
        match *state {
            State::Idle => {
                *state = State::Queued;
                drop(state);
                pool.enqueue(&mut q, Arc::clone(self));
            }
            State::Queued => {
                // Already waiting; an urgent wake moves it to the front.
                if self.urgent.load(Ordering::Acquire)
                    && let Some(at) = q.jobs.iter().position(|j| Arc::ptr_eq(j, self))
                    && at > 0
                    && let Some(job) = q.jobs.remove(at)
                {
                    q.jobs.push_front(job);
                }
            }
            State::Running => *state = State::Notified,
            State::Notified | State::Done => {}
        }
    }
}

impl GuestPool {
    /// Starts `threads` guest threads (at least one) at `priority` (one the
    /// process may not take is logged and ignored).
    pub fn new(threads: usize, priority: GuestPriority) -> std::io::Result<GuestPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared::default());
        for i in 0..threads {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("wasmtask-guest-{i}"))
                .spawn(move || {
                    priority.apply();
                    run(&shared);
                })?;
        }
        Ok(GuestPool { shared, threads })
    }

    /// How many threads execute guests.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Guests ready to run and waiting for a thread right now.
    pub fn waiting(&self) -> usize {
        lock(&self.shared.queue).jobs.len()
    }

    /// Runs `future` on the pool, inside the tokio runtime of `handle`.
    /// `urgent` is the task's flag: set it before waking the task to put it at
    /// the front of the queue (see [`Urgent`]).
    pub fn spawn(
        &self,
        handle: tokio::runtime::Handle,
        urgent: Arc<AtomicBool>,
        future: impl Future<Output = ()> + Send + 'static,
    ) {
        let job = Arc::new(Job {
            state: Mutex::new(State::Queued),
            future: Mutex::new(Some(Box::pin(future))),
            urgent,
            handle,
            pool: Arc::downgrade(&self.shared),
        });
        let mut q = lock(&self.shared.queue);
        self.shared.enqueue(&mut q, job);
    }
}

impl Drop for GuestPool {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.ready.notify_all();
    }
}

/// One guest thread: take the first job, poll it once, repeat.
fn run(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    *lock(&job.state) = State::Running;
                    break job;
                }
                if q.stop {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        poll_job(shared, job);
    }
}

fn poll_job(shared: &Shared, job: Arc<Job>) {
    // A wake from here on (a cancel during this poll) sets it again.
    job.urgent.store(false, Ordering::Release);
    let finished = {
        let _runtime = job.handle.enter();
        let waker = Waker::from(Arc::clone(&job));
        let mut cx = Context::from_waker(&waker);
        let mut slot = lock(&job.future);
        let ready = match slot.as_mut() {
            Some(future) => {
                // A panicking guest driver is a bug; it must not take the
                // thread (and every other guest) down with it. Its task's
                // report channel closes, which `wait` reports.
                catch_unwind(AssertUnwindSafe(|| {
                    future.as_mut().poll(&mut cx).is_ready()
                }))
                .unwrap_or(true)
            }
            None => true,
        };
        if ready {
            // Dropped here, on the guest thread (the store with it).
            *slot = None;
        }
        ready
    };
    let mut q = lock(&shared.queue);
    let mut state = lock(&job.state);
    if finished {
        *state = State::Done;
    } else if *state == State::Notified {
        *state = State::Queued;
        drop(state);
        // This thread takes the queue's head next; wake another only if
        // there is more than that to run. (Waking one for a lone guest that
        // yields its slice would move it to another core every tick.)
        shared.push(&mut q, job);
        if q.jobs.len() > 1 {
            shared.ready.notify_one();
        }
        drop(q);
        // The guest's slice is over: let the kernel choose what runs next
        // on this CPU (see "Slice ends are scheduling points" above).
        std::thread::yield_now();
    } else {
        *state = State::Idle;
    }
}

/// The OS priority guest threads run at, below the rest of the process so
/// that the API, timers and the database always get a CPU first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestPriority {
    /// `SCHED_IDLE`: guests get the CPU time nothing else in the process (or
    /// on the machine) wants, and any other thread that wakes preempts them
    /// at once. The default: the API's latency under load is what it is with
    /// idle cores. On a machine shared with other busy work, guests can be
    /// starved; choose [`GuestPriority::Low`] there.
    #[default]
    Idle,
    /// `nice` +10: other threads get most of the CPU when they want it,
    /// but a waking API thread may wait for a guest's time slice.
    Low,
    /// The process's own priority.
    Normal,
}

impl GuestPriority {
    /// Applies it to the calling thread (Linux; elsewhere a no-op).
    fn apply(self) {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: plain syscalls on the calling thread (`setpriority` and
            // `sched_setscheduler` with pid 0 or the caller's tid apply to
            // that thread only).
            let r = unsafe {
                match self {
                    GuestPriority::Normal => return,
                    GuestPriority::Low => {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10)
                    }
                    GuestPriority::Idle => {
                        let param = libc::sched_param { sched_priority: 0 };
                        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
                    }
                }
            };
            if r != 0 {
                tracing::warn!(
                    priority = ?self,
                    error = %std::io::Error::last_os_error(),
                    "cannot lower the priority of a guest thread; guests compete with the API"
                );
            }
        }
    }
}

/// Puts the calling thread in the real-time class at its lowest priority
/// (`SCHED_FIFO` 1), above every ordinary thread: used for the epoch
/// ticker, which runs for microseconds per tick, so that a tick is never
/// late because the CPU it wakes on is busy. Fails without
/// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least 1, and off Linux.
pub(crate) fn make_realtime() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: a plain syscall on the calling thread (pid 0).
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "real-time scheduling is only used on Linux",
    ))
}

/// A future that is pending exactly once, waking itself: used by the epoch
/// callback to end the current poll. On the guest pool this puts the guest at
/// the back of the run queue (time slicing); anywhere else it is a plain
/// yield.
#[derive(Debug, Default)]
pub struct YieldOnce {
    yielded: bool,
}

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Polls `inner` with a waker that marks the task urgent before waking it:
/// whatever `inner` waits for (a cancel, a grace period or a timeout running
/// out) puts the task at the front of the pool's run queue.
pub struct Urgent<'a, F> {
    inner: Pin<Box<F>>,
    flag: &'a Arc<AtomicBool>,
    /// The waker last given to `inner`, built for the task waker beside it
    /// (rebuilt only when the task's waker changes).
    waker: Option<(Waker, Waker)>,
}

impl<'a, F> Urgent<'a, F> {
    pub fn new(flag: &'a Arc<AtomicBool>, inner: F) -> Urgent<'a, F> {
        Urgent {
            inner: Box::pin(inner),
            flag,
            waker: None,
        }
    }
}

struct UrgentWake {
    flag: Arc<AtomicBool>,
    inner: Waker,
}

impl Wake for UrgentWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.inner.wake_by_ref();
    }
}

impl<F: Future> Future for Urgent<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this
            .waker
            .as_ref()
            .is_some_and(|(task, _)| !task.will_wake(cx.waker()))
        {
            this.waker = None;
        }
        let flag = this.flag;
        let (_, ours) = this.waker.get_or_insert_with(|| {
            let ours = Waker::from(Arc::new(UrgentWake {
                flag: Arc::clone(flag),
                inner: cx.waker().clone(),
            }));
            (cx.waker().clone(), ours)
        });
        let mut inner_cx = Context::from_waker(ours);
        this.inner.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn spawn_on<T: Send + 'static>(
        pool: &GuestPool,
        urgent: Arc<AtomicBool>,
        f: impl Future<Output = T> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        pool.spawn(tokio::runtime::Handle::current(), urgent, async move {
            let _ = tx.send(f.await);
        });
        rx
    }

    /// Yielding jobs take turns in FIFO order on one thread, and a job that
    /// waits is not polled until it is woken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn yielding_jobs_take_turns() {
        let pool = GuestPool::new(1, GuestPriority::Normal).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Barrier::new(4));
        let mut done = Vec::new();
        for id in 0..3usize {
            let (order, gate) = (Arc::clone(&order), Arc::clone(&gate));
            done.push(spawn_on(&pool, Arc::default(), async move {
                gate.wait().await;
                for _ in 0..50 {
                    order.lock().unwrap().push(id);
                    YieldOnce::default().await;
                }
            }));
        }
        gate.wait().await;
        for d in done {
            d.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 150);
        let tail = &order[3..order.len() - 3];
        for w in tail.windows(3) {
            assert!(
                w[0] != w[1] && w[1] != w[2] && w[0] != w[2],
                "not round-robin: {order:?}"
            );
        }
        assert_eq!(pool.waiting(), 0);
    }

    /// With the only thread kept busy by yielding spinners, an urgent wake
    /// runs its job before any spinner gets another turn. The wake comes from
    /// a spinner's own turn, so the order on the one thread is exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_urgent_wake_jumps_the_queue() {
        let pool = GuestPool::new(1, GuestPriority::Normal).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let turns = Arc::new(AtomicUsize::new(0));
        let woken_at = Arc::new(AtomicUsize::new(usize::MAX));
        let notify = Arc::new(tokio::sync::Notify::new());
        let urgent = Arc::new(AtomicBool::new(false));
        let run_at = Arc::new(AtomicUsize::new(usize::MAX));
        let target = {
            let (urgent, notify, turns, run_at) = (
                Arc::clone(&urgent),
                Arc::clone(&notify),
                Arc::clone(&turns),
                Arc::clone(&run_at),
            );
            spawn_on(&pool, Arc::clone(&urgent), async move {
                Urgent::new(&urgent, notify.notified()).await;
                run_at.store(turns.load(Ordering::SeqCst), Ordering::SeqCst);
            })
        };
        let mut spinners = Vec::new();
        for i in 0..20 {
            let (stop, turns, notify, woken_at) = (
                Arc::clone(&stop),
                Arc::clone(&turns),
                Arc::clone(&notify),
                Arc::clone(&woken_at),
            );
            spinners.push(spawn_on(&pool, Arc::default(), async move {
                while !stop.load(Ordering::Acquire) {
                    let turn = turns.fetch_add(1, Ordering::SeqCst) + 1;
                    if i == 0 && turn >= 100 && woken_at.load(Ordering::SeqCst) == usize::MAX {
                        woken_at.store(turn, Ordering::SeqCst);
                        notify.notify_one();
                    }
                    YieldOnce::default().await;
                }
            }));
        }
        target.await.unwrap();
        stop.store(true, Ordering::Release);
        for s in spinners {
            s.await.unwrap();
        }
        // The target ran right after the turn that woke it; a FIFO wake
        // would have waited for the other 19 spinners' turns.
        assert_eq!(
            run_at.load(Ordering::SeqCst),
            woken_at.load(Ordering::SeqCst),
            "the urgent job waited for other turns"
        );
    }

    /// A job that panics does not take its thread with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_panicking_job_leaves_the_pool_running() {
        let pool = GuestPool::new(1, GuestPriority::Normal).unwrap();
        let crashed = spawn_on(&pool, Arc::default(), async {
            if true {
                panic!("driver bug");
            }
        });
        assert!(crashed.await.is_err(), "the panicked job's result is gone");
        let fine = spawn_on(&pool, Arc::default(), async { 7 });
        assert_eq!(fine.await.unwrap(), 7);
    }

    /// Tokio timers work inside pool jobs (each poll enters the runtime).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn jobs_can_use_tokio_timers() {
        let pool = GuestPool::new(2, GuestPriority::Normal).unwrap();
        let slept = spawn_on(&pool, Arc::default(), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            "woke"
        });
        assert_eq!(slept.await.unwrap(), "woke");
    }
}
