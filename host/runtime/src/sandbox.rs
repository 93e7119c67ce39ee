//! The WASI sandbox a task runs in: deny by default.
//!
//! What a guest gets is only what the task spec names:
//! - **no network**: TCP, UDP and name lookup are switched off, and no socket
//!   address is ever allowed (wasmtime-wasi 48 also denies sockets unless an
//!   address check allows them; we set both so neither default can drift);
//! - **no inherited environment or arguments**: only the spec's `env`/`args`;
//! - **no filesystem** except the spec's preopened directories, read-only
//!   unless the spec asks for read-write; `..` cannot climb out of a preopen;
//! - **stdin** is empty unless the spec provides bytes or a reader;
//! - **stdout/stderr** go into bounded [`Capture`] buffers (the first
//!   `capture_limit` bytes are kept; the rest are counted and flagged as
//!   truncated), optionally mirrored live to the host's own streams (`wasmtask
//!   run` does that so a command's output appears as it is produced).

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

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
}

/// A bounded, shareable capture of one guest output stream.
#[derive(Debug, Clone)]
pub struct Capture {
    inner: Arc<Mutex<CaptureInner>>,
    tee: Option<Tee>,
}

impl Capture {
    pub fn new(limit: usize, tee: Option<Tee>) -> Capture {
        Capture {
            inner: Arc::new(Mutex::new(CaptureInner {
                data: Vec::new(),
                limit,
                total: 0,
            })),
            tee,
        }
    }

    fn push(&self, bytes: &[u8]) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.total = inner.total.saturating_add(bytes.len() as u64);
            let room = inner.limit.saturating_sub(inner.data.len());
            let keep = room.min(bytes.len());
            inner.data.extend_from_slice(&bytes[..keep]);
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
        "invalid environment variable {0:?}: names must be non-empty and contain no '=' or NUL"
    )]
    EnvName(String),
}

/// Builds the locked-down WASI context. `argv0` is the plugin's name.
pub(crate) fn build(
    spec: WasiSpec,
    argv0: &str,
    stdout: &Capture,
    stderr: &Capture,
) -> Result<WasiCtx, SandboxError> {
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
            b.stdin(wasmtime_wasi::cli::AsyncStdinStream::new(reader));
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
        b.initial_cwd(cwd);
    }
    Ok(b.build())
}
