//! The baselines: the same work as a native process per task, the way users
//! stop such work without wasmtask — a signal, then reaping the process.
//!
//! The bench binary re-executes itself as the child (`--child MODE`), so the
//! child is a plain Rust program: it installs a SIGTERM handler that exits at
//! once (the "program handles it" case), prints `ready`, then spins, sleeps
//! or blocks reading its stdin.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// What a child does once ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Spin,
    Sleep,
    Read,
}

impl Work {
    pub fn mode(self) -> &'static str {
        match self {
            Work::Spin => "spin",
            Work::Sleep => "sleep",
            Work::Read => "read",
        }
    }
}

extern "C" fn on_term(_: libc::c_int) {
    // SAFETY: `_exit` is async-signal-safe.
    unsafe { libc::_exit(0) }
}

/// The child side: runs `mode` and never returns (except `exit`).
pub fn child(mode: &str) -> ! {
    if mode == "exit" {
        std::process::exit(0);
    }
    // SAFETY: installing a handler that only calls `_exit`.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_term as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"ready\n");
    let _ = out.flush();
    // Wait for the go byte: a thousand children are all spawned before any
    // of them spins (spawning among a thousand spinning processes crawls).
    let mut go = [0u8; 1];
    let _ = std::io::stdin().read_exact(&mut go);
    match mode {
        "spin" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "sleep" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {
            let mut buf = [0u8; 64];
            loop {
                // A read that never completes: the parent keeps the pipe open.
                let _ = std::io::stdin().read(&mut buf);
            }
        }
    }
}

fn spawn(work: Work) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the bench binary")?;
    let mut child = Command::new(exe)
        .args(["--child", work.mode()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot spawn a child process")?;
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .context("no stdout")?
        .read_exact(&mut ready)
        .context("the child did not report ready")?;
    if &ready != b"ready\n" {
        bail!("unexpected child output {ready:?}");
    }
    Ok(child)
}

/// Lets a ready child start its work.
fn go(child: &mut Child) -> anyhow::Result<()> {
    let stdin = child.stdin.as_mut().context("no stdin")?;
    stdin.write_all(b"g")?;
    stdin.flush()?;
    Ok(())
}

fn signal(child: &Child, sig: libc::c_int) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id()).context("pid")?;
    // SAFETY: signalling our own child, which has not been reaped yet.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Signal → process reaped, for `samples` of `n` children running `work`
/// at once (for `n == 1`, one child at a time): the samples alternate
/// between SIGKILL and SIGTERM (which the child handles by exiting), so one
/// population of children serves both. Returns (SIGKILL, SIGTERM) times.
pub fn stop_latency(
    work: Work,
    n: usize,
    samples: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut kill, mut term) = (Vec::new(), Vec::new());
    let mut one = |c: &mut Child, i: usize| -> anyhow::Result<()> {
        let sig = if i.is_multiple_of(2) {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        let t0 = Instant::now();
        signal(c, sig)?;
        c.wait()?;
        let took = t0.elapsed();
        if sig == libc::SIGKILL {
            kill.push(took);
        } else {
            term.push(took);
        }
        Ok(())
    };
    if samples == 0 {
        return Ok((kill, term));
    }
    if n == 1 {
        for i in 0..2 * samples {
            let mut c = spawn(work)?;
            go(&mut c)?;
            one(&mut c, i)?;
        }
        return Ok((kill, term));
    }
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        children.push(Some(spawn(work)?));
    }
    for c in children.iter_mut().flatten() {
        go(c)?;
    }
    let picks = (2 * samples).min(n);
    let step = (n / picks.max(1)).max(1);
    for (k, i) in (0..n).step_by(step).take(picks).enumerate() {
        if let Some(mut c) = children[i].take() {
            one(&mut c, k)?;
        }
    }
    // Kill every child first, then reap: waiting for each in turn would wait
    // for every dying process to get the CPU among all those still spinning.
    let mut rest: Vec<Child> = children.into_iter().flatten().collect();
    for c in &mut rest {
        let _ = c.kill();
    }
    for mut c in rest {
        let _ = c.wait();
    }
    Ok((kill, term))
}

/// Trivial processes spawned and reaped per second, `threads` at a time.
/// Spawns and reaps `total` processes running `program args`, `threads` at
/// a time. The CPU time per task counts the parent's and the children's.
pub fn spawn_rate(
    program: &Path,
    args: &[&str],
    total: usize,
    threads: usize,
) -> anyhow::Result<crate::throughput::Rate> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let cpu0 = crate::stats::process_cpu() + crate::stats::children_cpu();
    let t0 = Instant::now();
    let per = total.div_ceil(threads.max(1));
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (program, args) = (program.to_path_buf(), args.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                for _ in 0..per {
                    let st = Command::new(&program)
                        .args(&args)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()?;
                    if !st.success() {
                        bail!("a trivial child failed: {st}");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a spawner thread panicked"))??;
    }
    let cpu = crate::stats::process_cpu() + crate::stats::children_cpu();
    Ok(crate::throughput::Rate::used(
        per * threads.max(1),
        t0,
        cpu.saturating_sub(cpu0),
    ))
}
