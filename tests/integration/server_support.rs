//! A harness for `wasmtask serve`: start the real binary on a free port with
//! a TOML config and a fresh data directory, talk JSON to it over ureq, read
//! its SSE streams, kill it (SIGKILL or SIGTERM) and start it again on the
//! same data directory.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use ureq::http::Response;
use ureq::{Agent, Body};

use crate::support::bin;

/// How long a server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An agent that never treats a status as an error, never uses a proxy from
/// the environment and gives up on a silent server after `read_timeout`.
pub fn agent(read_timeout: Duration) -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(read_timeout))
        .timeout_per_write(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

/// A running `wasmtask serve` child. Dropping it kills the process.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base_url: String,
    pub data_dir: PathBuf,
    /// Scratch space of this server (holds `data_dir` and the config);
    /// removed on drop.
    _dir: tempfile::TempDir,
    config_path: PathBuf,
    token: Option<String>,
    listen: String,
    /// Every stderr line of the current process.
    stderr: Arc<Mutex<Vec<String>>>,
    agent: Agent,
}

impl Server {
    /// Starts a server with this TOML config (written to a file) on
    /// 127.0.0.1, port 0, a fresh data directory, and `token` if given.
    pub fn start(config_toml: &str, token: Option<&str>) -> Server {
        Server::start_listen(config_toml, token, "127.0.0.1:0")
    }

    /// As [`Server::start`], listening on `listen`.
    pub fn start_listen(config_toml: &str, token: Option<&str>, listen: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("wasmtask.toml");
        std::fs::write(&config_path, config_toml).unwrap();
        let mut s = Server {
            child: None,
            base_url: String::new(),
            data_dir,
            _dir: dir,
            config_path,
            token: token.map(str::to_owned),
            listen: listen.to_owned(),
            stderr: Arc::new(Mutex::new(Vec::new())),
            agent: agent(Duration::from_secs(90)),
        };
        s.spawn();
        s
    }

