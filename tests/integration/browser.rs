//! A small WebDriver client for the dashboard tests: it starts Debian's
//! `chromedriver` with headless `chromium` and speaks the W3C WebDriver
//! protocol (JSON over HTTP) with ureq, which the tests already use. The
//! tests need about ten commands; a WebDriver crate would add its own HTTP
//! client stack to every build for them.
//!
//! Both programs must be on PATH or in /usr/bin (`.ci/run` installs them):
//! a missing one fails the test with a message saying how to install it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server_support::agent;

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for a condition in the page (2 shared cores, parallel tests).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// One browser at a time: each is a few processes, and the machine has two
/// cores shared with the rest of the suite.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

fn find_program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([Path::new("/usr/bin").join(name)])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH nor in /usr/bin: the dashboard tests drive a real \
                 browser. Install it with `apt-get install -y chromium chromium-driver` \
                 (.ci/run does this on CI)."
            )
        })
}

/// The directory test artifacts (screenshots) are written to:
/// `<target dir>/test-artifacts`, next to the `release/` directory of the
/// binary under test (so `$CARGO_TARGET_DIR/test-artifacts` when it is set).
pub fn artifacts_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_wasmtask"));
    let target = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A WebDriver session with headless Chromium. Dropping it ends the
/// session and the driver.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
    _one: MutexGuard<'static, ()>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window `width`×`height`.
    pub fn start(width: u32, height: u32) -> Browser {
        let one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
        let chromium = find_program("chromium");
        let chromedriver = find_program("chromedriver");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            agent: agent(Duration::from_secs(120)),
            _profile: profile,
            _one: one,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = b
                .agent
                .get(format!("{}/status", b.base))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            if let Ok(Some(status)) = b.driver.try_wait() {
                panic!("chromedriver exited at start-up: {status}");
            }
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--user-data-dir={}", b._profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = b.raw("POST", "/session", Some(&caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session in {v}"))
            .to_owned();
        b.resize(width, height);
        b
    }

    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        match self.try_raw(method, path, body) {
            Ok(v) => v,
            Err((status, v)) => panic!("WebDriver {method} {path}: {status} {v}"),
        }
    }

    /// Like `raw`, but an error answer comes back as (status, value).
    fn try_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, (u16, Value)> {
        let url = format!("{}{path}", self.base);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(b.unwrap_or(&json!({}))).unwrap()),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if status >= 400 {
            return Err((status, v["value"].clone()));
        }
        Ok(v["value"].clone())
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        );
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page
    /// and returns its result.
    pub fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Polls `script` until it returns something truthy (that value), or
    /// panics with `what` after [`PATIENCE`].
    pub fn wait_js(&self, what: &str, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.js(script, args.clone());
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; it shows: {}",
                self.text("main")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until an element matches `css` and returns its reference.
    pub fn find(&self, css: &str) -> Value {
        self.wait_js(
            &format!("an element `{css}`"),
            "return document.querySelector(arguments[0]) !== null;",
            json!([css]),
        );
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .map(|id| json!({ ELEMENT: id }))
            .unwrap_or_else(|| panic!("no element reference in {v}"))
    }

    fn element_id(el: &Value) -> String {
        el[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Clicks the first element matching `css`. Live fragments replace
    /// elements under the test's feet: a click that finds its element gone
    /// ("stale element reference") looks it up again.
    pub fn click(&self, css: &str) {
        for _ in 0..20 {
            let el = self.find(css);
            let path = format!(
                "/session/{}/element/{}/click",
                self.session,
                Browser::element_id(&el)
            );
            match self.try_raw("POST", &path, Some(&json!({}))) {
                Ok(_) => return,
                Err((_, v)) if v["error"] == "stale element reference" => continue,
                Err((status, v)) => panic!("WebDriver POST {path}: {status} {v}"),
            }
        }
        panic!("`{css}` kept being replaced before it could be clicked");
    }

    /// Types `text` into the element (after clearing it).
    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        let id = Browser::element_id(&el);
        self.cmd("POST", &format!("/element/{id}/clear"), Some(&json!({})));
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// The rendered text of the first element matching `css` ("" if none).
    pub fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or("")
        .to_owned()
    }

    /// Writes a PNG screenshot of the whole page (not only the window) at
    /// the window's width to `path`, through Chromium's DevTools command.
    pub fn screenshot(&self, path: &Path) {
        let v = self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(&json!({"cmd": "Page.captureScreenshot",
                         "params": {"format": "png", "captureBeyondViewport": true}})),
        );
        let png = base64_decode(
            v["data"]
                .as_str()
                .unwrap_or_else(|| panic!("no screenshot in {v}")),
        );
        assert!(png.starts_with(b"\x89PNG"), "not a PNG screenshot");
        std::fs::write(path, png).unwrap();
    }

    /// The browser log entries (console messages, script errors, failed
    /// loads) since the last call, as `(level, message)`.
    pub fn console(&self) -> Vec<(String, String)> {
        let v = self.cmd("POST", "/se/log", Some(&json!({"type": "browser"})));
        v.as_array()
            .unwrap_or_else(|| panic!("no log entries in {v}"))
            .iter()
            .map(|e| {
                (
                    e["level"].as_str().unwrap_or("").to_owned(),
                    e["message"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Asserts the page logged no error (script errors, console.error,
    /// failed loads) but exactly one for each of `expected` (a part of the
    /// message), so a test that expects one also proves the log is read.
    pub fn assert_console_errors(&self, expected: &[&str]) {
        let errors: Vec<_> = self
            .console()
            .into_iter()
            .filter(|(level, _)| level == "SEVERE")
            .collect();
        let unexpected: Vec<_> = errors
            .iter()
            .filter(|(_, msg)| !expected.iter().any(|x| msg.contains(x)))
            .collect();
        assert!(
            unexpected.is_empty(),
            "the page logged errors: {unexpected:#?}"
        );
        for x in expected {
            let n = errors.iter().filter(|(_, msg)| msg.contains(x)).count();
            assert_eq!(n, 1, "expected one logged error with `{x}`: {errors:#?}");
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (the screenshot encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_round_trips_known_values() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
