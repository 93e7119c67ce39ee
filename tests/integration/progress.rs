//! CLI progress on a terminal: `submit --follow`, `logs -f` and
//! `pipeline run` run on a pseudo-terminal draw a live bar per task from its
//! progress events (and print their other lines above it); with a pipe they
//! print the plain lines the other tests read, with no escape codes.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::server_support::{Server, fixtures_config};
use crate::support::bin;

const PATIENCE: Duration = Duration::from_secs(90);

/// A child whose stdout and stderr are one pseudo-terminal (100×30), and
/// everything it wrote there so far.
struct OnTerminal {
    child: Child,
    screen: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OnTerminal {
    fn spawn(mut cmd: Command) -> OnTerminal {
        let mut master = -1;
        let mut slave = -1;
        let size = libc::winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let master = unsafe { OwnedFd::from_raw_fd(master) };
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        cmd.env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn().unwrap();
        // `cmd` holds the last copies of the slave side: drop them, so the
        // master reads EOF (EIO) once the child is gone.
        drop(cmd);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let screen = screen.clone();
            let mut master = std::fs::File::from(master);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = master.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    screen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        OnTerminal {
            child,
            screen,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits until the terminal shows something `pred` accepts.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !pred(&self.text()) {
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what}: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits for the exit; returns the code and the whole output.
    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "still running: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status.code(), self.text())
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bar line of `label`: `label ⠋ [===>   ]  42%   1s step 12/100`.
fn has_bar(screen: &str, label: &str) -> bool {
    screen.split(['\n', '\r']).any(|line| {
        let plain = strip_ansi(line);
        plain.contains(label)
            && plain.contains("] ")
            && plain.contains("% ")
            && plain.contains("step ")
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn cli(s: &Server) -> Command {
    let mut c = bin();
    c.env_remove("WASMTASK_SERVER")
        .env_remove("WASMTASK_TOKEN")
        .args(["--server", &s.base_url]);
    c
}

#[test]
fn submit_follow_draws_a_bar_on_a_terminal_and_plain_lines_on_a_pipe() {
    let s = Server::start(&fixtures_config(""), None);
    let mut c = cli(&s);
    c.args([
        "submit",
        "cooperative",
        "--input",
        r#"{"steps": 1000000, "work": 2000000}"#,
        "--follow",
    ]);
    let term = OnTerminal::spawn(c);
    term.wait_for("a progress bar", |t| has_bar(t, "cooperative"));
    // Ctrl+C cancels on the server; its message prints above the bar.
    term.signal(libc::SIGINT);
    let (code, screen) = term.finish();
    assert_eq!(code, Some(130), "{screen:?}");
    assert!(screen.contains("SIGINT: canceling task t_"), "{screen:?}");
    assert!(screen.contains("\u{1b}["), "drawn in place: {screen:?}");
    assert!(
        !screen.contains("[progress "),
        "no plain progress lines: {screen:?}"
    );

    // On a pipe: plain lines only.
    let out = cli(&s)
        .args([
            "submit",
            "cooperative",
            "--input",
            r#"{"steps": 20, "work": 1000}"#,
            "--follow",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("[progress "), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes on a pipe: {err:?}");
}

#[test]
fn logs_follow_draws_a_bar_per_task_of_a_run() {
    let s = Server::start(&fixtures_config(""), None);
    let (status, run) = s.post(
        "/v1/runs",
        &json!({"name": "bars", "tasks": [
            {"key": "alpha", "plugin": "cooperative", "input": {"steps": 1_000_000, "work": 2_000_000}},
            {"key": "beta", "plugin": "cooperative", "input": {"steps": 1_000_000, "work": 2_000_000}}]}),
    );
    assert_eq!(status, 201, "{run}");
    let run_id = run["run"]["id"].as_str().unwrap().to_owned();
    let mut c = cli(&s);
    c.args(["logs", "-f", &run_id]);
    let term = OnTerminal::spawn(c);
    term.wait_for("a bar for each task", |t| {
        has_bar(t, "alpha") && has_bar(t, "beta")
    });
    let (status, body) = s.post(
        &format!("/v1/runs/{run_id}/abort"),
        &json!({"reason": "enough bars"}),
    );
    assert!(status == 200 || status == 202, "{body}");
    let (code, screen) = term.finish();
    assert_eq!(code, Some(0), "{screen:?}");
    let plain = strip_ansi(&screen);
    assert!(plain.contains("run.finished"), "{plain}");
    assert!(
        plain.contains("abort requested by api: enough bars"),
        "{plain}"
    );
    // Progress is on the bars, not in lines, when stdout is the terminal.
    assert!(!plain.contains("task.progress"), "{plain}");
}

#[test]
fn pipeline_run_draws_a_bar_per_step_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pipeline.toml");
    std::fs::write(
        &manifest,
        "name = \"bars\"\n\
         [steps.crunch]\nplugin = \"cooperative\"\ninput = { steps = 1000000, work = 2000000 }\n\
         [steps.after]\nplugin = \"hello\"\ninput = { text = \"x\" }\nneeds = [\"crunch\"]\n",
    )
    .unwrap();
    let mut c = bin();
    c.env("WASMTASK_DATA_DIR", dir.path().join("home"))
        .args(["pipeline", "run"])
        .arg(&manifest)
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    let term = OnTerminal::spawn(c);
    term.wait_for("the step's bar", |t| has_bar(t, "crunch"));
    term.signal(libc::SIGINT);
    let (code, screen) = term.finish();
    assert_eq!(code, Some(130), "{screen:?}");
    let plain = strip_ansi(&screen);
    assert!(plain.contains("SIGINT: aborting the pipeline"), "{plain}");
    assert!(plain.contains("[crunch] canceled"), "{plain}");
    // The summary table comes after the bars are gone.
    let summary = plain
        .rfind("STEP")
        .unwrap_or_else(|| panic!("no summary: {plain}"));
    assert!(plain[summary..].contains("crunch"), "{plain}");
    assert!(
        !plain[summary..].contains("% "),
        "a bar after the summary: {plain}"
    );
}
