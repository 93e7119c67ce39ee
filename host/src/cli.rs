//! The `wasmtask` command line: argument parsing and the local commands
//! (`run`, `ps`, `show`, `plugins`).
//!
//! Exit status (documented in `--help` and the README): 0 succeeded; a
//! command's own non-zero exit code is passed through; 1 any other failure
//! (trap, limit, guest error); 2 usage or bad input; 124 timed out; 130
//! canceled.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use wasmtask_runtime::{GuestEvent, Runtime, RuntimeConfig, Stdin};

use crate::db::{self, CancelDecision, Db, NewTask, PluginRow, StartDecision, TaskFilter};
use crate::exec::{self, LocalIo};
use crate::model::{DirSpec, Limits, TaskRecord, TaskSpec, TaskState, now_millis};

#[derive(Debug, Parser)]
#[command(
    name = "wasmtask",
    version,
    about = "Run untrusted WebAssembly components as tasks and stop any one of them promptly",
    after_help = "Exit status: 0 succeeded; a command's own non-zero exit code is passed through; \
                  1 other failure (trap, limit, guest error); 2 usage or bad input; 124 timed out; 130 canceled."
)]
pub struct Cli {
    /// Output format for results.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The SQLite database (default: $WASMTASK_DATA_DIR, else $XDG_DATA_HOME/wasmtask, else
    /// ~/.local/share/wasmtask, then `wasmtask.db` in it).
    #[arg(long, global = true, env = "WASMTASK_DB")]
    pub db: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API: tasks, runs, cancels, event streams (see docs/api.md).
    Serve(crate::server::ServeArgs),
    /// Run a plugin locally (no server) and record the attempt.
    ///
    /// Ctrl+C or SIGTERM cancels the guest and records `canceled`: at once by default; with
    /// --grace the first signal asks the guest to stop and a second one (or the end of the
    /// grace) forces it.
    Run(RunArgs),
    /// List recorded tasks, newest first.
    Ps(PsArgs),
    /// Show one task's full record.
    Show(ShowArgs),
    /// List the plugins built into this binary (usable by name with `run`).
    Plugins,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A component file (.wasm), or the name of a built-in plugin (see `wasmtask plugins`).
    pub plugin: String,
    /// Input for task plugins: JSON text, or @FILE to read it from a file.
    #[arg(long)]
    pub input: Option<String>,
    /// Wall-clock limit, e.g. 500ms, 30s, 5m.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Memory cap for all the guest's memories, e.g. 64MiB, 1G, 1048576.
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Fuel budget (roughly, wasm instructions); turns on fuel metering for this task.
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Grace the guest gets after Ctrl+C before it is stopped by force (default: none).
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Share a host directory: HOST[::GUEST][:ro|:rw] (read-only unless :rw; GUEST defaults to HOST).
    #[arg(long = "dir", value_parser = parse_dir)]
    pub dirs: Vec<DirSpec>,
    /// Set an environment variable in the guest (nothing is inherited).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The guest's stdin: @FILE, or - for this process's stdin (default: empty).
    #[arg(long)]
    pub stdin: Option<String>,
    /// Arguments for command plugins (after --).
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only tasks in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks of this plugin (name).
    #[arg(long)]
    pub plugin: Option<String>,
    /// At most this many tasks.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: String,
}

/// A failure with the exit status it deserves.
#[derive(Debug)]
pub enum CliError {
    /// Bad usage or input: exit 2.
    Usage(String),
    /// Anything else: exit 1.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> CliError {
        CliError::Other(e)
    }
}

impl From<db::DbError> for CliError {
    fn from(e: db::DbError) -> CliError {
        CliError::Other(e.into())
    }
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Other(_) => ExitCode::from(1),
        }
    }

    pub fn message(&self) -> String {
        match self {
            CliError::Usage(m) => m.clone(),
            CliError::Other(e) => format!("{e:#}"),
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (try 500ms, 30s, 5m)"))
}

/// Sizes: plain bytes, or a number with K/M/G (powers of 1024; `KiB`/`KB`/`k` alike).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 64MiB, 1G or 1048576"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {s:?}: use K, M or G"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `HOST[::GUEST][:ro|:rw]`.
pub fn parse_dir(s: &str) -> Result<DirSpec, String> {
    let (rest, writable) = if let Some(r) = s.strip_suffix(":rw") {
        (r, true)
    } else if let Some(r) = s.strip_suffix(":ro") {
        (r, false)
    } else {
        (s, false)
    };
    let (host, guest) = match rest.split_once("::") {
        Some((h, g)) => (h, g),
        None => (rest, rest),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!(
            "invalid --dir {s:?}: expected HOST[::GUEST][:ro|:rw]"
        ));
    }
    Ok(DirSpec {
        host: host.to_owned(),
        guest: guest.to_owned(),
        writable,
    })
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("invalid --env {s:?}: expected KEY=VALUE")),
    }
}

