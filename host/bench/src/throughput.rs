//! Part 5: throughput of trivial tasks (`hello`): through the runtime's API
//! alone, through the task service in-process (durable: every task's
//! states and events committed to SQLite), end to end over HTTP, and the
//! baseline of a native process spawned and reaped per task.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio::sync::Semaphore;
use wasmtask::model::TaskSubmit;
use wasmtask_runtime::{TaskEnd, TaskLimits, TaskRequest, WasiSpec};

use crate::Scale;
use crate::stats::{count, dur, process_cpu};

const IN_FLIGHT: usize = 256;

/// Tasks per second, and the process's CPU time per task (every thread).
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_s: f64,
    pub cpu_per_task: Duration,
}

impl Rate {
    /// `n` tasks done since `t0`, with the process at `cpu0` CPU time then.
    pub fn since(n: usize, t0: Instant, cpu0: Duration) -> Rate {
        Rate::used(n, t0, process_cpu().saturating_sub(cpu0))
    }

    /// `n` tasks done since `t0`, having used `cpu` CPU time.
    pub fn used(n: usize, t0: Instant, cpu: Duration) -> Rate {
        Rate {
            per_s: n as f64 / t0.elapsed().as_secs_f64(),
            cpu_per_task: cpu / u32::try_from(n.max(1)).unwrap_or(u32::MAX),
        }
    }
}

async fn runtime_api(n: usize) -> anyhow::Result<Rate> {
    let rt = crate::bench_runtime(IN_FLIGHT + 16)?;
    let plugin = crate::load(&rt, "hello").await?;
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut set = tokio::task::JoinSet::new();
    let (t0, cpu0) = (Instant::now(), process_cpu());
    for _ in 0..n {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let task = rt.spawn(TaskRequest {
            plugin: plugin.clone(),
            name: "hello".into(),
            input: br#"{"text":"bench"}"#.to_vec(),
            wasi: WasiSpec::default(),
            limits: TaskLimits::default(),
            events: None,
        })?;
        set.spawn(async move {
            let end = task.wait().await.end;
            drop(permit);
            end
        });
        while let Some(r) = set.try_join_next() {
            check(r?)?;
        }
    }
    while let Some(r) = set.join_next().await {
        check(r?)?;
    }
    Ok(Rate::since(n, t0, cpu0))
}

fn check(end: TaskEnd) -> anyhow::Result<()> {
    match end {
        TaskEnd::Returned(_) => Ok(()),
        other => bail!("a trivial task ended {other:?}"),
    }
}

/// Group commit as the writer saw it during a measurement.
pub struct Writes {
    pub jobs: u64,
    pub batches: u64,
}

impl Writes {
    pub fn since(db: &wasmtask::db::Db, before: &wasmtask::db::WriteStats) -> Writes {
        let now = db.write_stats();
        Writes {
            jobs: now.jobs - before.jobs,
            batches: now.batches - before.batches,
        }
    }

    fn describe(&self, tasks: usize) -> String {
        format!(
            "{:.1} writes per task, {:.1} writes per transaction",
            self.jobs as f64 / tasks.max(1) as f64,
            self.jobs as f64 / self.batches.max(1) as f64
        )
    }
}

async fn service(n: usize) -> anyhow::Result<(Rate, Writes)> {
    let dir = tempfile::tempdir()?;
    let s = crate::http::start(dir.path(), 1000).await?;
    let submit: TaskSubmit =
        serde_json::from_value(json!({"plugin": "hello", "input": {"text": "bench"}}))?;
    // Warm the compile cache.
    s.svc.submit(&submit).await?;
    crate::http::wait_until_succeeded(&s, 1).await?;
    let before = s.svc.db().write_stats();
    let (t0, cpu0) = (Instant::now(), process_cpu());
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (svc, submit) = (s.svc.clone(), submit.clone());
        set.spawn(async move {
            let r = svc.submit(&submit).await.map(|_| ());
            drop(permit);
            r
        });
        while let Some(r) = set.try_join_next() {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    crate::http::wait_until_succeeded(&s, n + 1).await?;
    let rate = Rate::since(n, t0, cpu0);
    let writes = Writes::since(s.svc.db(), &before);
    s.stop().await;
    Ok((rate, writes))
}

/// The smallest native program to spawn as the lower bound of a process
/// per task: `true` from coreutils, if the machine has it.
fn smallest_program() -> Option<std::path::PathBuf> {
    ["/usr/bin/true", "/bin/true"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

pub async fn part5(scale: &Scale) -> anyhow::Result<String> {
    let threads = 32;
    let api = runtime_api(scale.trivial).await?;
    let svc_n = scale.trivial_http.max(scale.trivial / 3);
    let (svc, svc_writes) = service(svc_n).await?;
    let dir = tempfile::tempdir()?;
    let (http, http_writes) =
        crate::http::throughput(dir.path(), scale.trivial_http, threads).await?;
    let procs = scale.processes;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let exe = std::env::current_exe()?;
    let exe_mib = std::fs::metadata(&exe)?.len() as f64 / (1 << 20) as f64;
    let native = tokio::task::spawn_blocking(move || {
        crate::native::spawn_rate(&exe, &["--child", "exit"], procs, cores)
    })
    .await??;
    let smallest = match smallest_program() {
        Some(program) => Some(
            tokio::task::spawn_blocking(move || {
                crate::native::spawn_rate(&program, &[], procs, cores)
            })
            .await??,
        ),
        None => None,
    };
    let mut md = String::new();
    writeln!(md, "### 5. Throughput of trivial tasks\n")?;
    writeln!(
        md,
        "`hello` (parse a small JSON input, return a small JSON output). Runtime API: \
         `Runtime::spawn` + `wait`, {IN_FLIGHT} in flight, {} tasks. Task service: \
         `Service::submit` in-process, {IN_FLIGHT} in flight, {} tasks, until every task is \
         committed `succeeded`. HTTP: {threads} client threads with keep-alive `POST /v1/tasks`, \
         {} tasks, timed until the last `succeeded` is committed (the clients run in this \
         process, so their CPU time is counted). Baselines: {procs} native processes spawned \
         and reaped, {cores} at a time: this bench binary ({exe_mib:.0} MiB, exiting at once) \
         and `true` (the smallest program there is). CPU per task: user + system time of the \
         whole process (and of the children, for processes) during the measurement, divided \
         by the tasks.\n",
        count(scale.trivial as f64),
        count(svc_n as f64),
        count(scale.trivial_http as f64),
    )?;
    writeln!(
        md,
        "| path | tasks/s | CPU per task | vs the bench binary per task | vs `true` per task |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    let mut rows = vec![
        ("runtime API (in-process, no database)", api),
        ("task service in-process (durable in SQLite)", svc),
        ("**HTTP end to end (durable in SQLite)**", http),
        ("native process per task: the bench binary", native),
    ];
    if let Some(smallest) = smallest {
        rows.push(("native process per task: `true`", smallest));
    }
    for (label, rate) in rows {
        let vs_smallest = smallest.map_or("—".to_owned(), |s| {
            format!("×{:.1}", rate.per_s / s.per_s.max(1e-9))
        });
        writeln!(
            md,
            "| {label} | {} | {} | ×{:.1} | {vs_smallest} |",
            count(rate.per_s),
            dur(rate.cpu_per_task),
            rate.per_s / native.per_s.max(1e-9)
        )?;
    }
    writeln!(
        md,
        "\nGroup commit (SQLite writer): task service {}; HTTP {}.",
        svc_writes.describe(svc_n),
        http_writes.describe(scale.trivial_http)
    )?;
    Ok(md)
}
