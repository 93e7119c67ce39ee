//! `wasmtask serve`: configuration (flags > environment > TOML file >
//! defaults), listening, graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use wasmtask_runtime::{GuestPriority, Runtime, RuntimeConfig};

use crate::api::{self, ApiConfig};
use crate::cli::CliError;
use crate::db::Db;
use crate::service::{Service, ServiceConfig};

/// Default address of the server (and of the CLI client's `--server`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the first line printed
    /// on stdout is `listening on http://ADDR`). Default 127.0.0.1:7480.
    #[arg(long, env = "WASMTASK_LISTEN")]
    pub listen: Option<String>,
    /// Where the database, uploaded plugins and the compile cache live
    /// (default: $XDG_DATA_HOME/wasmtask, else ~/.local/share/wasmtask).
    #[arg(long, env = "WASMTASK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML configuration file (unknown keys are refused; see docs/config.md).
    #[arg(long, env = "WASMTASK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bearer token required on every state-changing request.
    #[arg(long, env = "WASMTASK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The configuration file. Every key is optional; see docs/config.md.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub token: Option<String>,
    /// Host directories tasks may share (`dirs`); nothing else can be shared.
    #[serde(default)]
    pub allowed_dirs: Vec<PathBuf>,
    /// Tasks started at once (default 1000).
    pub max_running: Option<usize>,
    /// Largest plugin upload in bytes (default 64 MiB).
    pub max_plugin_bytes: Option<usize>,
    /// Largest other request body in bytes (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    /// Also offer the test fixtures built into the binary (default false).
    #[serde(default)]
    pub builtin_fixtures: bool,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub runtime: RuntimeSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/Ctrl+C, let running tasks finish for up to this long
    /// (default 0).
    pub wait_ms: Option<u64>,
    /// Then cancel the rest with this grace (default 5000).
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Guests executing wasm at once (default: the number of CPUs).
    pub cpu_slots: Option<usize>,
    /// OS priority of the guest threads: "idle" (default), "low" or "normal".
    pub guest_priority: Option<String>,
    /// Epoch tick in milliseconds (default 2).
    pub epoch_tick_ms: Option<u64>,
    /// Memory cap of tasks that name none (default 256 MiB).
    pub default_max_memory_bytes: Option<u64>,
    /// Largest memory cap a task may ask for (default 4 GiB).
    pub memory_ceiling_bytes: Option<u64>,
    /// Pooling allocator (default true).
    pub pooling: Option<bool>,
    /// Let the compiler inline small wasm functions (default false): faster
    /// CPU-bound guests, slower first compiles.
    pub compiler_inlining: Option<bool>,
    /// Bytes of stdout and of stderr kept per task (default 1 MiB).
    pub capture_limit_bytes: Option<usize>,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`). Tokio's default is 1,024: a burst of a thousand
/// clients at once (say, a run of a thousand tasks canceled by as many
/// scripts) while every core is busy with guests overflowed it, and the
/// kernel reset the connections it could not queue.
const LISTEN_BACKLOG: u32 = 4096;

fn bind_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Whether listening on `addr` exposes the server beyond this machine.
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

pub async fn serve(args: ServeArgs) -> Result<ExitCode, CliError> {
    let cfg = match &args.config {
        Some(p) => Config::load(p).map_err(|e| usage(format!("{e:#}")))?,
        None => Config::default(),
    };
    let listen = args
        .listen
        .clone()
        .or(cfg.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let addr: SocketAddr = tokio::net::lookup_host(&listen)
        .await
        .map_err(|e| usage(format!("--listen {listen}: {e}")))?
        .next()
        .ok_or_else(|| usage(format!("--listen {listen}: no address")))?;
    let token = args
        .token
        .clone()
        .or(cfg.token.clone())
        .filter(|t| !t.is_empty());
    if !is_loopback(&addr) && token.is_none() {
        return Err(usage(format!(
            "refusing to listen on {addr} without a token: anyone who can reach it could run \
             and cancel tasks. Pass --token (or WASMTASK_TOKEN), or listen on 127.0.0.1."
        )));
    }
    let data_dir = args
        .data_dir
        .clone()
        .or(cfg.data_dir.clone())
        .unwrap_or_else(crate::cli::default_data_dir);
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        CliError::Other(anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))
    })?;
    let mut allowed_dirs = Vec::new();
    for d in &cfg.allowed_dirs {
        let c = std::fs::canonicalize(d)
            .map_err(|e| usage(format!("allowed_dirs: {}: {e}", d.display())))?;
        allowed_dirs.push(c);
    }

    let max_running = cfg.max_running.unwrap_or(1000).max(1);
    let defaults = RuntimeConfig::default();
    let rt_cfg = RuntimeConfig {
        cache_dir: Some(data_dir.join("cache")),
        max_concurrent: max_running,
        cpu_slots: cfg.runtime.cpu_slots,
        guest_priority: guest_priority(cfg.runtime.guest_priority.as_deref()).map_err(usage)?,
        epoch_tick: cfg
            .runtime
            .epoch_tick_ms
            .map(|ms| Duration::from_millis(ms.max(1)))
            .unwrap_or(defaults.epoch_tick),
        default_max_memory: cfg
            .runtime
            .default_max_memory_bytes
            .unwrap_or(defaults.default_max_memory),
        memory_ceiling: cfg
            .runtime
            .memory_ceiling_bytes
            .unwrap_or(defaults.memory_ceiling),
        pooling: cfg.runtime.pooling.unwrap_or(defaults.pooling),
        compiler_inlining: cfg
            .runtime
            .compiler_inlining
            .unwrap_or(defaults.compiler_inlining),
        capture_limit: cfg
            .runtime
            .capture_limit_bytes
            .unwrap_or(defaults.capture_limit),
        ..defaults
    };
    let rt = Runtime::new(rt_cfg).map_err(CliError::Other)?;
    let db_path = data_dir.join("wasmtask.db");
    let db = Db::open(&db_path)
        .await
        .with_context(|| format!("cannot open the database {}", db_path.display()))?;
    let svc = Service::start(
        rt,
        db,
        ServiceConfig {
            allowed_dirs,
            max_running,
            plugin_dir: data_dir.join("plugins"),
            builtin_fixtures: cfg.builtin_fixtures,
            workspace_dir: data_dir.join("workspaces"),
        },
    )
    .await
    .map_err(CliError::Other)?;

    let router = api::router(
        svc.clone(),
        ApiConfig {
            token,
            max_body_bytes: cfg.max_body_bytes.unwrap_or(api::DEFAULT_MAX_BODY_BYTES),
            max_plugin_bytes: cfg
                .max_plugin_bytes
                .unwrap_or(api::DEFAULT_MAX_PLUGIN_BYTES),
        },
    );
    let listener = bind_listener(addr)
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().context("no local address")?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
    }
    tracing::info!(%local, data_dir = %data_dir.display(), "serving");

    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let wait = Duration::from_millis(cfg.shutdown.wait_ms.unwrap_or(0));
    let grace = Duration::from_millis(cfg.shutdown.grace_ms.unwrap_or(5000));
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_svc = svc.clone();
    let shutdown = async move {
        let sig = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        eprintln!(
            "wasmtask: {sig}: shutting down (running tasks: {})",
            shutdown_svc.running()
        );
        shutdown_svc.stop_accepting();
        // Settle running tasks while the server stops accepting.
        tokio::spawn(async move {
            shutdown_svc.drain(wait, grace).await;
            let _ = drained_tx.send(());
        });
    };
    axum::serve(api::no_delay(listener), router)
        .with_graceful_shutdown(shutdown)
        .await
        .context("the server failed")?;
    let _ = drained_rx.await;
    Ok(ExitCode::SUCCESS)
}

/// `runtime.guest_priority`: "idle" (the default), "low" or "normal".
fn guest_priority(v: Option<&str>) -> Result<GuestPriority, String> {
    match v {
        None | Some("idle") => Ok(GuestPriority::Idle),
        Some("low") => Ok(GuestPriority::Low),
        Some("normal") => Ok(GuestPriority::Normal),
        Some(other) => Err(format!(
            "runtime.guest_priority: `{other}` is not one of \"idle\", \"low\", \"normal\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_unknown_keys() {
        let e = toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nlisten_port = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_port"), "{e}");
        let e = toml::from_str::<Config>("[shutdown]\ngrace = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("grace"), "{e}");
    }

    #[test]
    fn config_reads_every_section() {
        let c: Config = toml::from_str(
            r#"
            listen = "0.0.0.0:9000"
            token = "s3cret"
            allowed_dirs = ["/tmp"]
            max_running = 10
            max_plugin_bytes = 100
            max_body_bytes = 200
            builtin_fixtures = true
            [shutdown]
            wait_ms = 1
            grace_ms = 2
            [runtime]
            cpu_slots = 1
            epoch_tick_ms = 5
            default_max_memory_bytes = 1048576
            memory_ceiling_bytes = 2097152
            pooling = false
            compiler_inlining = true
            capture_limit_bytes = 4096
            guest_priority = "low"
            "#,
        )
        .unwrap();
        assert_eq!(c.max_running, Some(10));
        assert_eq!(c.shutdown.grace_ms, Some(2));
        assert_eq!(c.runtime.pooling, Some(false));
        assert_eq!(c.runtime.compiler_inlining, Some(true));
        assert!(c.builtin_fixtures);
    }

    #[test]
    fn guest_priority_names_are_checked() {
        assert_eq!(guest_priority(None), Ok(GuestPriority::Idle));
        assert_eq!(guest_priority(Some("low")), Ok(GuestPriority::Low));
        assert_eq!(guest_priority(Some("normal")), Ok(GuestPriority::Normal));
        let e = guest_priority(Some("high")).unwrap_err();
        assert!(e.contains("`high`") && e.contains("\"idle\""), "{e}");
    }

    #[test]
    fn loopback_is_recognised() {
        assert!(is_loopback(&"127.0.0.1:1".parse().unwrap()));
        assert!(is_loopback(&"[::1]:1".parse().unwrap()));
        assert!(!is_loopback(&"0.0.0.0:1".parse().unwrap()));
        assert!(!is_loopback(&"192.168.1.2:1".parse().unwrap()));
    }
}