/// Where wasmtask keeps its data when nothing says otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WASMTASK_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("wasmtask");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/wasmtask");
    }
    PathBuf::from("wasmtask-data")
}

fn db_path(cli_db: &Option<PathBuf>) -> PathBuf {
    cli_db
        .clone()
        .unwrap_or_else(|| default_data_dir().join("wasmtask.db"))
}

/// Runs the parsed command on the current tokio runtime.
pub async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => crate::server::serve(args).await,
        Command::Run(args) => run(args, cli.output, &db_path(&cli.db)).await,
        Command::Ps(args) => ps(args, cli.output, &db_path(&cli.db)).await,
        Command::Show(args) => show(args, cli.output, &db_path(&cli.db)).await,
        Command::Plugins => plugins(cli.output),
    }
}

fn read_plugin(spec: &str) -> Result<(String, Vec<u8>), CliError> {
    let path = Path::new(spec);
    if path.exists() {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_owned());
        return Ok((name, bytes));
    }
    if let Some(p) = crate::builtin::find(spec) {
        return Ok((p.name.to_owned(), p.bytes.to_vec()));
    }
    Err(CliError::Usage(format!(
        "no such file or built-in plugin: {spec} (see `wasmtask plugins`)"
    )))
}

fn read_input(input: &Option<String>) -> Result<Option<serde_json::Value>, CliError> {
    let Some(text) = input else { return Ok(None) };
    let (text, from) = match text.strip_prefix('@') {
        Some(file) => (
            std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("cannot read input file {file}: {e}")))?,
            format!(" in {file}"),
        ),
        None => (text.clone(), String::new()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CliError::Usage(format!("--input is not valid JSON{from}: {e}")))
}

fn read_stdin_arg(stdin: &Option<String>) -> Result<Option<Stdin>, CliError> {
    match stdin.as_deref() {
        None => Ok(None),
        Some("-") => Ok(Some(Stdin::Reader(Box::new(tokio::io::stdin())))),
        Some(s) => match s.strip_prefix('@') {
            Some(file) => std::fs::read(file)
                .map(|b| Some(Stdin::Bytes(b)))
                .map_err(|e| CliError::Usage(format!("cannot read stdin file {file}: {e}"))),
            None => Err(CliError::Usage(format!(
                "invalid --stdin {s:?}: use @FILE or - (this process's stdin)"
            ))),
        },
    }
}

fn print_guest_event(ev: &GuestEvent) {
    match ev {
        GuestEvent::Log { level, message, .. } => eprintln!("[{level}] {message}"),
        GuestEvent::Dropped { count } => eprintln!("[warn] {count} guest events dropped (flood)"),
        _ => {}
    }
}

async fn open_db(path: &Path) -> Result<Db, CliError> {
    Db::open(path)
        .await
        .with_context(|| format!("cannot open the database {}", path.display()))
        .map_err(CliError::Other)
}

