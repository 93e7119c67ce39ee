//! `wasmtask-bench`: wasmtask's performance claims, measured side by side
//! with their baselines in one run, written as markdown tables into
//! `BENCHMARKS.md` (between the `bench:begin`/`bench:end` markers, so the
//! analysis around them stays).
//!
//! ```text
//! cargo run --release -p wasmtask-bench            # full run, ~10 minutes on 2 cores
//! cargo run --release -p wasmtask-bench -- --quick # small counts (what the test suite runs)
//! ```
//!
//! Parts (see each module's doc for the method):
//! 1. cancel → guest stopped, beside a native process stopped by a signal
//!    (`cancel`, `native`);
//! 2. HTTP cancel → terminal state committed, and an unrelated request,
//!    under load (`http`);
//! 3. interruption overhead on CPU-bound code (`overhead`);
//! 4. start-up: instantiation and compile time (`startup`);
//! 5. throughput of trivial tasks (`throughput`, `http`), beside a
//!    process per task;
//! 6. memory per parked task (`memory`).
//!
//! Nothing here asserts a time: the quick mode only proves every part runs.

mod cancel;
mod http;
mod machine;
mod memory;
mod native;
mod overhead;
mod startup;
mod stats;
mod throughput;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use wasmtask_runtime::{Plugin, Runtime};

#[derive(Debug, Parser)]
#[command(
    name = "wasmtask-bench",
    about = "wasmtask's benchmarks, beside their baselines"
)]
struct Args {
    /// Small counts: every part runs in seconds (numbers are not meaningful).
    #[arg(long)]
    quick: bool,
    /// The markdown file to write the results into (between the markers).
    /// Default: BENCHMARKS.md at the top of the checkout; `-` for stdout only.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these parts (1–6), e.g. `--only 1,3`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Part 1's task counts instead of the mode's (e.g. `--counts 1,100`).
    #[arg(long, value_delimiter = ',')]
    counts: Vec<usize>,
    /// Part 1's samples per row instead of the mode's.
    #[arg(long)]
    samples: Option<usize>,
    /// Part 1: skip the native baseline.
    #[arg(long)]
    no_native: bool,
    /// Internal: run as a baseline child process.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: measure part 6 in this (fresh) process and print only its
    /// section.
    #[arg(long, hide = true)]
    part6_alone: bool,
}

/// Counts for one run.
pub struct Scale {
    pub quick: bool,
    /// Tasks running at once in part 1.
    pub counts: Vec<usize>,
    pub samples_one: usize,
    pub samples_many: usize,
    /// Part 2: tasks running, samples.
    pub http_running: usize,
    pub http_samples: usize,
    /// Part 2: how long the machine's stalls are probed.
    pub stall_probe: Duration,
    /// Part 3: loop iterations, fib argument, rounds of mixed work,
    /// repetitions.
    pub loops: u64,
    pub fib: u64,
    pub mixed: u64,
    pub reps: usize,
    /// Part 4: instantiations.
    pub instantiations: usize,
    /// Part 5: trivial tasks in-process, over HTTP, processes.
    pub trivial: usize,
    pub trivial_http: usize,
    pub processes: usize,
    /// Part 6: parked tasks.
    pub parked: Vec<usize>,
    /// Part 1: measure the native baseline too.
    pub native: bool,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                quick,
                counts: vec![1, 10],
                samples_one: 5,
                samples_many: 5,
                http_running: 20,
                http_samples: 5,
                stall_probe: Duration::from_millis(200),
                loops: 1_000_000,
                fib: 20,
                mixed: 5,
                reps: 1,
                instantiations: 20,
                trivial: 200,
                trivial_http: 100,
                processes: 20,
                parked: vec![10],
                native: true,
            }
        } else {
            Scale {
                quick,
                counts: vec![1, 100, 1000],
                samples_one: 1000,
                samples_many: 1000,
                http_running: 1000,
                http_samples: 1000,
                stall_probe: Duration::from_secs(5),
                loops: 400_000_000,
                fib: 38,
                mixed: MIXED_ROUNDS,
                reps: 7,
                instantiations: 5000,
                trivial: 30_000,
                trivial_http: 10_000,
                processes: 2000,
                parked: vec![1000, 10_000],
                native: true,
            }
        }
    }
}

