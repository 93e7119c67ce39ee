//! The WASI sandbox a task runs in: deny by default.
//!
//! What a guest gets is only what the task spec names:
//! - **no network**: TCP, UDP and name lookup are switched off, and no socket
//!   address is ever allowed (wasmtime-wasi 48 also denies sockets unless an
//!   address check allows them; we set both so neither default can drift);
//! - **no inherited environment or arguments**: only the spec's `env`/`args`;
//! - **no filesystem** except the spec's preopened directories, read-only
//!   unless the spec asks for read-write; `..` cannot climb out of a preopen;
//! - **working directory**: `cwd` is given to the guest as WASI 0.2's
//!   `initial-cwd`. wasi-libc (what Rust, C and most toolchains use, on both
//!   WASI 0.2 and preview 1) ignores it and resolves relative paths against a
//!   preopen named `.`, so when `cwd` lies inside a preopen, that directory is
//!   *also* preopened as `.`, with the same permissions. It must resolve (no
//!   symlink or `..`) to a directory inside that preopen's host directory, so
//!   it never grants more than the preopen itself;
//! - **stdin** is empty unless the spec provides bytes or a reader;
//! - **stdout/stderr** go into bounded [`Capture`] buffers (the first
//!   `capture_limit` bytes are kept; the rest are counted and flagged as
//!   truncated), optionally mirrored live to the host's own streams (`wasmtask
//!   run` does that so a command's output appears as it is produced), and
//!   streamed line by line as [`GuestEvent::Output`] events when the task has
//!   an event channel. Only captured bytes are streamed, so a flood costs at
//!   most `capture_limit` bytes of events per stream (and the channel is
//!   bounded besides: what does not fit is counted as dropped).

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::host::{GuestEvent, Shared, cap_string, emit_to};

/// A host directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    /// The path the guest sees (e.g. `/data` or `.`).
    pub guest: String,
    /// Read-write when `true`; read-only otherwise.
    pub writable: bool,
}

/// Where the guest's stdin comes from.
#[derive(Default)]
pub enum Stdin {
    /// Reads see end-of-file at once.
    #[default]
    Empty,
    /// These bytes, then end-of-file.
    Bytes(Vec<u8>),
    /// An async reader (a pipe, a socket, the host's own stdin).
    Reader(Box<dyn AsyncRead + Send + Sync + Unpin>),
}

impl std::fmt::Debug for Stdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stdin::Empty => f.write_str("Empty"),
            Stdin::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Stdin::Reader(_) => f.write_str("Reader"),
        }
    }
}

/// Mirror a captured stream to one of the host process's own streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    Stdout,
    Stderr,
}

/// Everything WASI-related a task is given.
#[derive(Debug, Default)]
pub struct WasiSpec {
    /// Arguments after `argv[0]` (which is the plugin's name).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Stdin,
    pub dirs: Vec<Preopen>,
    /// The guest's initial working directory (a guest path), if any.
    pub cwd: Option<String>,
    pub stdout_tee: Option<Tee>,
    pub stderr_tee: Option<Tee>,
}

/// What a [`Capture`] kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub data: Vec<u8>,
    pub total_bytes: u64,
    pub truncated: bool,
}

#[derive(Debug)]
struct CaptureInner {
    data: Vec<u8>,
    limit: usize,
    total: u64,
    /// Bytes of an unfinished line not yet streamed.
    line: Vec<u8>,
}

/// Where a capture streams its lines.
#[derive(Debug, Clone)]
pub(crate) struct LineSink {
    pub stream: &'static str,
    pub tx: mpsc::Sender<GuestEvent>,
    pub shared: Arc<Shared>,
    /// Longest line streamed, in bytes; a longer one is sent in pieces.
    pub max_line: usize,
}

/// A bounded, shareable capture of one guest output stream.
#[derive(Debug, Clone)]
pub struct Capture {
    inner: Arc<Mutex<CaptureInner>>,
    tee: Option<Tee>,
    sink: Option<LineSink>,
}

impl Capture {
    pub fn new(limit: usize, tee: Option<Tee>) -> Capture {
        Capture {
            inner: Arc::new(Mutex::new(CaptureInner {
                data: Vec::new(),
                limit,
                total: 0,
                line: Vec::new(),
            })),
            tee,
            sink: None,
        }
    }

    /// Also stream every captured line as a [`GuestEvent::Output`].
    pub(crate) fn with_sink(mut self, sink: Option<LineSink>) -> Capture {
        self.sink = sink;
        self
    }