async fn run(args: RunArgs, output: OutputFormat, db_path: &Path) -> Result<ExitCode, CliError> {
    let (name, bytes) = read_plugin(&args.plugin)?;
    let input = read_input(&args.input)?;
    for d in &args.dirs {
        if !Path::new(&d.host).is_dir() {
            return Err(CliError::Usage(format!(
                "--dir {}: no such directory",
                d.host
            )));
        }
    }
    let stdin = read_stdin_arg(&args.stdin)?;
    let spec = TaskSpec {
        input,
        args: args.args.clone(),
        env: args.env.clone(),
        stdin: None,
        dirs: args.dirs.clone(),
        limits: Limits {
            timeout_ms: args
                .timeout
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            max_memory_bytes: args.max_memory,
            fuel: args.fuel,
        },
        grace_ms: args
            .grace
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ..TaskSpec::default()
    };

    let data_dir = db_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(data_dir.join("cache")),
        // One task: no need to reserve a large pool.
        max_concurrent: 4,
        ..RuntimeConfig::default()
    })
    .map_err(CliError::Other)?;
    let plugin = rt
        .load_async(bytes)
        .await
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.plugin)))?;
    let db = open_db(db_path).await?;
    let kind = exec::plugin_kind(plugin.kind());
    let plugin_id = plugin.digest().to_owned();
    db.upsert_plugin(PluginRow {
        id: plugin_id.clone(),
        name: name.clone(),
        kind,
        size_bytes: plugin.size() as u64,
        created_at: now_millis(),
    })
    .await?;
    let id = db::new_task_id();
    db.insert_task(NewTask {
        id: id.clone(),
        plugin_id,
        plugin_name: name.clone(),
        plugin_kind: kind,
        run_id: None,
        spec: spec.clone(),
        max_attempts: 1,
        queued_at: now_millis(),
    })
    .await?;
    match db.mark_started(&id).await? {
        StartDecision::Started(_) => {}
        StartDecision::NotStartable(r) => {
            return Err(CliError::Other(anyhow::anyhow!(
                "task {id} cannot start: it is {}",
                r.state
            )));
        }
    }

    let text = output == OutputFormat::Text;
    let (tx, rx) = tokio::sync::mpsc::channel(exec::EVENT_BUFFER);
    let observe: Option<exec::EventObserver> = if text {
        Some(Box::new(print_guest_event))
    } else {
        None
    };
    let pump = exec::pump_events(db.clone(), id.clone(), rx, observe);
    let io = LocalIo { tee: text, stdin };
    let request = exec::request(plugin, &name, &spec, io, Some(tx))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // Watch signals before the guest exists: a Ctrl+C during instantiation
    // must cancel and be recorded, not kill the process and leave the task
    // `running` in the database.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let running = match rt.spawn(request) {
        Ok(r) => r,
        Err(e) => {
            // Record the failure to start so the database never keeps a
            // `running` task that is not running.
            let f = crate::model::Finish {
                state: TaskState::Failed,
                finished_at: now_millis(),
                output: None,
                partial_output: None,
                progress: None,
                error: Some(crate::model::TaskError {
                    kind: crate::model::ErrorKind::HostError,
                    detail: None,
                    message: e.to_string(),
                }),
                exit_code: None,
                stdout: Default::default(),
                stderr: Default::default(),
                usage: Default::default(),
                cancel_stopped: None,
            };
            db.finish(&id, f).await?;
            return Err(CliError::Usage(e.to_string()));
        }
    };
    running.started().await;
    tracing::info!(task = %id, plugin = %name, "task started");
    let cancel = running.cancel_handle();
    let wait = running.wait();
    tokio::pin!(wait);
    let mut signals = 0u32;
    let report = loop {
        let sig = tokio::select! {
            report = &mut wait => break report,
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        signals += 1;
        let grace = if signals == 1 {
            args.grace.unwrap_or(Duration::ZERO)
        } else {
            Duration::ZERO
        };
        let reason = format!("interrupted by {sig}");
        // Stop first (latency), then record; the record is committed before
        // the final state is, since both happen on this task.
        cancel.cancel(reason.clone(), grace);
        if text {
            if grace.is_zero() {
                eprintln!("wasmtask: {sig}: stopping the guest");
            } else {
                eprintln!(
                    "wasmtask: {sig}: asking the guest to stop ({} grace; send again to force)",
                    humantime::format_duration(grace)
                );
            }
        }
        let decision = db
            .request_cancel(
                &id,
                db::CancelRequest {
                    actor: format!("signal:{sig}"),
                    reason,
                    grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
                    requested_at: now_millis(),
                },
            )
            .await?;
        if let CancelDecision::NotFound = decision {
            tracing::warn!(task = %id, "cancel of an unknown task");
        }
    };
    let _ = pump.await;
    let record = db.finish(&id, exec::finish(report)).await?;
    report_record(&record, output)?;
    Ok(exit_status(&record))
}