/// Compiles a built-in plugin into `rt` (off the async runtime).
pub async fn load(rt: &Runtime, name: &str) -> anyhow::Result<Plugin> {
    let p = wasmtask::builtin::find(name).with_context(|| format!("no built-in plugin {name}"))?;
    Ok(rt.load_async(p.bytes.to_vec()).await?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(mode) = &args.child {
        native::child(mode);
    }
    raise_fd_limit();
    let runtime = match wasmtask::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wasmtask-bench: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The measuring code runs on a worker, like an API handler.
    let result = runtime.block_on(async move {
        tokio::spawn(run(args))
            .await
            .map_err(|e| anyhow::anyhow!("the bench panicked: {e}"))?
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmtask-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn raise_fd_limit() {
    // A thousand child processes hold two pipes each.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut scale = Scale::new(args.quick);
    if !args.counts.is_empty() {
        scale.counts = args.counts.clone();
    }
    if let Some(n) = args.samples {
        scale.samples_one = n;
        scale.samples_many = n;
    }
    scale.native = !args.no_native;
    if args.part6_alone {
        print!("{}", memory::part6(&scale).await?);
        return Ok(());
    }
    let want = |part: u8| args.only.is_empty() || args.only.contains(&part);
    let started = Instant::now();
    let mut md = header(&args)?;
    let parts: [(u8, &str); 6] = [
        (1, "cancel → guest stopped"),
        (2, "HTTP cancel under load"),
        (3, "interruption overhead"),
        (4, "start-up"),
        (5, "throughput"),
        (6, "memory per parked task"),
    ];
    for (n, name) in parts {
        if !want(n) {
            continue;
        }
        eprintln!("wasmtask-bench: part {n}: {name} …");
        let t0 = Instant::now();
        let section = match n {
            1 => part1(&scale).await,
            2 => part2(&scale).await,
            3 => part3(&scale).await,
            4 => startup::part4(&scale).await,
            5 => throughput::part5(&scale).await,
            _ => part6_in_fresh_process(args.quick).await,
        }
        .with_context(|| format!("part {n} ({name})"))?;
        eprintln!(
            "wasmtask-bench: part {n} done in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        println!("{section}");
        md.push_str(&section);
        md.push('\n');
    }
    let _ = writeln!(md, "_Whole run: {:.0} s._", started.elapsed().as_secs_f64());
    write_out(&args, &md)
}

/// Part 6 in a child process of this binary: a parked task's cost is read
/// from the resident set, and in this process the heap freed by parts 1–5
/// would be reused by the parked tasks without growing it (52 KiB per task
/// measured that way, against 61 KiB in a fresh process).
async fn part6_in_fresh_process(quick: bool) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--part6-alone");
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "the part 6 process failed: {}",
        out.status
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The machine, versions, mode and command of this run.
fn header(args: &Args) -> anyhow::Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".to_owned());
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap_or_default();
    let version_of = |krate: &str| -> String {
        let needle = format!("name = \"{krate}\"\nversion = \"");
        lock.find(&needle)
            .map(|i| &lock[i + needle.len()..])
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("unknown")
            .to_owned()
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    writeln!(md, "## Results\n")?;
    let flags: Vec<String> = std::env::args().skip(1).collect();
    writeln!(
        md,
        "Measured {} with `cargo run --release -p wasmtask-bench{}`.\n",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        if flags.is_empty() {
            String::new()
        } else {
            format!(" -- {}", flags.join(" "))
        }
    )?;
    writeln!(md, "| | |\n|---|---|")?;
    writeln!(md, "| machine | {model}, {cores} cores, {mem} |")?;
    writeln!(md, "| kernel | {} |", sh("uname", &["-srm"]))?;
    writeln!(md, "| rustc | {} |", sh("rustc", &["--version"]))?;
    writeln!(
        md,
        "| wasmtime / wasmtime-wasi | {} / {} |",
        version_of("wasmtime"),
        version_of("wasmtime-wasi")
    )?;
    writeln!(
        md,
        "| tokio / rusqlite / axum | {} / {} / {} |",
        version_of("tokio"),
        version_of("rusqlite"),
        version_of("axum")
    )?;
    writeln!(
        md,
        "| build | {} |",
        if cfg!(debug_assertions) {
            "debug (numbers not representative)"
        } else {
            "release"
        }
    )?;
    // The class the runtime's epoch ticker got here (it depends on the
    // process's privileges; see `Runtime::ticker_realtime`).
    let ticker = wasmtask_runtime::Runtime::new(wasmtask_runtime::RuntimeConfig {
        pooling: false,
        ..wasmtask_runtime::RuntimeConfig::default()
    })?
    .ticker_realtime();
    writeln!(
        md,
        "| epoch ticker | {} |",
        if ticker {
            "real-time (`SCHED_FIFO`)"
        } else {
            "normal priority (real-time not permitted)"
        }
    )?;
    writeln!(
        md,
        "| RUST_LIB_BACKTRACE | {} |\n",
        std::env::var("RUST_LIB_BACKTRACE").unwrap_or_else(|_| "unset".into())
    )?;
    if args.quick {
        writeln!(
            md,
            "**Quick mode: tiny counts, the numbers mean nothing.**\n"
        )?;
    }
    Ok(md)
}

const BEGIN: &str = "<!-- bench:begin (written by wasmtask-bench; edits here are overwritten) -->";
const END: &str = "<!-- bench:end -->";

fn write_out(args: &Args, md: &str) -> anyhow::Result<()> {
    let path = match &args.out {
        Some(p) if p.as_os_str() == "-" => return Ok(()),
        Some(p) => p.clone(),
        None => workspace_root().join("BENCHMARKS.md"),
    };
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{BEGIN}\n{md}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ if old.is_empty() => format!("# Benchmarks\n\n{block}\n"),
        _ => format!("{}\n{block}\n", old.trim_end()),
    };
    std::fs::write(&path, new).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wasmtask-bench: wrote {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------
// Parts 1–3 (their measuring code lives in the modules)
// ---------------------------------------------------------------------

fn bench_runtime(max_concurrent: usize) -> anyhow::Result<Runtime> {
    Runtime::new(wasmtask_runtime::RuntimeConfig {
        max_concurrent,
        ..wasmtask_runtime::RuntimeConfig::default()
    })
}

/// Most native stops measured per row (in the `n > 1` rows each ends one of
/// the `n` processes, which are not replaced, so at most `n` in all).
const NATIVE_SAMPLES: usize = 200;

/// Part 3's rounds of mixed work in a full run (about a fifth of a second
/// natively on the project's machine).
const MIXED_ROUNDS: u64 = 1000;

async fn part1(scale: &Scale) -> anyhow::Result<String> {
    use native::Work;
    use stats::{dur, ratio};
    let max = scale.counts.iter().copied().max().unwrap_or(1);
    let rt = bench_runtime(max + 64)?;
    let guests = cancel::Guests::load(&rt).await?;
    let mut md = String::new();
    writeln!(md, "### 1. Cancel → guest stopped\n")?;
    writeln!(
        md,
        "Each row: that many guests of the kind run at once (sleeping and reading rows also \
         run {} spinning guests, so every core is busy); guests are canceled one at a time with \
         no grace, and each canceled guest is replaced by a fresh one, so that many keep \
         running throughout. **wasmtask**: from `CancelHandle::cancel` to the task's `wait()` having \
         returned in its own tokio task (the runtime's own figure, request → store dropped, \
         beside it). **Native**: the same work as one process per task (a busy loop, a \
         `nanosleep`, a blocking `read` of a pipe), from `kill(2)` to `waitpid(2)` returning; \
         the SIGTERM rows use a program that handles SIGTERM by exiting. Ratio: native SIGKILL \
         p99 ÷ wasmtask p99. Over {}: wasmtask's samples longer than DESIGN's p99 bound.\n",
        2 * rt.cpu_slots(),
        dur(cancel::TARGET)
    )?;
    writeln!(
        md,
        "| guest | running | samples (native) | wasmtask p50 / p99 / max | runtime's own p50 / p99 | native SIGKILL p50 / p99 | native SIGTERM p50 / p99 | ratio (p99) | over {} |",
        dur(cancel::TARGET)
    )?;
    writeln!(md, "|---|---:|---:|---|---|---|---|---:|---:|")?;
    for work in [Work::Spin, Work::Sleep, Work::Read] {
        for &n in &scale.counts {
            let samples = if n == 1 {
                scale.samples_one
            } else {
                scale.samples_many
            };
            let (outer, inner) = cancel::measure(&rt, &guests, work, n, samples).await?;
            let late = stats::over(&outer, cancel::TARGET);
            let (outer, inner) = (stats::summarize(outer), stats::summarize(inner));
            // A signalled process needs CPU time to die: among a thousand
            // spinning processes that takes seconds, so fewer samples there.
            let native_samples = match (scale.native, work, n) {
                (false, _, _) => 0,
                (_, Work::Spin, 1000..) => samples.min(20),
                _ => samples.min(NATIVE_SAMPLES),
            };
            let (kill, term) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let (kill, term) = native::stop_latency(work, n, native_samples)?;
                Ok((stats::summarize(kill), stats::summarize(term)))
            })
            .await??;
            let kind = match work {
                Work::Spin => "spinning",
                Work::Sleep => "WASI sleep",
                Work::Read => "blocked in a stdin read",
            };
            writeln!(
                md,
                "| {kind} | {n} | {} ({}) | {} / {} / {} | {} / {} | {} / {} | {} / {} | {} | {late} |",
                outer.n,
                kill.n,
                dur(outer.p50),
                dur(outer.p99),
                dur(outer.max),
                dur(inner.p50),
                dur(inner.p99),
                dur(kill.p50),
                dur(kill.p99),
                dur(term.p50),
                dur(term.p99),
                ratio(kill.p99, outer.p99),
            )?;
            eprintln!(
                "  {kind} × {n}: p99 {} (native SIGKILL p99 {})",
                dur(outer.p99),
                dur(kill.p99)
            );
        }
    }
    Ok(md)
}

async fn part2(scale: &Scale) -> anyhow::Result<String> {
    use stats::{dur, summarize};
    // The machine first, with nothing else of this process running.
    let probe_for = scale.stall_probe;
    let stalls = tokio::task::spawn_blocking(move || machine::probe(probe_for)).await??;
    let dir = tempfile::tempdir()?;
    let load = http::cancel_under_load(dir.path(), scale.http_running, scale.http_samples).await?;
    const TARGET: Duration = Duration::from_millis(2);
    let over = |v: &[Duration]| stats::over(v, TARGET);
    let (chain, gets) = (load.chain, load.gets);
    let cancels: Vec<Duration> = load.cancels.iter().map(|(d, _)| *d).collect();
    let cancels_over = over(&cancels);
    let slow_in_pause = load
        .cancels
        .iter()
        .filter(|(d, paused)| *paused && *d > TARGET)
        .count();
    let in_pause = load.cancels.iter().filter(|(_, paused)| *paused).count();
    let chains = chain.map(|c| (over(&c), summarize(c)));
    let (cancels, gets) = (summarize(cancels), summarize(gets));
    let mut md = String::new();
    writeln!(
        md,
        "### 2. HTTP cancel → terminal state committed, under load\n"
    )?;
    writeln!(
        md,
        "{} spinning tasks submitted over HTTP and running (every core busy with guests), on \
         the real router and task service with SQLite on disk. One at a time, a task is \
         canceled with `POST /v1/tasks/{{id}}/cancel {{\"grace_ms\":0,\"wait_ms\":30000}}`: the \
         200 answer is sent once `canceled` and the cancel record are committed, so the round \
         trip bounds cancel → committed. Each canceled task is replaced by a fresh one, running \
         before the next sample, so that many run throughout. Each cancel is followed by an \
         unrelated request (`GET` of another running task's record). Client: one keep-alive \
         connection from a thread outside the server's runtime. Baseline, under the same load \
         right after: a native chain of {} plain threads handing a token on, as many hand-offs \
         as on a cancel's critical path (client → API worker → SQLite writer → API worker → \
         writer → API worker → client), the same number of times with the same pauses; bare, \
         then with some CPU work at each hand-off so that its median is near a cancel's.\n",
        scale.http_running,
        machine::CANCEL_HAND_OFFS
    )?;
    writeln!(md, "| request | samples | p50 | p99 | max | over 2 ms |")?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    writeln!(
        md,
        "| cancel → committed (HTTP round trip) | {} | {} | {} | {} | {} |",
        cancels.n,
        dur(cancels.p50),
        dur(cancels.p99),
        dur(cancels.max),
        cancels_over
    )?;
    writeln!(
        md,
        "| unrelated `GET /v1/tasks/{{id}}` | {} | {} | {} | {} | |",
        gets.n,
        dur(gets.p50),
        dur(gets.p99),
        dur(gets.max)
    )?;
    for ((chain_over, chain), work) in chains.iter().zip([Duration::ZERO, machine::HAND_OFF_WORK]) {
        let label = if work.is_zero() {
            String::new()
        } else {
            format!(", {} of CPU work each", dur(work))
        };
        writeln!(
            md,
            "| baseline: native chain of {} thread hand-offs{label} | {} | {} | {} | {} | {} |",
            machine::CANCEL_HAND_OFFS,
            chain.n,
            dur(chain.p50),
            dur(chain.p99),
            dur(chain.max),
            chain_over
        )?;
    }
    let ms = Duration::from_millis(1);
    writeln!(
        md,
        "\n**The machine's own stalls**, measured just before in the same run: one thread \
         pinned to each of the {} CPUs spinning on the clock for {}, nothing else of this \
         process running. Gaps between two clock reads (the CPU taken away by the hypervisor, \
         an interrupt or a kernel thread): **{:.1} gaps of 1 ms or more per CPU and second**, \
         {:.2}% of each CPU's time lost in them; longest {}; counting gaps from {} up: \
         {:.1} per CPU and second, {:.2}% of its time. A cancel's round trip passes \
         through several threads on both CPUs; a gap landing on one of them adds its length.\n",
        stalls.cpus,
        dur(stalls.took),
        stalls.rate_over(ms),
        stalls.lost_over(ms) * 100.0,
        dur(stalls.longest()),
        dur(machine::FLOOR),
        stalls.rate_over(machine::FLOOR),
        stalls.lost_over(machine::FLOOR) * 100.0,
    )?;
    writeln!(
        md,
        "**The SQLite writer's pauses** during the cancels: the checkpointer held it between \
         two transactions {} times to start the WAL over (the longest since the server \
         started: {}); the job in hand waits meanwhile. {} cancels were in flight during one, {} of them among the {} over 2 ms.\n",
        load.pauses,
        dur(load.paused_max),
        in_pause,
        slow_in_pause,
        cancels_over
    )?;
    Ok(md)
}

async fn part3(scale: &Scale) -> anyhow::Result<String> {
    use stats::dur;
    let bytes = wasmtask::builtin::find("cpu-burn")
        .context("no cpu-burn plugin")?
        .bytes;
    let plain = overhead::Own::new(bytes, false, false)?;
    let epochs = overhead::Own::new(bytes, true, false)?;
    let plain_inlined = overhead::Own::new(bytes, false, true)?;
    let rt = bench_runtime(16)?;
    let plugin = rt.load_async(bytes.to_vec()).await?;
    let rt_inlined = Runtime::new(wasmtask_runtime::RuntimeConfig {
        max_concurrent: 16,
        compiler_inlining: true,
        ..wasmtask_runtime::RuntimeConfig::default()
    })?;
    let plugin_inlined = rt_inlined.load_async(bytes.to_vec()).await?;
    let mut md = String::new();
    writeln!(md, "### 3. Interruption overhead on CPU-bound guest code\n")?;
    writeln!(
        md,
        "`cpu-burn` (in `plugins/`): **loops** = {} iterations of a xorshift loop (no calls); \
         **calls** = fib({}) by naive recursion (almost all function entries); **mixed** = {} \
         rounds of formatting 1,000 pseudo-random words, sorting, deduplicating and counting \
         them in a `BTreeMap` (allocation, formatting, comparisons: calls and loops as ordinary \
         plugin code has them). One guest at a time, {} rounds, each round running every \
         variant once in turn (so a burst of noise from the shared machine does not fall on one \
         variant's runs). Shown: the fastest run \
         (the cost without interference), the median in brackets; ratios are of the fastest \
         runs, to the uninterrupted wasm run. Every run's checksum equals the native one.\n",
        stats::count(scale.loops as f64),
        scale.fib,
        stats::count(scale.mixed as f64),
        scale.reps
    )?;
    writeln!(
        md,
        "| variant | loops | ratio | calls | ratio | mixed | ratio |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    /// Part 3's rows; the discriminant indexes `times`.
    #[derive(Clone, Copy)]
    enum Variant {
        Native,
        Plain,
        Epochs,
        Shipped,
        Fuel,
        PlainInlined,
        ShippedInlined,
    }
    let variants = [
        ("native Rust (same source, opt-level 3)", Variant::Native),
        ("wasm, no interruption", Variant::Plain),
        (
            "wasm, epoch interruption (2 ms tick, yield per tick)",
            Variant::Epochs,
        ),
        (
            "**wasmtask as shipped** (epochs + guest pool)",
            Variant::Shipped,
        ),
        ("wasmtask with fuel metering (+ epochs)", Variant::Fuel),
        (
            "wasm, no interruption, compiler inlining",
            Variant::PlainInlined,
        ),
        (
            "wasmtask with `compiler_inlining = true` (epochs + guest pool + inlining)",
            Variant::ShippedInlined,
        ),
    ];
    let mut expect = Vec::new();
    for what in overhead::WORKLOADS {
        let n = match what {
            "loops" => scale.loops,
            "calls" => scale.fib,
            "mixed" => scale.mixed,
            other => anyhow::bail!("part 3 has no size for workload {other}"),
        };
        expect.push((what, n, overhead::native(what, n)?.1));
    }
    // times[variant][workload]
    let mut times = vec![vec![Vec::new(); expect.len()]; variants.len()];
    for _ in 0..scale.reps {
        for (label, variant) in &variants {
            for (w, (what, n, expect)) in expect.iter().enumerate() {
                let (t, sum) = match variant {
                    Variant::Native => overhead::native(what, *n)?,
                    Variant::Plain => plain.run(what, *n).await?,
                    Variant::Epochs => epochs.run(what, *n).await?,
                    Variant::Shipped => overhead::shipped(&rt, &plugin, what, *n, false).await?,
                    Variant::Fuel => overhead::shipped(&rt, &plugin, what, *n, true).await?,
                    Variant::PlainInlined => plain_inlined.run(what, *n).await?,
                    Variant::ShippedInlined => {
                        overhead::shipped(&rt_inlined, &plugin_inlined, what, *n, false).await?
                    }
                };
                anyhow::ensure!(
                    sum == *expect,
                    "{label} {what}: checksum {sum}, native {expect}"
                );
                times[*variant as usize][w].push(t);
            }
        }
    }
    let fastest = |v: Variant, w: usize| {
        times[v as usize][w]
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
    };
    for &(label, v) in &variants {
        let cell = |w: usize| {
            format!(
                "{} ({})",
                dur(fastest(v, w)),
                dur(overhead::median(times[v as usize][w].clone()))
            )
        };
        let ratio = |w: usize| {
            let b = fastest(Variant::Plain, w).as_secs_f64();
            if b == 0.0 {
                "–".to_owned()
            } else {
                format!("{:.3}", fastest(v, w).as_secs_f64() / b)
            }
        };
        let cells: Vec<String> = (0..expect.len())
            .map(|w| format!("{} | {}", cell(w), ratio(w)))
            .collect();
        writeln!(md, "| {label} | {} |", cells.join(" | "))?;
    }
    // What epochs cost when both sides are compiled with inlining.
    let with_inlining: Vec<String> = expect
        .iter()
        .enumerate()
        .map(|(w, (what, _, _))| {
            let b = fastest(Variant::PlainInlined, w).as_secs_f64();
            if b == 0.0 {
                format!("{what} –")
            } else {
                format!(
                    "{what} {:+.1}%",
                    (fastest(Variant::ShippedInlined, w).as_secs_f64() / b - 1.0) * 100.0
                )
            }
        })
        .collect();
    writeln!(
        md,
        "\nWith the compiler's inlining on both sides (opt-in, `runtime.compiler_inlining`), \
         epochs as shipped cost (fastest runs, to the inlined uninterrupted run): {}.\n",
        with_inlining.join(", ")
    )?;
    Ok(md)
}
