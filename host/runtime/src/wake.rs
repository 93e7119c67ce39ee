//! Handing a task's report from a guest thread to the tokio task waiting for
//! it, through the tokio runtime's I/O driver.
//!
//! A guest thread is not one of tokio's workers, so waking a tokio task
//! from it is a *remote* wake: tokio unparks an idle worker, and that
//! worker, having found the task, unparks a second worker before running it
//! (tokio's guard against a lost wake-up, `transition_worker_from_searching`).
//! With the pool's guests on every CPU the second worker finds nothing, but
//! its wake-up still costs two context switches and an interrupt that takes
//! a CPU from a guest: about 0.65 such wake-ups per trivial task in the
//! runtime API (BENCHMARKS.md, part 5). With the relay the runtime API's
//! wake-ups per task halved; through HTTP, where the workers are busy, they
//! did not fall (BENCHMARKS.md, the wake relay in *The session before*).
//!
//! A [`Relay`] avoids that. The guest thread queues the waiter's `Waker` and
//! sends a byte to a socket that a tokio task of that runtime reads. The
//! worker holding the I/O driver wakes for the byte as for any I/O, which
//! does not count as finding work for others, and runs the relay task. That
//! task wakes the queued wakers from inside the runtime, so they go to the
//! worker's own queue. Wakes that arrive while the relay task is pending are
//! sent in one batch.
//!
//! [`report_channel`] is the one-shot channel a task's report travels on
//! (and the host's SQLite writer replies on: one commit's replies then reach
//! the runtime as one I/O event). Every sender in the process that wakes
//! tasks of one tokio runtime shares that runtime's relay ([`relay_for`]),
//! so reports and replies sent together are relayed together. The receiver
//! uses the relay only when it is polled inside the relay's runtime;
//! anywhere else (another runtime, a thread blocking on the future) the
//! sender wakes it directly, as a plain channel would. If the relay's
//! runtime has shut down, wakes fall back to direct ones too.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::pin::Pin;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes tasks of one tokio runtime from threads outside it.
#[derive(Debug, Clone)]
pub struct Relay {
    runtime: tokio::runtime::Id,
    shared: Arc<RelayShared>,
}

#[derive(Debug)]
struct RelayShared {
    wakers: Mutex<Vec<Waker>>,
    /// The sending end; the relay task holds the receiving one. Datagrams,
    /// not a stream: a send to a closed peer fails with an error instead
    /// of raising `SIGPIPE`.
    signal: StdUnixDatagram,
    /// False once the relay task is gone (its runtime shut down) or the
    /// socket failed: wakes are then direct.
    open: AtomicBool,
    /// Wakers the relay task has woken (for the tests).
    #[cfg(test)]
    relayed: AtomicU64,
}

impl Relay {
    /// Starts a relay task on `handle`'s runtime.
    ///
    /// A runtime built without its I/O driver (`enable_io`) cannot poll the
    /// socket: tokio panics when asked to. That happens inside the relay
    /// task, which then closes the relay (tokio prints the panic once), and
    /// its wakes are direct.
    fn start(handle: &tokio::runtime::Handle) -> std::io::Result<Relay> {
        let (signal, read) = StdUnixDatagram::pair()?;
        signal.set_nonblocking(true)?;
        read.set_nonblocking(true)?;
        let shared = Arc::new(RelayShared {
            wakers: Mutex::new(Vec::new()),
            signal,
            open: AtomicBool::new(true),
            #[cfg(test)]
            relayed: AtomicU64::new(0),
        });
        let task_shared = Arc::clone(&shared);
        // Whatever ends the task (its runtime shutting down drops it, polled
        // or not), the wakes still queued are delivered and later ones are
        // direct. Made out here, the guard is dropped with the future even
        // if it never ran.
        let closed = CloseOnDrop(Arc::clone(&shared));
        handle.spawn(async move {
            let _closed = closed;
            let Ok(read) = tokio::net::UnixDatagram::from_std(read) else {
                return;
            };
            let mut buf = [0u8; 64];
            loop {
                if read.readable().await.is_err() {
                    return;
                }
                loop {
                    match read.try_recv(&mut buf) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
                // Taken after the bytes are read: a waker queued after this
                // comes with a byte of its own.
                let batch = std::mem::take(&mut *lock(&task_shared.wakers));
                #[cfg(test)]
                task_shared
                    .relayed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for waker in batch {
                    waker.wake();
                }
            }
        });
        Ok(Relay {
            runtime: handle.id(),
            shared,
        })
    }

    /// The runtime whose tasks this relay wakes.
    fn runtime(&self) -> tokio::runtime::Id {
        self.runtime
    }

    /// How many wakes the relay task has delivered.
    #[cfg(test)]
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::Relaxed)
    }

    /// Whether the relay task still runs.
    pub fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Wakes `waker` from inside the relay's runtime (directly, if the relay
    /// is closed).
    fn wake(&self, waker: Waker) {
        if !self.is_open() {
            waker.wake();
            return;
        }
        let first = {
            let mut wakers = lock(&self.shared.wakers);
            let first = wakers.is_empty();
            wakers.push(waker);
            first
        };
        if !first {
            // The byte sent for the first one is still to be read (or
            // being read, and the batch not yet taken).
            return;
        }
        match self.shared.signal.send(&[1]) {
            Ok(_) => {}
            // Bytes are waiting to be read: the relay task will run anyway.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.shared.close(),
        }
        // The relay task may have ended between the check above and the
        // push; then nobody would read the queue.
        if !self.is_open() {
            self.shared.wake_all();
        }
    }
}