/// The process exit status for a finished task.
pub fn exit_status(r: &TaskRecord) -> ExitCode {
    match r.state {
        TaskState::Succeeded => ExitCode::SUCCESS,
        TaskState::TimedOut => ExitCode::from(124),
        TaskState::Canceled => ExitCode::from(130),
        _ => match r.exit_code {
            Some(code) if code != 0 => {
                ExitCode::from(u8::try_from(code.clamp(1, 255)).unwrap_or(1))
            }
            _ => ExitCode::from(1),
        },
    }
}

fn report_record(r: &TaskRecord, output: OutputFormat) -> Result<(), CliError> {
    if output == OutputFormat::Json {
        let text = serde_json::to_string_pretty(r).context("cannot serialize the record")?;
        println!("{text}");
        return Ok(());
    }
    if let Some(out) = &r.output {
        println!("{}", pretty(out));
    } else if r.state != TaskState::Succeeded
        && let Some(p) = &r.partial_output
    {
        println!("{}", pretty(p));
    }
    match r.state {
        TaskState::Succeeded => {}
        TaskState::Canceled => {
            let c = r.cancel.as_ref();
            let how = match c {
                Some(c) if c.forced => "stopped by force",
                Some(c) if c.acknowledged => "the guest stopped by itself",
                _ => "never started",
            };
            let latency = c
                .and_then(|c| c.latency_us)
                .map(|us| format!(" in {}", fmt_us(us)))
                .unwrap_or_default();
            let reason = c.map(|c| c.reason.as_str()).unwrap_or("canceled");
            eprintln!(
                "wasmtask: task {} canceled ({reason}): {how}{latency}",
                r.id
            );
            if r.output.is_none() && r.partial_output.is_some() {
                eprintln!("wasmtask: the output above is the last checkpoint");
            }
        }
        _ => {
            let msg = r
                .error
                .as_ref()
                .map(|e| {
                    let first = e.message.lines().next().unwrap_or("");
                    match &e.detail {
                        Some(d) => format!("{} ({d}): {first}", e.kind.as_str()),
                        None => format!("{}: {first}", e.kind.as_str()),
                    }
                })
                .unwrap_or_default();
            eprintln!("wasmtask: task {} {}: {msg}", r.id, r.state);
        }
    }
    if r.stdout.truncated || r.stderr.truncated {
        eprintln!(
            "wasmtask: output truncated in the record (stdout {} bytes, stderr {} bytes written)",
            r.stdout.total_bytes, r.stderr.total_bytes
        );
    }
    Ok(())
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

fn fmt_when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn ps(args: PsArgs, output: OutputFormat, db_path: &Path) -> Result<ExitCode, CliError> {
    let state = match &args.state {
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown state {s:?}: one of {}",
                TaskState::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
        None => None,
    };
    if !db_path.exists() {
        return Err(CliError::Usage(format!(
            "no database at {} (run a task first, or pass --db)",
            db_path.display()
        )));
    }
    let db = open_db(db_path).await?;
    let tasks = db
        .list_tasks(TaskFilter {
            state,
            plugin: args.plugin.clone(),
            limit: Some(args.limit),
            ..TaskFilter::default()
        })
        .await?;
    if output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tasks).context("serialize")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::from(
        "ID                             PLUGIN           STATE             QUEUED                DURATION  ERROR\n",
    );
    for t in &tasks {
        let duration = match (t.started_at, t.finished_at) {
            (Some(s), Some(f)) => fmt_us(u64::try_from((f - s).max(0)).unwrap_or(0) * 1000),
            (Some(_), None) => "…".to_owned(),
            _ => "-".to_owned(),
        };
        let error = t
            .error
            .as_ref()
            .map(|e| {
                e.detail
                    .clone()
                    .unwrap_or_else(|| e.kind.as_str().to_owned())
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<30} {:<16} {:<17} {:<21} {:>8}  {}\n",
            t.id,
            truncate(&t.plugin_name, 16),
            t.state.as_str(),
            fmt_when(t.queued_at),
            duration,
            error
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

async fn show(args: ShowArgs, output: OutputFormat, db_path: &Path) -> Result<ExitCode, CliError> {
    if !db_path.exists() {
        return Err(CliError::Usage(format!(
            "no database at {}",
            db_path.display()
        )));
    }
    let db = open_db(db_path).await?;
    let Some(r) = db.get_task(&args.id).await? else {
        return Err(CliError::Usage(format!("no task {}", args.id)));
    };
    if output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&r).context("serialize")?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::new();
    s.push_str(&format!("task      {}\n", r.id));
    s.push_str(&format!(
        "plugin    {} ({}, {})\n",
        r.plugin_name,
        r.plugin_kind.as_str(),
        r.plugin_id
    ));
    s.push_str(&format!("state     {}\n", r.state));
    s.push_str(&format!("attempt   {}/{}\n", r.attempt, r.max_attempts));
    s.push_str(&format!("queued    {}\n", fmt_when(r.queued_at)));
    if let Some(t) = r.started_at {
        s.push_str(&format!("started   {}\n", fmt_when(t)));
    }
    if let Some(t) = r.finished_at {
        s.push_str(&format!("finished  {}\n", fmt_when(t)));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(
            "error     {}{}: {}\n",
            e.kind.as_str(),
            e.detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            e.message.lines().next().unwrap_or("")
        ));
    }
    if let Some(code) = r.exit_code {
        s.push_str(&format!("exit code {code}\n"));
    }
    if let Some(c) = &r.cancel {
        s.push_str(&format!(
            "cancel    by {} at {}: {} (grace {} ms; {}{})\n",
            c.actor,
            fmt_when(c.requested_at),
            c.reason,
            c.grace_ms,
            if c.forced {
                "forced"
            } else if c.acknowledged {
                "acknowledged by the guest"
            } else {
                "not acted on by the guest"
            },
            c.latency_us
                .map(|us| format!(", stopped in {}", fmt_us(us)))
                .unwrap_or_default()
        ));
    }
    if let Some(p) = &r.progress {
        s.push_str(&format!(
            "progress  {:.0}% {}\n",
            p.fraction * 100.0,
            p.message
        ));
    }
    s.push_str(&format!(
        "memory    peak {} bytes\n",
        r.usage.peak_memory_bytes
    ));
    if let Some(f) = r.usage.fuel_consumed {
        s.push_str(&format!("fuel      {f} consumed\n"));
    }
    if let Some(o) = &r.output {
        s.push_str(&format!("output    {}\n", o));
    }
    if let Some(o) = &r.partial_output {
        s.push_str(&format!("partial   {}\n", o));
    }
    for (name, c) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        if c.total_bytes > 0 {
            s.push_str(&format!(
                "{name}    {} bytes{}\n",
                c.total_bytes,
                if c.truncated { " (truncated)" } else { "" }
            ));
            for line in String::from_utf8_lossy(&c.data).lines().take(20) {
                s.push_str(&format!("  | {line}\n"));
            }
        }
    }
    print!("{s}");
    Ok(ExitCode::SUCCESS)
}

