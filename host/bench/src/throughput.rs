//! Part 5: throughput of trivial tasks (`hello`): through the runtime's API
//! alone, through the task service in-process (durable: every task's
//! states and events committed to SQLite), end to end over HTTP, and the
//! baseline of a native process spawned and reaped per task.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;
use tokio::sync::Semaphore;
use wasmtask::model::TaskSubmit;
use wasmtask_runtime::{TaskEnd, TaskLimits, TaskRequest, WasiSpec};

use crate::Scale;
use crate::stats::count;

const IN_FLIGHT: usize = 256;

async fn runtime_api(n: usize) -> anyhow::Result<f64> {
    let rt = crate::bench_runtime(IN_FLIGHT + 16)?;
    let plugin = crate::load(&rt, "hello").await?;
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut set = tokio::task::JoinSet::new();
    let t0 = Instant::now();
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
    Ok(n as f64 / t0.elapsed().as_secs_f64())
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

async fn service(n: usize) -> anyhow::Result<(f64, Writes)> {
    let dir = tempfile::tempdir()?;
    let s = crate::http::start(dir.path(), 1000).await?;
    let submit: TaskSubmit =
        serde_json::from_value(json!({"plugin": "hello", "input": {"text": "bench"}}))?;
    // Warm the compile cache.
    s.svc.submit(&submit).await?;
    crate::http::wait_until_succeeded(&s, 1).await?;
    let before = s.svc.db().write_stats();
    let t0 = Instant::now();
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
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let writes = Writes::since(s.svc.db(), &before);
    s.stop().await;
    Ok((rate, writes))
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
    let native =
        tokio::task::spawn_blocking(move || crate::native::spawn_rate(procs, cores)).await??;
    let mut md = String::new();
    writeln!(md, "### 5. Throughput of trivial tasks\n")?;
    writeln!(
        md,
        "`hello` (parse a small JSON input, return a small JSON output). Runtime API: \
         `Runtime::spawn` + `wait`, {IN_FLIGHT} in flight, {} tasks. Task service: \
         `Service::submit` in-process, {IN_FLIGHT} in flight, until every task is committed \
         `succeeded`. HTTP: {threads} client threads with keep-alive `POST /v1/tasks`, {} tasks, \
         timed until the last `succeeded` is committed. Baseline: {procs} native processes \
         (this binary, exiting at once) spawned and reaped, {cores} at a time.\n",
        count(scale.trivial as f64),
        count(scale.trivial_http as f64),
    )?;
    writeln!(md, "| path | tasks/s | vs process per task |")?;
    writeln!(md, "|---|---:|---:|")?;
    for (label, rate) in [
        ("runtime API (in-process, no database)", api),
        ("task service in-process (durable in SQLite)", svc),
        ("**HTTP end to end (durable in SQLite)**", http),
        ("native process per task (spawn + wait)", native),
    ] {
        writeln!(
            md,
            "| {label} | {} | ×{:.1} |",
            count(rate),
            rate / native.max(1e-9)
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
