//! The machine's own stalls, measured in the same run as part 2.
//!
//! One thread pinned to each CPU reads the monotonic clock in a loop and
//! never blocks, with nothing else of this process running. Any gap between
//! two reads is time that CPU was taken away: by the hypervisor (these
//! machines are VMs on shared hosts), by an interrupt, or by a kernel
//! thread. No program on the machine can respond faster than such a gap
//! lets it; part 2's tail is read against this.

use std::time::{Duration, Instant};

/// Gaps shorter than this are not recorded (clock reads, cache misses, the
/// timer interrupt).
pub const FLOOR: Duration = Duration::from_micros(200);

/// What the probe saw, over all CPUs.
#[derive(Debug, Clone)]
pub struct Stalls {
    pub cpus: usize,
    pub took: Duration,
    /// Every gap of at least [`FLOOR`], longest first.
    pub gaps: Vec<Duration>,
}

impl Stalls {
    /// Gaps of at least `d`, per CPU and second.
    pub fn rate_over(&self, d: Duration) -> f64 {
        let n = self.gaps.iter().filter(|g| **g >= d).count();
        n as f64 / (self.cpus as f64 * self.took.as_secs_f64()).max(f64::MIN_POSITIVE)
    }

    /// The share of each CPU's time lost in gaps of at least `d`.
    pub fn lost_over(&self, d: Duration) -> f64 {
        let lost: Duration = self.gaps.iter().filter(|g| **g >= d).sum();
        lost.as_secs_f64() / (self.cpus as f64 * self.took.as_secs_f64()).max(f64::MIN_POSITIVE)
    }

    pub fn longest(&self) -> Duration {
        self.gaps.first().copied().unwrap_or_default()
    }
}

/// Spins one pinned thread per CPU for `took`; blocks the caller.
pub fn probe(took: Duration) -> anyhow::Result<Stalls> {
    let allowed = allowed_cpus()?;
    let cpus = allowed.len();
    let threads: Vec<_> = allowed
        .into_iter()
        .map(|cpu| {
            std::thread::Builder::new()
                .name(format!("bench-stall-{cpu}"))
                .spawn(move || spin(cpu, took))
        })
        .collect::<Result<_, _>>()?;
    let mut gaps = Vec::new();
    for t in threads {
        let mine = t
            .join()
            .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
        gaps.extend(mine);
    }
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(Stalls { cpus, took, gaps })
}

fn spin(cpu: usize, took: Duration) -> anyhow::Result<Vec<Duration>> {
    pin(cpu)?;
    let mut gaps = Vec::new();
    let start = Instant::now();
    let mut last = start;
    loop {
        let now = Instant::now();
        let gap = now - last;
        if gap >= FLOOR {
            gaps.push(gap);
        }
        last = now;
        if now - start >= took {
            return Ok(gaps);
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: `set` is a plain bit set that the kernel fills; pid 0 is the
    // calling thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            anyhow::bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        set
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the size of `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    anyhow::ensure!(!cpus.is_empty(), "no CPU in this process's affinity mask");
    Ok(cpus)
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: `set` is a plain bit set, zeroed, then filled by the libc
    // macros; pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        anyhow::bail!(
            "cannot pin a probe thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Thread hand-offs on a cancel's critical path over HTTP: client → API
/// worker → writer (the cancel record) → API worker (the record committed,
/// the guest's report) → writer (its end) → API worker → client.
pub const CANCEL_HAND_OFFS: usize = 6;

/// CPU work per hand-off in the second baseline chain: with it the chain's
/// median is near a cancel's, so the two tails compare like for like.
pub const HAND_OFF_WORK: Duration = Duration::from_micros(60);

/// A native chain of `hops` thread hand-offs, `samples` times one at a
/// time with the same jitter as part 2's requests: what waking that many
/// threads in turn costs on this machine under whatever load is running.
/// Each relay spins for `work` before handing on. Blocks the caller (which
/// takes the first and the last hop).
pub fn hand_offs(hops: usize, samples: usize, work: Duration) -> anyhow::Result<Vec<Duration>> {
    use std::sync::mpsc;
    anyhow::ensure!(hops >= 2, "a chain needs at least two hand-offs");
    let (first, mut rx) = mpsc::channel::<()>();
    let mut relays = Vec::new();
    for i in 0..hops - 1 {
        let (tx, next) = mpsc::channel::<()>();
        let inbox = std::mem::replace(&mut rx, next);
        relays.push(
            std::thread::Builder::new()
                .name(format!("bench-relay-{i}"))
                .spawn(move || {
                    while inbox.recv().is_ok() {
                        let t0 = Instant::now();
                        while t0.elapsed() < work {
                            std::hint::spin_loop();
                        }
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                })?,
        );
    }
    let mut took = Vec::with_capacity(samples);
    for i in 0..samples {
        std::thread::sleep(crate::cancel::jitter(i));
        let t0 = Instant::now();
        first.send(())?;
        rx.recv()?;
        took.push(t0.elapsed());
    }
    drop(first);
    for r in relays {
        let _ = r.join();
    }
    Ok(took)
}