    fn push(&self, bytes: &[u8]) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.total = inner.total.saturating_add(bytes.len() as u64);
            let room = inner.limit.saturating_sub(inner.data.len());
            let keep = room.min(bytes.len());
            inner.data.extend_from_slice(&bytes[..keep]);
            if let Some(sink) = &self.sink {
                let kept = &bytes[..keep];
                let mut rest = kept;
                while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                    inner.line.extend_from_slice(&rest[..nl]);
                    let line = std::mem::take(&mut inner.line);
                    send_line(sink, &line);
                    rest = &rest[nl + 1..];
                }
                inner.line.extend_from_slice(rest);
                if inner.line.len() >= sink.max_line {
                    let line = std::mem::take(&mut inner.line);
                    send_line(sink, &line);
                }
            }
        }
        // A closed terminal or pipe must not fail the guest: mirroring is a
        // convenience, the capture is the record.
        match self.tee {
            Some(Tee::Stdout) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            Some(Tee::Stderr) => {
                let _ = std::io::stderr().lock().write_all(bytes);
            }
            None => {}
        }
    }

    /// Streams the last, unfinished line (the guest has stopped).
    pub(crate) fn finish_stream(&self) {
        let Some(sink) = &self.sink else { return };
        if let Ok(mut inner) = self.inner.lock()
            && !inner.line.is_empty()
        {
            let line = std::mem::take(&mut inner.line);
            send_line(sink, &line);
        }
    }

    /// A copy of what was kept so far.
    pub fn snapshot(&self) -> Captured {
        match self.inner.lock() {
            Ok(inner) => Captured {
                data: inner.data.clone(),
                total_bytes: inner.total,
                truncated: inner.total > inner.data.len() as u64,
            },
            Err(_) => Captured::default(),
        }
    }
}

fn send_line(sink: &LineSink, line: &[u8]) {
    let line = cap_string(String::from_utf8_lossy(line).into_owned(), sink.max_line);
    emit_to(
        &sink.tx,
        &sink.shared,
        GuestEvent::Output {
            stream: sink.stream,
            line,
        },
    );
}

/// How much the guest may hand over in one write (the WASI convention).
const WRITE_BUDGET: usize = 64 * 1024;

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Errors building the sandbox (all caused by the spec, not the guest).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot preopen {host}: {message}")]
    Preopen { host: String, message: String },
    #[error("invalid guest path {0:?}: it must be non-empty and contain no NUL")]
    GuestPath(String),
    #[error(
        "invalid working directory {0:?}: it must be an absolute guest path and contain no NUL"
    )]
    Cwd(String),
    #[error(
        "invalid environment variable {0:?}: names must be non-empty and contain no '=' or NUL"
    )]
    EnvName(String),
}

/// Whether `path` is an absolute guest path (what a working directory and a
/// run's workspace mount must be): it starts with `/` and holds no NUL.
pub fn is_absolute_guest_path(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0')
}

/// The preopen (longest guest path) holding guest path `cwd`, and the host
/// directory `cwd` names inside it; `None` when no preopen holds it.
fn cwd_preopen<'a>(
    dirs: &'a [Preopen],
    cwd: &str,
) -> Result<Option<(&'a Preopen, PathBuf)>, SandboxError> {
    let cwd = cwd.trim_end_matches('/');
    let best = dirs
        .iter()
        .filter_map(|d| {
            let guest = d.guest.trim_end_matches('/');
            let rest = if cwd == guest {
                ""
            } else {
                cwd.strip_prefix(guest)?.strip_prefix('/')?
            };
            Some((d, rest))
        })
        .max_by_key(|(d, _)| d.guest.len());
    let Some((dir, rest)) = best else {
        return Ok(None);
    };
    let bad = |message: String| SandboxError::Preopen {
        host: dir.host.join(rest).display().to_string(),
        message,
    };
    let root = std::fs::canonicalize(&dir.host).map_err(|e| bad(e.to_string()))?;
    let host = std::fs::canonicalize(root.join(rest)).map_err(|e| bad(e.to_string()))?;
    if !host.starts_with(&root) || !host.is_dir() {
        return Err(bad(
            "the working directory must be a directory inside its preopen".into(),
        ));
    }
    Ok(Some((dir, host)))
}

/// Builds the locked-down WASI context. `argv0` is the plugin's name.
pub(crate) fn build(
    spec: WasiSpec,
    argv0: &str,
    stdout: &Capture,
    stderr: &Capture,
) -> Result<WasiP1Ctx, SandboxError> {
    let mut b = WasiCtxBuilder::new();
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    b.arg(argv0);
    for a in &spec.args {
        b.arg(a);
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(SandboxError::EnvName(k.clone()));
        }
        b.env(k, v);
    }
    match spec.stdin {
        Stdin::Empty => {
            b.stdin(wasmtime_wasi::p2::pipe::ClosedInputStream);
        }
        Stdin::Bytes(bytes) => {
            b.stdin(wasmtime_wasi::p2::pipe::MemoryInputPipe::new(bytes));
        }
        Stdin::Reader(reader) => {
            b.stdin(crate::stdin::ReaderStdin::new(reader));
        }
    }
    b.stdout(stdout.clone());
    b.stderr(stderr.clone());
    for d in &spec.dirs {
        if d.guest.is_empty() || d.guest.contains('\0') {
            return Err(SandboxError::GuestPath(d.guest.clone()));
        }
        let perms = if d.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(&d.host, &d.guest, perms)
            .map_err(|e| SandboxError::Preopen {
                host: d.host.display().to_string(),
                message: e.to_string(),
            })?;
    }
    if let Some(cwd) = &spec.cwd {
        if !is_absolute_guest_path(cwd) {
            return Err(SandboxError::Cwd(cwd.clone()));
        }
        b.initial_cwd(cwd);
        if let Some((dir, host)) = cwd_preopen(&spec.dirs, cwd)? {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            b.preopened_dir(&host, ".", perms)
                .map_err(|e| SandboxError::Preopen {
                    host: host.display().to_string(),
                    message: e.to_string(),
                })?;
        }
    }
    // The preview-1 context wraps the same `WasiCtx`; components reach it
    // through `WasiView`, core modules through the preview-1 adapter.
    Ok(b.build_p1())
}