impl RelayShared {
    fn close(&self) {
        self.open.store(false, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        let batch = std::mem::take(&mut *lock(&self.wakers));
        for waker in batch {
            waker.wake();
        }
    }
}

struct CloseOnDrop(Arc<RelayShared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Relays kept before the closed ones are forgotten.
const MAX_RELAYS: usize = 64;

/// One relay per tokio runtime that spawned tasks (a process normally has
/// one), started on first use.
#[derive(Debug, Default)]
struct Relays {
    relays: Mutex<Vec<Relay>>,
}

/// The process's relays.
static RELAYS: Relays = Relays {
    relays: Mutex::new(Vec::new()),
};

/// The relay of `handle`'s runtime, shared by every sender in the process
/// (see [`Relays::for_handle`]).
pub fn relay_for(handle: &tokio::runtime::Handle) -> Option<Relay> {
    RELAYS.for_handle(handle)
}

impl Relays {
    /// The relay of `handle`'s runtime; `None` if it cannot be started or
    /// has closed (the channel then wakes directly). A runtime's relay is
    /// started once: runtime ids are never reused, so a closed one means a
    /// runtime that is shutting down or has no I/O driver.
    fn for_handle(&self, handle: &tokio::runtime::Handle) -> Option<Relay> {
        let id = handle.id();
        let mut relays = lock(&self.relays);
        if let Some(r) = relays.iter().find(|r| r.runtime == id) {
            return r.is_open().then(|| r.clone());
        }
        // Closed relays of runtimes long gone; the list stays short.
        if relays.len() >= MAX_RELAYS {
            relays.retain(Relay::is_open);
        }
        match Relay::start(handle) {
            Ok(r) => {
                relays.push(r.clone());
                Some(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the wake relay; waking directly");
                None
            }
        }
    }
}

/// The sender went away without sending (its future panicked or was
/// dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

struct Slot<T> {
    value: Option<T>,
    /// The receiver's waker, and whether it was registered on a worker of
    /// the relay's runtime.
    waker: Option<(Waker, bool)>,
    sender_gone: bool,
}

/// A one-shot channel whose sender, on a thread outside tokio, wakes the
/// receiver through `relay` (see the module docs).
pub fn report_channel<T>(relay: Option<Relay>) -> (ReportSender<T>, ReportReceiver<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
        sender_gone: false,
    }));
    let runtime = relay.as_ref().map(Relay::runtime);
    (
        ReportSender {
            slot: Some(Arc::clone(&slot)),
            relay,
        },
        ReportReceiver { slot, runtime },
    )
}

/// The sending half of [`report_channel`]; dropping it unsent ends the
/// wait with [`Closed`].
pub struct ReportSender<T> {
    /// `None` once the value is sent (or the sender dropped).
    slot: Option<Arc<Mutex<Slot<T>>>>,
    relay: Option<Relay>,
}

impl<T> ReportSender<T> {
    /// Delivers `value` (dropped if the receiver is gone).
    pub fn send(mut self, value: T) {
        self.finish(Some(value));
    }

    /// Delivers `value`, or with `None` tells the receiver none will come,
    /// and wakes it; the first call only.
    fn finish(&mut self, value: Option<T>) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let waker = {
            let mut slot = lock(&slot);
            match value {
                Some(v) => slot.value = Some(v),
                None => slot.sender_gone = true,
            }
            slot.waker.take()
        };
        match (waker, &self.relay) {
            (Some((waker, true)), Some(relay)) => relay.wake(waker),
            (Some((waker, _)), _) => waker.wake(),
            (None, _) => {}
        }
    }
}

impl<T> Drop for ReportSender<T> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl<T> std::fmt::Debug for ReportSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportSender").finish_non_exhaustive()
    }
}

/// The receiving half of [`report_channel`]: a future of the value.
pub struct ReportReceiver<T> {
    slot: Arc<Mutex<Slot<T>>>,
    runtime: Option<tokio::runtime::Id>,
}

impl<T> std::fmt::Debug for ReportReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportReceiver").finish_non_exhaustive()
    }
}

