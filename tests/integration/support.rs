//! Shared helpers: fixture bytes, one runtime for the library tests, and the
//! path of the real binary.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtask_runtime::{
    GuestEvent, Plugin, RunningTask, Runtime, RuntimeConfig, TaskLimits, TaskReport, TaskRequest,
    WasiSpec,
};

/// The bytes of a fixture plugin built from `plugins/<name>`.
pub fn fixture(name: &str) -> &'static [u8] {
    wasmtask::builtin::find(name)
        .unwrap_or_else(|| panic!("no built plugin named {name}"))
        .bytes
}

/// One runtime shared by the library tests (compiled plugins are cached in it).
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::new(RuntimeConfig {
            max_concurrent: 256,
            capture_limit: 64 * 1024,
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

pub fn plugin(name: &str) -> Plugin {
    runtime().load(fixture(name)).expect("fixture loads")
}

/// A request for fixture `name` with JSON `input` and default everything else.
pub fn request(name: &str, input: serde_json::Value) -> TaskRequest {
    TaskRequest {
        plugin: plugin(name),
        name: name.to_owned(),
        input: serde_json::to_vec(&input).unwrap(),
        wasi: WasiSpec::default(),
        limits: TaskLimits::default(),
        events: None,
    }
}

pub fn spawn(req: TaskRequest) -> RunningTask {
    runtime().spawn(req).expect("spawn")
}

pub async fn run(req: TaskRequest) -> TaskReport {
    spawn(req).wait().await
}

/// Attaches an event channel to `req` and returns its receiver.
pub fn with_events(req: &mut TaskRequest) -> mpsc::Receiver<GuestEvent> {
    let (tx, rx) = mpsc::channel(1024);
    req.events = Some(tx);
    rx
}

/// Waits for the first event matching `pred` (the guest reached that point).
pub async fn wait_event(
    rx: &mut mpsc::Receiver<GuestEvent>,
    pred: impl Fn(&GuestEvent) -> bool,
) -> GuestEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("event within 60 s")
            .expect("channel open");
        if pred(&ev) {
            return ev;
        }
    }
}

pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// The real binary, built by cargo for these tests.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wasmtask"));
    c.env_remove("WASMTASK_DB")
        .env_remove("WASMTASK_LOG")
        .env("RUST_LIB_BACKTRACE", "0");
    c
}

/// Reads a child's stderr on a thread: the first line `pick` accepts is sent
/// on the receiver (what `pick` made of it) the moment it is printed, and the
/// thread returns the whole text when the stream ends.
pub fn watch_stderr(
    child: &mut std::process::Child,
    pick: impl Fn(&str) -> Option<String> + Send + 'static,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if !sent && let Some(v) = pick(&line) {
                let _ = tx.send(v);
                sent = true;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (rx, reader)
}