    /// A `wasmtask serve` command for this server's files (any extra args
    /// may be added), with a clean environment.
    pub fn command(&self) -> std::process::Command {
        let mut c = bin();
        for k in [
            "WASMTASK_TOKEN",
            "WASMTASK_LISTEN",
            "WASMTASK_DATA_DIR",
            "WASMTASK_CONFIG",
            "WASMTASK_LOG",
        ] {
            c.env_remove(k);
        }
        c.env("WASMTASK_LOG", "warn");
        c.arg("serve")
            .args(["--listen", &self.listen, "--data-dir"])
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&self.config_path);
        if let Some(t) = &self.token {
            c.args(["--token", t]);
        }
        c
    }

    fn spawn(&mut self) {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        self.stderr = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(stdout);
            let mut first = String::new();
            let _ = out.read_line(&mut first);
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        self.child = Some(child);
        let first = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => panic!(
                "the server printed no address in {START_TIMEOUT:?}: {}",
                self.stderr_text()
            ),
        };
        let Some(url) = first.trim().strip_prefix("listening on ") else {
            let status = self.wait_exit(Duration::from_secs(5));
            panic!(
                "unexpected first stdout line {first:?} (exit {status:?}); stderr:\n{}",
                self.stderr_text()
            );
        };
        // A wildcard address is reached through loopback.
        self.base_url = url
            .trim_end_matches('/')
            .replace("//0.0.0.0:", "//127.0.0.1:")
            .replace("//[::]:", "//[::1]:");
        let (status, body) = self.get("/readyz");
        assert_eq!(status, 200, "readyz after start: {body}");
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("server running")
    }

    /// Everything the current process wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (the process keeps running until it exits by itself).
    pub fn sigterm(&self) {
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same data directory and config (a
    /// still-running process is killed first). The port changes.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// GET `path` → (status, JSON body or the text as a string).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .agent
            .get(self.url(path))
            .header("Accept", "application/json")
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        read_json(resp)
    }

    /// POST a JSON body with this server's token.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let auth = self.auth();
        self.post_raw(
            path,
            &serde_json::to_vec(body).unwrap(),
            "application/json",
            auth.as_deref(),
        )
    }

    /// POST raw bytes with a content type and an optional Authorization
    /// header value.
    pub fn post_raw(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
        authorization: Option<&str>,
    ) -> (u16, Value) {
        let resp = self
            .try_post_raw(path, body, content_type, authorization)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        read_json(resp)
    }

    pub fn try_post_raw(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
        authorization: Option<&str>,
    ) -> Result<Response<Body>, ureq::Error> {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", content_type)
            .header("Accept", "application/json");
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        req.send(body)
    }

    /// Submits a task; asserts 201 and returns the record.
    pub fn submit(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/tasks", &body);
        assert_eq!(status, 201, "submit {body}: {v}");
        v
    }

    pub fn task(&self, id: &str) -> Value {
        let (status, v) = self.get(&format!("/v1/tasks/{id}"));
        assert_eq!(status, 200, "GET task {id}: {v}");
        v
    }

    /// Polls the task until `pred` holds; panics after `timeout`.
    pub fn wait_task(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task(id);
            if pred(&t) {
                return t;
            }
            if Instant::now() >= deadline {
                panic!("task {id} did not become {what} within {timeout:?}: {t:#}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_task(id, timeout, state, |t| t["state"] == state)
    }

    /// Every task (newest first), following cursors.
    pub fn all_tasks(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/tasks?limit=1000{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, v) = self.get(&path);
            assert_eq!(status, 200, "{path}: {v}");
            out.extend(v["tasks"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    /// Waits until run `id` has ended; returns its view (run and tasks).
    pub fn wait_run(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, v) = self.get(&format!("/v1/runs/{id}"));
            assert_eq!(status, 200, "run {id}: {v}");
            if ["succeeded", "failed", "aborted"]
                .contains(&v["run"]["state"].as_str().unwrap_or(""))
            {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("run {id} did not end within {timeout:?}: {v:#}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON events page of a run (all of it).
    pub fn run_events(&self, id: &str) -> Vec<Value> {
        self.events_at(&format!("/v1/runs/{id}/events"))
    }

    /// The JSON events page of a task (all of it).
    pub fn events(&self, id: &str) -> Vec<Value> {
        self.events_at(&format!("/v1/tasks/{id}/events"))
    }

    fn events_at(&self, path: &str) -> Vec<Value> {
        let (status, v) = self.get(path);
        assert_eq!(status, 200, "{path}: {v}");
        v["events"].as_array().unwrap().clone()
    }

    /// Opens an SSE stream: GET `path` with `Accept: text/event-stream` and
    /// optionally `Last-Event-ID`.
    pub fn sse_get(&self, path: &str, last_event_id: Option<i64>) -> SseStream {
        let mut req = agent(Duration::from_secs(60))
            .get(self.url(path))
            .header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req
            .call()
            .unwrap_or_else(|e| panic!("GET {path} (SSE): {e}"));
        SseStream::new(resp)
    }

    /// A streamed submission (`"stream": true` is added): the task id from
    /// the response header, and the stream.
    pub fn submit_stream(&self, mut body: Value) -> (String, SseStream) {
        body["stream"] = Value::Bool(true);
        let mut req = agent(Duration::from_secs(60))
            .post(self.url("/v1/tasks"))
            .header("Content-Type", "application/json")
            .header("Accept", "text/event-stream");
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req
            .send(&serde_json::to_vec(&body).unwrap()[..])
            .unwrap_or_else(|e| panic!("streamed submit: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "streamed submit status");
        let id = resp
            .headers()
            .get("x-wasmtask-task-id")
            .and_then(|v| v.to_str().ok())
            .expect("x-wasmtask-task-id header")
            .to_owned();
        (id, SseStream::new(resp))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads a response body as JSON (or, failing that, as a JSON string).
pub fn read_json(mut resp: Response<Body>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("reading a {status} answer: {e}"));
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

/// One SSE message.
#[derive(Debug, Clone)]
pub struct SseMsg {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseMsg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data not JSON ({e}): {}", self.data))
    }

    pub fn seq(&self) -> i64 {
        self.id
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("SSE id is a seq")
    }
}

/// An open SSE response, read message by message. Dropping it closes the
/// connection.
pub struct SseStream {
    reader: ureq::BodyReader<'static>,
    buf: Vec<u8>,
    pending: Vec<SseMsg>,
    eof: bool,
}

impl SseStream {
    fn new(resp: Response<Body>) -> SseStream {
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "not an event stream: {content_type:?} (status {})",
            resp.status()
        );
        SseStream {
            reader: resp.into_body().into_reader(),
            buf: Vec::new(),
            pending: Vec::new(),
            eof: false,
        }
    }

    /// The next message, `None` at the end of the stream. Keep-alive
    /// comments are skipped. Panics on a read error, or if nothing ends the
    /// wait by `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Option<SseMsg> {
        self.try_next(deadline).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`SseStream::next`], with read errors returned.
    pub fn try_next(&mut self, deadline: Instant) -> Result<Option<SseMsg>, String> {
        loop {
            if !self.pending.is_empty() {
                return Ok(Some(self.pending.remove(0)));
            }
            if self.eof {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Err("SSE: no message before the deadline".into());
            }
            let mut chunk = [0u8; 8192];
            match self.reader.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.parse();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("SSE read failed: {e}")),
            }
        }
    }

    /// Reads until the end of the stream (or panics at `deadline`).
    pub fn rest(&mut self, deadline: Instant) -> Vec<SseMsg> {
        let mut out = Vec::new();
        while let Some(m) = self.next(deadline) {
            out.push(m);
        }
        out
    }

    /// Reads until a message of this event kind (inclusive).
    pub fn until_event(&mut self, kind: &str, deadline: Instant) -> Vec<SseMsg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .next(deadline)
                .unwrap_or_else(|| panic!("SSE ended before {kind}: {out:?}"));
            let done = m.event.as_deref() == Some(kind);
            out.push(m);
            if done {
                return out;
            }
        }
    }

    fn parse(&mut self) {
        loop {
            let text = &self.buf;
            // Blocks end with a blank line (\n\n; tolerate \r\n).
            let Some(end) = find_block_end(text) else {
                return;
            };
            let (block_len, sep_len) = end;
            let block = String::from_utf8_lossy(&text[..block_len]).replace("\r\n", "\n");
            self.buf.drain(..block_len + sep_len);
            let mut msg = SseMsg {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "id" => msg.id = Some(value.to_owned()),
                    "event" => msg.event = Some(value.to_owned()),
                    "data" => {
                        if has_data {
                            msg.data.push('\n');
                        }
                        msg.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if has_data {
                self.pending.push(msg);
            }
        }
    }
}

fn find_block_end(b: &[u8]) -> Option<(usize, usize)> {
    for i in 0..b.len() {
        if b[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
        if b[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
    }
    None
}

/// Server config with the fixtures offered, plus `extra` TOML lines.
pub fn fixtures_config(extra: &str) -> String {
    format!("builtin_fixtures = true\n{extra}\n")
}

/// A deadline `secs` from now.
pub fn within(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}