impl<T> Future for ReportReceiver<T> {
    type Output = Result<T, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = lock(&self.slot);
        if let Some(value) = slot.value.take() {
            return Poll::Ready(Ok(value));
        }
        if slot.sender_gone {
            return Poll::Ready(Err(Closed));
        }
        // Through the relay only if polled inside its runtime: elsewhere
        // its task's wake would be one more hop.
        let in_relay_runtime = self
            .runtime
            .is_some_and(|id| tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == id));
        match &mut slot.waker {
            Some((w, via)) if w.will_wake(cx.waker()) => *via = in_relay_runtime,
            other => *other = Some((cx.waker().clone(), in_relay_runtime)),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Sends from a plain thread after the receiver is pending.
    fn send_later<T: Send + 'static>(tx: ReportSender<T>, value: T) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(value);
        });
    }

    /// Waits for `rx` in a task of `rt` while a plain thread sends `value`.
    fn wait_in_a_task<T: Send + 'static>(
        rt: &tokio::runtime::Runtime,
        (tx, rx): (ReportSender<T>, ReportReceiver<T>),
        value: T,
    ) -> Option<Result<T, Closed>> {
        rt.block_on(async move {
            tokio::spawn(async move {
                send_later(tx, value);
                tokio::time::timeout(Duration::from_secs(10), rx).await.ok()
            })
            .await
            .unwrap()
        })
    }

    #[test]
    fn a_report_sent_from_another_thread_reaches_a_waiting_task_through_the_relay() {
        let rt = runtime();
        let relays = Relays::default();
        let relay = relays.for_handle(rt.handle()).unwrap();
        let got = wait_in_a_task(&rt, report_channel(Some(relay.clone())), 7u32);
        assert_eq!(got, Some(Ok(7)));
        assert!(relay.is_open());
        // Woken by the relay task, not by the sending thread.
        assert_eq!(relay.relayed(), 1);
        // The runtime's relay is reused, not started again.
        let again = relays.for_handle(rt.handle()).unwrap();
        assert!(Arc::ptr_eq(&again.shared, &relay.shared));
        // The process-wide one too: every sender shares it.
        let shared = relay_for(rt.handle()).unwrap();
        assert!(Arc::ptr_eq(
            &relay_for(rt.handle()).unwrap().shared,
            &shared.shared
        ));
    }

    #[test]
    fn a_dropped_sender_ends_the_wait_with_closed() {
        let rt = runtime();
        let relay = Relay::start(rt.handle()).unwrap();
        let (tx, rx) = report_channel::<u32>(Some(relay));
        let got = rt.block_on(async move {
            tokio::spawn(async move {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    drop(tx);
                });
                rx.await
            })
            .await
            .unwrap()
        });
        assert_eq!(got, Err(Closed));
    }

    #[test]
    fn a_receiver_polled_in_another_runtime_is_woken_directly() {
        let relay_rt = runtime();
        let relay = Relay::start(relay_rt.handle()).unwrap();
        // The relay's runtime is gone: nobody would read its queue.
        drop(relay_rt);
        let other = runtime();
        let (tx, rx) = report_channel(Some(relay.clone()));
        let got = other.block_on(async move {
            send_later(tx, 3u8);
            tokio::time::timeout(Duration::from_secs(10), rx).await
        });
        assert_eq!(got, Ok(Ok(3)));
        assert_eq!(relay.relayed(), 0);
    }

    #[test]
    fn a_closed_relay_wakes_directly() {
        let rt = runtime();
        let relay = Relay::start(rt.handle()).unwrap();
        drop(rt);
        // Dropping the runtime drops the relay task, which closes it.
        assert!(!relay.is_open());
        let woken = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        relay.wake(Waker::from(Arc::new(Flag(Arc::clone(&woken)))));
        assert!(woken.load(Ordering::SeqCst));
    }

    #[test]
    fn a_runtime_without_its_io_driver_gets_direct_wakes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let relays = Relays::default();
        let relay = relays.for_handle(rt.handle());
        let got = wait_in_a_task(&rt, report_channel(relay), 5u8);
        assert_eq!(got, Some(Ok(5)));
        // The relay task could not poll the socket and closed the relay; it
        // is not started again for this runtime.
        assert!(relays.for_handle(rt.handle()).is_none());
    }

    #[test]
    fn many_reports_from_many_threads_all_arrive() {
        let rt = runtime();
        let relay = Relay::start(rt.handle()).unwrap();
        let relay_in = relay.clone();
        let sum = rt.block_on(async move {
            let mut waits = Vec::new();
            for i in 0..500u64 {
                let (tx, rx) = report_channel(Some(relay_in.clone()));
                waits.push(tokio::spawn(rx));
                std::thread::spawn(move || tx.send(i));
            }
            let mut sum = 0;
            for w in waits {
                sum += tokio::time::timeout(Duration::from_secs(10), w)
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
            }
            sum
        });
        assert_eq!(sum, (0..500u64).sum::<u64>());
        // Receivers polled before their send went through the relay; the
        // others found their value at the first poll.
        assert!(relay.relayed() <= 500);
    }
}
