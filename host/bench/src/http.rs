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
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await.context("the client thread died")?
}

/// Submits `n` tasks of `body` over HTTP and returns their ids.
///
/// One keep-alive connection, one request at a time, with a minimal
/// HTTP/1.1 client ([`Raw`]): a load generator sharing the server's two
/// cores should spend as little of them as it can.
pub async fn submit_many(base: &str, body: Value, n: usize) -> anyhow::Result<Vec<String>> {
    let base = base.to_owned();
    client(move || {
        let mut conn = Raw::connect(&base)?;
        let body = serde_json::to_vec(&body)?;
        (0..n).map(|_| conn.submit(&body)).collect()
    })
    .await
}

/// A minimal blocking HTTP/1.1 client on one keep-alive connection: sends a
/// request, reads the status line, the headers and a `Content-Length` body.
pub struct Raw {
    host: String,
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    request: Vec<u8>,
}

impl Raw {
    /// Connects to `base` (`http://host:port`).
    pub fn connect(base: &str) -> anyhow::Result<Raw> {
        let host = base
            .strip_prefix("http://")
            .context("only http:// addresses")?
            .trim_end_matches('/')
            .to_owned();
        let stream =
            std::net::TcpStream::connect(&host).with_context(|| format!("connect {host}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Raw {
            host,
            reader: std::io::BufReader::new(stream.try_clone()?),
            writer: stream,
            request: Vec::new(),
        })
    }

    /// `POST path` with a JSON `body`; returns the status and the body.
    pub fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.request("POST", path, Some(body))
    }

    /// `POST /v1/tasks` with `body`; returns the new task's id.
    pub fn submit(&mut self, body: &[u8]) -> anyhow::Result<String> {
        let (status, answer) = self.post("/v1/tasks", body)?;
        if status != 201 {
            bail!(
                "submit answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        #[derive(serde::Deserialize)]
        struct Created {
            id: String,
        }
        let created: Created =
            serde_json::from_slice(&answer).context("a submit answer without an id")?;
        Ok(created.id)
    }

    /// Polls `GET /v1/tasks/{id}` until the task is `running`.
    pub fn wait_running(&mut self, id: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let path = format!("/v1/tasks/{id}");
        loop {
            let (status, answer) = self.get(&path)?;
            let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            if status != 200 {
                bail!("GET answered {status}: {v}");
            }
            match v["state"].as_str() {
                Some("running") => return Ok(()),
                Some("queued") if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => bail!("task {id} did not start: {v}"),
            }
        }
    }

    /// `GET path`; returns the status and the body.
    pub fn get(&mut self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        self.request("GET", path, None)
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        use std::io::{BufRead, Read, Write};
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n",
            self.host
        )?;
        if let Some(body) = body {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.request.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            self.request.extend_from_slice(body);
        }
        self.writer.write_all(&self.request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the server closed the connection");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>()?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("a chunked answer (this client reads Content-Length bodies only)");
                }
            }
        }
        let mut answer = vec![0; length.context("an answer without Content-Length")?];
        self.reader.read_exact(&mut answer)?;
        Ok((status, answer))
    }
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

/// What part 2 measured.
pub struct CancelLoad {
    /// Each cancel's round trip, and whether the SQLite writer was held for
    /// a WAL restart during it.
    pub cancels: Vec<(Duration, bool)>,
    pub gets: Vec<Duration>,
    /// The native hand-off chains: bare, with work.
    pub chain: [Vec<Duration>; 2],
    /// The writer's pauses during the cancels, and the longest since the
    /// server started (a maximum has no difference to take).
    pub pauses: u64,
    pub paused_max: Duration,
}

/// Part 2: with `n` spinning tasks running (every core busy), cancel
/// `samples` of them one at a time over HTTP (`grace_ms: 0`, `wait_ms`, so
/// the answer comes once `canceled` is committed), each followed by an
/// unrelated request (another running task's record). Each canceled task is
/// replaced by a fresh one, running before the next sample, so `n` keep
/// running throughout.
pub async fn cancel_under_load(dir: &Path, n: usize, samples: usize) -> anyhow::Result<CancelLoad> {
    let s = start(dir, n).await?;
    let spin = json!({"plugin": "spin-loop"});
    let ids = submit_many(&s.base, spin.clone(), n).await?;
    wait_count(&s.base, "running", n, Duration::from_secs(300)).await?;
    let base = s.base.clone();
    let db = s.svc.db().clone();
    let before = db.write_stats();
    let (cancels, gets, chain) = client(move || {
        let mut conn = Raw::connect(&base)?;
        let spin = serde_json::to_vec(&spin)?;
        let body = serde_json::to_vec(&json!({"grace_ms": 0, "wait_ms": 30_000}))?;
        // Oldest first: the victim is the task running longest, the
        // unrelated request reads one from the middle.
        let mut live: std::collections::VecDeque<String> = ids.into();
        let (mut cancels, mut gets) = (Vec::new(), Vec::new());
        for i in 0..samples {
            let victim = live.pop_front().context("no task left to cancel")?;
            let path = format!("/v1/tasks/{victim}/cancel");
            let (t0, pauses) = (Instant::now(), db.write_stats().pauses);
            let (status, answer) = conn.post(&path, &body)?;
            cancels.push((t0.elapsed(), db.write_stats().pauses != pauses));
            let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            if status != 200 || v["task"]["state"] != "canceled" {
                bail!("cancel answered {status}: {v}");
            }
            let fresh = conn.submit(&spin)?;
            conn.wait_running(&fresh, Duration::from_secs(30))?;
            live.push_back(fresh);
            std::thread::sleep(crate::cancel::jitter(i));
            let path = format!("/v1/tasks/{}", live[live.len() / 2]);
            let t0 = Instant::now();
            let (status, answer) = conn.get(&path)?;
            gets.push(t0.elapsed());
            let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            if status != 200 || v["state"] != "running" {
                bail!("GET answered {status}: {v}");
            }
            std::thread::sleep(crate::cancel::jitter(i + 7));
        }
        // The same machine's floor, under the same load: plain threads
        // handing a token along as many times as a cancel hands off.
        use crate::machine::{CANCEL_HAND_OFFS, HAND_OFF_WORK, hand_offs};
        let bare = hand_offs(CANCEL_HAND_OFFS, samples, Duration::ZERO)?;
        let working = hand_offs(CANCEL_HAND_OFFS, samples, HAND_OFF_WORK)?;
        Ok((cancels, gets, [bare, working]))
    })
    .await?;
    let after = s.svc.db().write_stats();
    s.stop().await;
    Ok(CancelLoad {
        cancels,
        gets,
        chain,
        pauses: after.pauses - before.pauses,
        paused_max: Duration::from_micros(after.paused_max_us),
    })
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
