//! Part 1: cancel → guest stopped, through the runtime's own API, beside
//! the native baseline (signal → process reaped).
//!
//! For each kind of guest (spinning, sleeping in WASI, blocked reading its
//! stdin) and each count, that many guests run at once; for the sleeping and
//! reading kinds, `2 × cpu_slots` spinning guests run beside them so that
//! every core is busy. Then, one at a time, a guest is canceled with no grace
//! and the time is taken from the `cancel` call to the moment the task's
//! `wait()` future has returned in a tokio task of its own. The measuring
//! loop itself runs on a tokio worker, as an API handler would.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::DuplexStream;
use tokio::sync::oneshot;
use wasmtask_runtime::{
    CancelHandle, Plugin, Runtime, Stdin, TaskEnd, TaskLimits, TaskReport, TaskRequest, WasiSpec,
};

use crate::native::Work;

/// The three guests, loaded once.
pub struct Guests {
    pub spin: Plugin,
    pub sleep: Plugin,
    pub read: Plugin,
}

impl Guests {
    pub async fn load(rt: &Runtime) -> anyhow::Result<Guests> {
        Ok(Guests {
            spin: crate::load(rt, "spin-loop").await?,
            sleep: crate::load(rt, "sleeper").await?,
            read: crate::load(rt, "stdin-wait").await?,
        })
    }
}

/// A guest that is running, with the receiving end of its finish.
pub struct Live {
    pub cancel: CancelHandle,
    pub done: oneshot::Receiver<(Instant, TaskReport)>,
    /// The writing end of a reading guest's stdin, kept open so its read
    /// never completes.
    _stdin: Option<DuplexStream>,
}

/// Starts a guest doing `work` and returns once it runs its entry point.
pub async fn launch(rt: &Runtime, g: &Guests, work: Work) -> anyhow::Result<Live> {
    Ok(launch_many(rt, g, work, 1).await?.remove(0))
}

/// Starts `n` guests doing `work` at once and returns once all of them run
/// their entry point. (Started one after the other, each would wait for a
/// guest thread behind all the spinning guests started before it.)
pub async fn launch_many(
    rt: &Runtime,
    g: &Guests,
    work: Work,
    n: usize,
) -> anyhow::Result<Vec<Live>> {
    let mut started = Vec::with_capacity(n);
    for _ in 0..n {
        started.push(spawn(rt, g, work)?);
    }
    let mut lives = Vec::with_capacity(n);
    for (task, keep) in started {
        task.started().await;
        lives.push(watch(task, keep));
    }
    Ok(lives)
}

/// Spawns one guest of the kind; it starts when the guest pool gets to it.
fn spawn(
    rt: &Runtime,
    g: &Guests,
    work: Work,
) -> anyhow::Result<(wasmtask_runtime::RunningTask, Option<DuplexStream>)> {
    let mut wasi = WasiSpec::default();
    let mut keep = None;
    let (plugin, input): (&Plugin, &[u8]) = match work {
        Work::Spin => (&g.spin, b"null"),
        Work::Sleep => (&g.sleep, br#"{"ms":3600000}"#),
        Work::Read => {
            let (w, r) = tokio::io::duplex(64);
            wasi.stdin = Stdin::Reader(Box::new(r));
            keep = Some(w);
            (&g.read, b"null")
        }
    };
    let task = rt.spawn(TaskRequest {
        plugin: plugin.clone(),
        name: work.mode().to_owned(),
        input: input.to_vec(),
        wasi,
        limits: TaskLimits::default(),
        events: None,
    })?;
    Ok((task, keep))
}

/// Waits for `task`'s end in a tokio task of its own, timestamping it.
fn watch(task: wasmtask_runtime::RunningTask, keep: Option<DuplexStream>) -> Live {
    let cancel = task.cancel_handle();
    let (tx, done) = oneshot::channel();
    tokio::spawn(async move {
        let report = task.wait().await;
        let _ = tx.send((Instant::now(), report));
    });
    Live {
        cancel,
        done,
        _stdin: keep,
    }
}

pub async fn stop(live: Live) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    live.cancel.cancel("bench", Duration::ZERO);
    let (t1, report) = live.done.await.context("the task's waiter vanished")?;
    if report.end != TaskEnd::Cancelled {
        bail!("a canceled guest ended {:?}", report.end);
    }
    let inner = report.cancel.map(|c| c.latency).unwrap_or_default();
    Ok((t1.duration_since(t0), inner))
}

/// DESIGN §8's bound on cancel → stopped at p99.
pub const TARGET: Duration = Duration::from_micros(300);

/// A small deterministic jitter (0–3 ms) between samples, so cancels do not
/// line up with the epoch ticker.
pub fn jitter(i: usize) -> Duration {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    Duration::from_micros(x % 3000)
}

/// One row: `n` guests doing `work` (plus background spinners for
/// non-spinning work), `samples` of them canceled one at a time. Returns
/// each cancel's time on the waiter's side and the runtime's own figure.
pub async fn measure(
    rt: &Runtime,
    g: &Guests,
    work: Work,
    n: usize,
    samples: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let background = if work == Work::Spin {
        Vec::new()
    } else {
        launch_many(rt, g, Work::Spin, 2 * rt.cpu_slots()).await?
    };
    let mut outer = Vec::with_capacity(samples);
    let mut inner = Vec::with_capacity(samples);
    if n == 1 {
        for i in 0..samples {
            let live = launch(rt, g, work).await?;
            tokio::time::sleep(jitter(i)).await;
            let (o, r) = stop(live).await?;
            outer.push(o);
            inner.push(r);
        }
    } else {
        let mut all: Vec<Option<Live>> = launch_many(rt, g, work, n)
            .await?
            .into_iter()
            .map(Some)
            .collect();
        // Each canceled guest is replaced by a fresh one, so `n` keep
        // running however many samples are taken.
        for k in 0..samples {
            let i = k % n;
            tokio::time::sleep(jitter(k)).await;
            if let Some(live) = all[i].take() {
                let (o, r) = stop(live).await?;
                outer.push(o);
                inner.push(r);
            }
            // Not waited for: among a thousand spinning guests the new one
            // gets its first turn only after the others had theirs, long
            // before its own cancel comes round (`n` samples later).
            let (task, keep) = spawn(rt, g, work)?;
            all[i] = Some(watch(task, keep));
        }
        stop_all(all.into_iter().flatten().collect()).await;
    }
    stop_all(background).await;
    Ok((outer, inner))
}

/// Cancels every guest and waits for all of them.
pub async fn stop_all(lives: Vec<Live>) {
    for l in &lives {
        l.cancel.cancel("bench done", Duration::ZERO);
    }
    for l in lives {
        let _ = l.done.await;
    }
}