fn plugins(output: OutputFormat) -> Result<ExitCode, CliError> {
    let list: Vec<_> = crate::builtin::PLUGINS
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "role": format!("{:?}", p.kind).to_lowercase(),
                "size_bytes": p.bytes.len(),
            })
        })
        .collect();
    if output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).context("serialize")?
        );
    } else {
        for p in crate::builtin::PLUGINS {
            println!(
                "{:<16} {:<8} {} bytes",
                p.name,
                format!("{:?}", p.kind).to_lowercase(),
                p.bytes.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether stderr is a terminal (colours, progress) — used by `main`.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("16k").unwrap(), 16 << 10);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn dirs_parse_host_guest_and_mode() {
        let d = parse_dir("/tmp/x::/data:rw").unwrap();
        assert_eq!(
            (d.host.as_str(), d.guest.as_str(), d.writable),
            ("/tmp/x", "/data", true)
        );
        let d = parse_dir("/tmp/x").unwrap();
        assert_eq!(
            (d.host.as_str(), d.guest.as_str(), d.writable),
            ("/tmp/x", "/tmp/x", false)
        );
        let d = parse_dir("src::.:ro").unwrap();
        assert_eq!((d.guest.as_str(), d.writable), (".", false));
        assert!(parse_dir("::x").is_err());
    }

    #[test]
    fn env_needs_key_and_equals() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("nokey").is_err());
        assert!(parse_env("=v").is_err());
    }
}
