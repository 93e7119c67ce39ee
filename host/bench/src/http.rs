//! Parts 2 and 5b: the HTTP API as operators use it — the real router and
//! task service on a loopback socket, on the same tokio runtime as the
//! guests (as `wasmtask serve` runs it), with its SQLite database in a
//! temporary directory. The client is a blocking HTTP client on threads of
//! its own (as the CLI is), with keep-alive connections.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use ureq::Agent;
use wasmtask::api::{self, ApiConfig};
use wasmtask::db::Db;
use wasmtask::service::{Service, ServiceConfig};
use wasmtask_runtime::{Runtime, RuntimeConfig};

use crate::stats::{Summary, summarize};

pub struct Server {
    pub base: String,
    pub svc: Service,
}

/// Starts the service and the router on 127.0.0.1 (a free port).
pub async fn start(dir: &Path, max_running: usize) -> anyhow::Result<Server> {
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(dir.join("cache")),
        max_concurrent: max_running,
        ..RuntimeConfig::default()
    })?;
    let db = Db::open(&dir.join("wasmtask.db")).await?;
    let svc = Service::start(
        rt,
        db,
        ServiceConfig {
            allowed_dirs: Vec::new(),
            max_running,
            plugin_dir: dir.join("plugins"),
            workspace_dir: dir.join("workspaces"),
            builtin_fixtures: true,
        },
    )
    .await?;
    let router = api::router(
        svc.clone(),
        ApiConfig {
            token: None,
            max_body_bytes: api::DEFAULT_MAX_BODY_BYTES,
            max_plugin_bytes: api::DEFAULT_MAX_PLUGIN_BYTES,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(api::no_delay(listener), router).await;
    });
    Ok(Server { base, svc })
}

impl Server {
    /// Cancels whatever still runs and waits for it to be recorded.
    pub async fn stop(&self) {
        self.svc.stop_accepting();
        self.svc.drain(Duration::ZERO, Duration::ZERO).await;
    }
}

pub fn agent() -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn read(resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let mut resp = resp;
    let text = resp.body_mut().read_to_string()?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

pub fn post(agent: &Agent, url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let resp = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(serde_json::to_vec(body)?.as_slice())
        .with_context(|| format!("POST {url}"))?;
    read(resp)
}

pub fn get(agent: &Agent, url: &str) -> anyhow::Result<(u16, Value)> {
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    read(resp)
}

/// Runs blocking client code on a thread of its own.
pub async fn client<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.context("the client thread died")?
}

/// Submits `n` tasks of `body` over HTTP and returns their ids.
pub async fn submit_many(base: &str, body: Value, n: usize) -> anyhow::Result<Vec<String>> {
    let url = format!("{base}/v1/tasks");
    client(move || {
        let a = agent();
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let (status, v) = post(&a, &url, &body)?;
            if status != 201 {
                bail!("submit answered {status}: {v}");
            }
            ids.push(v["id"].as_str().context("no id")?.to_owned());
        }
        Ok(ids)
    })
    .await
}

/// Waits until `want` tasks are `state` (polling the API).
pub async fn wait_count(
    base: &str,
    state: &str,
    want: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let url = format!("{base}/v1/tasks?state={state}&limit=1000");
    loop {
        let u = url.clone();
        let mut total = 0;
        let mut cursor: Option<String> = None;
        loop {
            let page = match &cursor {
                Some(c) => format!("{u}&cursor={c}"),
                None => u.clone(),
            };
            let (status, v) = client(move || get(&agent(), &page)).await?;
            if status != 200 {
                bail!("listing answered {status}: {v}");
            }
            total += v["tasks"].as_array().map_or(0, Vec::len);
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        if total >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {total} of {want} tasks became {state}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Part 2: with `n` spinning tasks running (every core busy), cancel
/// `samples` of them one at a time over HTTP (`grace_ms: 0`, `wait_ms`, so
/// the answer comes once `canceled` is committed), each followed by an
/// unrelated request (another task's record).
pub async fn cancel_under_load(
    dir: &Path,
    n: usize,
    samples: usize,
) -> anyhow::Result<(Summary, Summary)> {
    let s = start(dir, n).await?;
    let ids = submit_many(&s.base, json!({"plugin": "spin-loop"}), n).await?;
    wait_count(&s.base, "running", n, Duration::from_secs(300)).await?;
    let base = s.base.clone();
    let samples = samples.min(n / 2);
    let (cancels, gets) = client(move || {
        let a = agent();
        let (mut cancels, mut gets) = (Vec::new(), Vec::new());
        for i in 0..samples {
            let url = format!("{base}/v1/tasks/{}/cancel", ids[i]);
            let t0 = Instant::now();
            let (status, v) = post(&a, &url, &json!({"grace_ms": 0, "wait_ms": 30_000}))?;
            cancels.push(t0.elapsed());
            if status != 200 || v["task"]["state"] != "canceled" {
                bail!("cancel answered {status}: {v}");
            }
            std::thread::sleep(crate::cancel::jitter(i));
            let url = format!("{base}/v1/tasks/{}", ids[n - 1 - i]);
            let t0 = Instant::now();
            let (status, v) = get(&a, &url)?;
            gets.push(t0.elapsed());
            if status != 200 || v["state"] != "running" {
                bail!("GET answered {status}: {v}");
            }
            std::thread::sleep(crate::cancel::jitter(i + 7));
        }
        Ok((cancels, gets))
    })
    .await?;
    s.stop().await;
    Ok((summarize(cancels), summarize(gets)))
}

/// Part 5b: `total` trivial tasks submitted over HTTP by `threads` clients
/// at once; tasks/s from the first submit to the last terminal state
/// committed (succeeded, as the final check asserts).
pub async fn throughput(
    dir: &Path,
    total: usize,
    threads: usize,
) -> anyhow::Result<(crate::throughput::Rate, crate::throughput::Writes)> {
    let s = start(dir, 1000).await?;
    // Warm the compile cache, so compilation is not part of the figure.
    let warm = submit_many(&s.base, hello(), 1).await?;
    wait_count(&s.base, "succeeded", warm.len(), Duration::from_secs(120)).await?;
    let before = s.svc.db().write_stats();
    let (t0, cpu0) = (Instant::now(), crate::stats::process_cpu());
    let per = total / threads.max(1);
    // All clients at once: each is a thread of its own, started here (an
    // un-awaited `submit_many` would not start until awaited).
    let mut joins = Vec::new();
    for _ in 0..threads.max(1) {
        let base = s.base.clone();
        joins.push(tokio::spawn(async move {
            submit_many(&base, hello(), per).await
        }));
    }
    for j in joins {
        j.await??;
    }
    let want = per * threads.max(1) + warm.len();
    wait_until_succeeded(&s, want).await?;
    let rate = crate::throughput::Rate::since(want - warm.len(), t0, cpu0);
    let writes = crate::throughput::Writes::since(s.svc.db(), &before);
    s.stop().await;
    Ok((rate, writes))
}

fn hello() -> Value {
    json!({"plugin": "hello", "input": {"text": "bench"}})
}

/// Waits until the database holds `want` succeeded tasks and nothing else
/// unfinished or failed (counted in-process, not over HTTP, to keep the
/// polling off the measured path).
pub async fn wait_until_succeeded(s: &Server, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let counts = s.svc.db().count_tasks_by_state().await?;
        let succeeded = counts
            .iter()
            .find(|(st, _)| st.as_str() == "succeeded")
            .map_or(0, |(_, c)| *c as usize);
        let total: u64 = counts.iter().map(|(_, c)| *c).sum();
        if succeeded >= want {
            if total as usize != succeeded {
                bail!("some trivial tasks did not succeed: {counts:?}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {succeeded} of {want} trivial tasks succeeded: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
