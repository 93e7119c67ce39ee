//! The `wasmtask` command line: argument parsing, the local commands, and the
//! client commands that talk to a server.
//!
//! - Local (no server): `run` executes a plugin in this process and records it
//!   in the SQLite database (`--db`); Ctrl+C cancels the guest.
//! - `serve` starts the HTTP server (see `server.rs`).
//! - Client commands talk to a server over HTTP (`client.rs`; contract in
//!   docs/api.md): `submit`, `logs`, `cancel`, `abort`, `runs`, `plugins add`.
//!   They use `--server` / `WASMTASK_SERVER`, else `http://127.0.0.1:7480`,
//!   and send `--token` / `WASMTASK_TOKEN` as a bearer token.
//! - Read commands `ps`, `show` and `plugins [ls]` ask the server when
//!   `--server` (or `WASMTASK_SERVER`) is given, and otherwise read the local
//!   database / list the built-in plugins, as they did before there was a
//!   server.
//!
//! `submit --follow` streams the task's events (SSE, resumed with
//! `Last-Event-ID` when the connection drops), then prints the record like
//! `run` and exits like `run`. While it follows, Ctrl+C or SIGTERM cancels the
//! task *on the server* (the first signal with `--grace`, a second one forces
//! the stop, a third stops waiting) and the command keeps following until the
//! task has ended, so the exit status is the task's.
//!
//! Exit status (documented in `--help` and the README): 0 succeeded; a
//! command's own non-zero exit code is passed through; 1 any other failure
//! (trap, limit, guest error; for client commands also an unreachable server,
//! 401, 404, 409 or a server error); 2 usage or bad input (including the
//! server's 400/413/422 answers); 124 timed out; 130 canceled.
//!
//! HTTP is blocking (ureq) and runs on threads of its own, never on a tokio
//! worker and never on tokio's blocking pool: the runtime waits for that pool
//! when the process ends, and a request stuck on a dead server must not keep
//! the process alive after the user gave up on it.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use wasmtask_runtime::{GuestEvent, Runtime, RuntimeConfig, Stdin};

use crate::client::{Client, ClientError, EVENTS_PAGE, EventSource, Followed, TaskQuery};
use crate::db::{self, CancelDecision, Db, NewTask, PluginRow, StartDecision, TaskFilter};
use crate::exec::{self, LocalIo};
use crate::model::{
    ApiError, CancelBody, DirSpec, Event, EventKind, Limits, RunView, TaskRecord, TaskSpec,
    TaskState, TaskSubmit, now_millis,
};
use crate::progress::{Board, Lines};

#[derive(Debug, Parser)]
#[command(
    name = "wasmtask",
    version,
    about = "Run untrusted WebAssembly components as tasks and stop any one of them promptly",
    long_about = "Run untrusted WebAssembly components as tasks and stop any one of them promptly.\n\n\
                  `run` executes a plugin here and records it in a local SQLite database. \
                  `serve` starts the HTTP server; `submit`, `logs`, `cancel`, `abort`, `runs` and \
                  `plugins add` talk to it (--server, default http://127.0.0.1:7480). \
                  `ps`, `show` and `plugins` read the local database unless --server is given.",
    after_help = "Exit status: 0 succeeded; a command's own non-zero exit code is passed through; \
                  1 other failure (trap, limit, guest error, unreachable server, not found, conflict); \
                  2 usage or bad input (also the server's 400/413/422); 124 timed out; 130 canceled."
)]
pub struct Cli {
    /// Output format for results (json: one JSON document; for `logs`, one event per line).
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text, help_heading = "Global options")]
    pub output: OutputFormat,
    /// The SQLite database of local commands (default: $WASMTASK_DATA_DIR, else
    /// $XDG_DATA_HOME/wasmtask, else ~/.local/share/wasmtask, then `wasmtask.db` in it).
    #[arg(
        long,
        global = true,
        env = "WASMTASK_DB",
        help_heading = "Global options"
    )]
    pub db: Option<PathBuf>,
    /// The server of client commands, e.g. http://127.0.0.1:7480 (the default for `submit`,
    /// `logs`, `cancel`, `abort`, `runs`, `plugins add`). Given, `ps`, `show` and `plugins`
    /// ask it instead of the local database.
    #[arg(
        long,
        global = true,
        env = "WASMTASK_SERVER",
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub server: Option<String>,
    /// Bearer token sent with every request to the server (needed for changes when the
    /// server has one).
    #[arg(
        long,
        global = true,
        env = "WASMTASK_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Global options"
    )]
    pub token: Option<String>,
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
    /// Run a plugin locally (no server) and record the attempt.
    ///
    /// Ctrl+C or SIGTERM cancels the guest and records `canceled`: at once by default; with
    /// --grace the first signal asks the guest to stop and a second one (or the end of the
    /// grace) forces it.
    Run(RunArgs),
    /// Start the HTTP server.
    Serve(crate::server::ServeArgs),
    /// Submit a task to the server; print its id, or with --follow stream it to its end.
    ///
    /// With --follow the task's logs and progress appear on stderr as they happen, then its
    /// output is printed and the command exits as `run` would (0, the command's code, 1, 124,
    /// 130). Ctrl+C or SIGTERM cancels the task on the server (with --grace, the guest may stop
    /// by itself; a second signal forces it; a third stops waiting).
    ///
    /// --dir host paths are made absolute and must lie under a directory the server allows.
    Submit(SubmitArgs),
    /// List tasks, newest first (the server's with --server, else the local database's).
    Ps(PsArgs),
    /// Show one task's full record (the server's with --server, else the local database's).
    Show(ShowArgs),
    /// Print a task's events (or a run's, for an id starting with r_); -f follows them live.
    Logs(LogsArgs),
    /// Cancel a task on the server and print its state and cancel record.
    ///
    /// A queued task is canceled at once; a running one gets --grace (default: the grace it was
    /// submitted with, else none) to stop by itself before it is stopped by force. Exit 1 when
    /// the task does not exist or has already finished.
    Cancel(CancelArgs),
    /// Abort a run on the server: stop dispatching it and cancel all its tasks.
    Abort(AbortArgs),
    /// List the server's runs, newest first, or show one.
    Runs(RunsArgs),
    /// List plugins (the server's with --server, else the built-in ones), or add one to the
    /// server.
    Plugins(PluginsArgs),
    /// Run a pipeline manifest (TOML) locally, or submit it to a server as a run.
    ///
    /// See docs/pipelines.md for the format. `run` prints each step's output live on stderr
    /// and a summary table at the end; Ctrl+C aborts the whole pipeline (each running step
    /// gets its grace, a second Ctrl+C forces them). Exit status: 0 succeeded, 1 failed,
    /// 130 aborted, 2 a bad manifest (nothing ran).
    Pipeline(PipelineArgs),
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(subcommand)]
    pub command: PipelineCommand,
}

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Run the pipeline in this process (no server).
    Run(PipelineRunArgs),
    /// Send the pipeline to the server as a run (POST /v1/runs) and print the run id.
    Submit(PipelineSubmitArgs),
}

#[derive(Debug, Args)]
pub struct PipelineRunArgs {
    /// The manifest (TOML).
    pub file: PathBuf,
    /// Where the run's database, uploaded plugins and workspace copy go (default: a new
    /// directory under $WASMTASK_DATA_DIR/pipelines/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Let steps share this host directory too (the manifest's own directory always is).
    #[arg(long = "allow-dir")]
    pub allow_dirs: Vec<PathBuf>,
    /// Steps that may run at once.
    #[arg(long, default_value_t = 8)]
    pub max_running: usize,
}

#[derive(Debug, Args)]
pub struct PipelineSubmitArgs {
    /// The manifest (TOML). Paths in it are made absolute; the server must allow them.
    pub file: PathBuf,
}

/// What a task is asked to do and within which limits: shared by `run` and `submit`.
#[derive(Debug, Args)]
pub struct TaskFlags {
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
    /// Grace a cancel (Ctrl+C) gives the guest to stop by itself before it is stopped by
    /// force (default: none).
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Share a host directory: HOST[::GUEST][:ro|:rw] (read-only unless :rw; GUEST defaults to HOST).
    #[arg(long = "dir", value_parser = parse_dir)]
    pub dirs: Vec<DirSpec>,
    /// Set an environment variable in the guest (nothing is inherited).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The guest's working directory (a guest path, e.g. one of --dir's).
    #[arg(long)]
    pub cwd: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A component file (.wasm), or the name of a built-in plugin (see `wasmtask plugins`).
    pub plugin: String,
    #[command(flatten)]
    pub task: TaskFlags,
    /// The guest's stdin: @FILE, or - for this process's stdin (default: empty).
    #[arg(long)]
    pub stdin: Option<String>,
    /// Arguments for command plugins (after --).
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A plugin registered on the server, by name or id (see `wasmtask plugins --server URL`);
    /// a path (containing / or ending in .wasm) is uploaded first, as `plugins add` would.
    pub plugin: String,
    #[command(flatten)]
    pub task: TaskFlags,
    /// The guest's stdin: @FILE, - for this process's stdin, or the text itself (UTF-8;
    /// default: empty).
    #[arg(long)]
    pub stdin: Option<String>,
    /// A lock key: tasks sharing a key never run at the same time (repeatable).
    #[arg(long = "lock", value_name = "KEY")]
    pub locks: Vec<String>,
    /// Attempts allowed: a task whose server restarted under it is queued again while attempts
    /// remain (default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// Stream the task's events until it ends, then print its output and exit with its status.
    #[arg(short, long)]
    pub follow: bool,
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
    /// Only tasks of this run.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
    /// At most this many tasks.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The task id (t_…), or for `runs show` the run id (r_…).
    pub id: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A task id (t_…), or a run id (r_…) for the events of the run and all its tasks.
    pub id: String,
    /// Keep printing events as they happen until the task (run) ends; a dropped connection is
    /// resumed without gaps or duplicates.
    #[arg(short, long)]
    pub follow: bool,
    /// Only events after this sequence number (the first column of the text output).
    #[arg(long, value_name = "SEQ")]
    pub after: Option<i64>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The task id (t_…).
    pub id: String,
    /// Why (recorded with the cancel and shown to the guest).
    #[arg(long)]
    pub reason: Option<String>,
    /// Grace the guest gets to stop by itself before it is stopped by force (default: the
    /// task's own, else none). Repeating a cancel with a shorter grace (0s) forces it sooner.
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Wait up to this long for the task to reach `canceled` before answering.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct AbortArgs {
    /// The run id (r_…).
    pub id: String,
    /// Why (recorded with the abort and each task's cancel).
    #[arg(long)]
    pub reason: Option<String>,
    /// Grace each running task gets to stop by itself before it is stopped by force.
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Wait up to this long for every task of the run to end before answering.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunsArgs {
    /// At most this many runs.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Show one run and its tasks.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub command: Option<PluginsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List plugins (the default): the server's with --server, else those built into this binary.
    #[command(visible_alias = "list")]
    Ls,
    /// Register a component file with the server (usable by name with `submit`).
    Add(PluginAddArgs),
}

#[derive(Debug, Args)]
pub struct PluginAddArgs {
    /// The component file (.wasm).
    pub file: PathBuf,
    /// The name to register it under (default: the file name without its extension).
    #[arg(long)]
    pub name: Option<String>,
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

/// How a failed request is reported: the user's own input refused (a bad URL
/// or token, the server's 400/413/422) is a usage error (exit 2); anything
/// else exits 1, with a hint where one helps.
impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match &e {
            ClientError::BadUrl { .. } | ClientError::BadToken(_) => CliError::Usage(e.to_string()),
            ClientError::Api {
                status: 400 | 413 | 422,
                ..
            } => CliError::Usage(e.to_string()),
            ClientError::Unauthorized { token_sent, .. } => {
                CliError::Other(anyhow::anyhow!(if *token_sent {
                    "unauthorized: the server refused the token (check --token or WASMTASK_TOKEN)"
                } else {
                    "unauthorized: pass --token or set WASMTASK_TOKEN"
                }))
            }
            ClientError::Unreachable { .. } => CliError::Other(anyhow::anyhow!(
                "{e} (is `wasmtask serve` running there? see --server)"
            )),
            _ => CliError::Other(anyhow::Error::new(e)),
        }
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

/// Where client commands send their requests.
#[derive(Debug, Clone, Default)]
struct Remote {
    /// `--server` / `WASMTASK_SERVER`; `None` means local for read commands
    /// and [`crate::server::DEFAULT_LISTEN`] for the others.
    server: Option<String>,
    token: Option<String>,
}

impl Remote {
    fn client(&self) -> Result<Client, CliError> {
        let url = self
            .server
            .clone()
            .unwrap_or_else(|| format!("http://{}", crate::server::DEFAULT_LISTEN));
        Ok(Client::new(&url, self.token.clone())?)
    }

    /// The client, when read commands should ask a server.
    fn explicit(&self) -> Result<Option<Client>, CliError> {
        match self.server {
            Some(_) => self.client().map(Some),
            None => Ok(None),
        }
    }
}

/// Runs the parsed command on the current tokio runtime.
pub async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    // An empty variable (`WASMTASK_SERVER=`) counts as unset.
    let remote = Remote {
        server: cli.server.filter(|s| !s.trim().is_empty()),
        token: cli.token.filter(|t| !t.is_empty()),
    };
    let output = cli.output;
    match cli.command {
        Command::Run(args) => run(args, output, &db_path(&cli.db)).await,
        Command::Serve(args) => crate::server::serve(args).await,
        Command::Submit(args) => submit(args, output, &remote).await,
        Command::Ps(args) => match remote.explicit()? {
            Some(client) => ps_remote(args, output, &client).await,
            None => ps(args, output, &db_path(&cli.db)).await,
        },
        Command::Show(args) => match remote.explicit()? {
            Some(client) => show_remote(args, output, &client).await,
            None => show(args, output, &db_path(&cli.db)).await,
        },
        Command::Logs(args) => logs(args, output, &remote.client()?).await,
        Command::Cancel(args) => cancel(args, output, &remote.client()?).await,
        Command::Abort(args) => abort(args, output, &remote.client()?).await,
        Command::Runs(args) => runs(args, output, &remote.client()?).await,
        Command::Pipeline(args) => match args.command {
            PipelineCommand::Run(a) => {
                crate::pipeline::run_local(
                    &a.file,
                    crate::pipeline::LocalOptions {
                        data_dir: a.data_dir,
                        allow_dirs: a.allow_dirs,
                        max_running: a.max_running,
                    },
                    output,
                )
                .await
            }
            PipelineCommand::Submit(a) => {
                crate::pipeline::submit(&a.file, output, &remote.client()?).await
            }
        },
        Command::Plugins(args) => match args.command {
            Some(PluginsCommand::Add(add)) => plugins_add(add, output, &remote.client()?).await,
            Some(PluginsCommand::Ls) | None => match remote.explicit()? {
                Some(client) => plugins_remote(output, &client).await,
                None => plugins(output),
            },
        },
    }
}

fn read_plugin(spec: &str) -> Result<(String, Vec<u8>), CliError> {
    let path = Path::new(spec);
    if path.exists() {
        return read_plugin_file(path);
    }
    if let Some(p) = crate::builtin::find(spec) {
        return Ok((p.name.to_owned(), p.bytes.to_vec()));
    }
    Err(CliError::Usage(format!(
        "no such file or built-in plugin: {spec} (see `wasmtask plugins`)"
    )))
}

/// A component file and the name it goes by (its stem).
fn read_plugin_file(path: &Path) -> Result<(String, Vec<u8>), CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok((name, bytes))
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn limits(flags: &TaskFlags) -> Limits {
    Limits {
        timeout_ms: flags.timeout.map(millis),
        max_memory_bytes: flags.max_memory,
        fuel: flags.fuel,
    }
}

async fn run(args: RunArgs, output: OutputFormat, db_path: &Path) -> Result<ExitCode, CliError> {
    let (name, bytes) = read_plugin(&args.plugin)?;
    let input = read_input(&args.task.input)?;
    for d in &args.task.dirs {
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
        env: args.task.env.clone(),
        stdin: None,
        dirs: args.task.dirs.clone(),
        cwd: args.task.cwd.clone(),
        limits: limits(&args.task),
        grace_ms: args.task.grace.map(millis),
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
            args.task.grace.unwrap_or(Duration::ZERO)
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
    // The guest's last events, if the pump still held them, go with the end.
    let tail = pump.await.unwrap_or_default();
    let record = db
        .finish_with_events(&id, exec::finish(report), tail)
        .await?;
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
    let state = parse_state(&args.state)?;
    if !db_path.exists() {
        return Err(CliError::Usage(format!(
            "no database at {} (run a task first, pass --db, or ask a server with --server)",
            db_path.display()
        )));
    }
    let db = open_db(db_path).await?;
    let tasks = db
        .list_tasks(TaskFilter {
            state,
            plugin: args.plugin.clone(),
            run_id: args.run.clone(),
            limit: Some(args.limit),
            ..TaskFilter::default()
        })
        .await?;
    print_tasks(&tasks, output)
}

fn parse_state(state: &Option<String>) -> Result<Option<TaskState>, CliError> {
    match state {
        Some(s) => Ok(Some(TaskState::parse(s).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown state {s:?}: one of {}",
                TaskState::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?)),
        None => Ok(None),
    }
}

fn print_tasks(tasks: &[TaskRecord], output: OutputFormat) -> Result<ExitCode, CliError> {
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
    for t in tasks {
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

/// The `cancel` line of `show` and `cancel`.
fn cancel_line(c: &crate::model::CancelRecord, state: TaskState) -> String {
    format!(
        "cancel    by {} at {}: {} (grace {} ms; {}{})\n",
        c.actor,
        fmt_when(c.requested_at),
        c.reason,
        c.grace_ms,
        if c.forced {
            "forced"
        } else if c.acknowledged {
            "acknowledged by the guest"
        } else if state.is_terminal() {
            "not acted on by the guest"
        } else {
            "in progress"
        },
        c.latency_us
            .map(|us| format!(", stopped in {}", fmt_us(us)))
            .unwrap_or_default()
    )
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
    print_task(&r, output)
}

fn print_task(r: &TaskRecord, output: OutputFormat) -> Result<ExitCode, CliError> {
    if output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(r).context("serialize")?);
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
        s.push_str(&cancel_line(c, r.state));
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

// ---------------------------------------------------------------------------
// Client commands: requests to a server (client.rs).
// ---------------------------------------------------------------------------

/// Runs blocking client work on a thread of its own (see the module doc) and
/// waits for it without blocking the runtime. The outer error is this
/// process's trouble, the inner one the request's.
async fn call<T, F>(client: &Client, work: F) -> Result<Result<T, ClientError>, CliError>
where
    T: Send + 'static,
    F: FnOnce(&Client) -> Result<T, ClientError> + Send + 'static,
{
    let client = client.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wasmtask-http".into())
        .spawn(move || {
            let _ = tx.send(work(&client));
        })
        .context("cannot start an HTTP thread")?;
    rx.await
        .map_err(|_| CliError::Other(anyhow::anyhow!("the HTTP thread ended without an answer")))
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).context("cannot serialize the answer")?;
    println!("{text}");
    Ok(())
}

/// The `POST /v1/tasks` body for `submit`'s flags: the same flags as `run`,
/// with `--dir` host paths made absolute (the server does not share this
/// process's working directory) and `--stdin` read into text.
pub fn task_submit(args: &SubmitArgs) -> Result<TaskSubmit, CliError> {
    let mut dirs = Vec::with_capacity(args.task.dirs.len());
    for d in &args.task.dirs {
        let host = std::path::absolute(&d.host)
            .map_err(|e| CliError::Usage(format!("--dir {}: {e}", d.host)))?
            .into_os_string()
            .into_string()
            .map_err(|_| CliError::Usage(format!("--dir {}: the path is not UTF-8", d.host)))?;
        dirs.push(DirSpec {
            host,
            guest: d.guest.clone(),
            writable: d.writable,
        });
    }
    Ok(TaskSubmit {
        plugin: args.plugin.clone(),
        input: read_input(&args.task.input)?,
        args: args.args.clone(),
        // A repeated --env KEY: the last one wins, as in a shell.
        env: args.task.env.iter().cloned().collect(),
        stdin: read_stdin_text(&args.stdin)?,
        dirs,
        cwd: args.task.cwd.clone(),
        limits: limits(&args.task),
        grace_ms: args.task.grace.map(millis),
        locks: args.locks.clone(),
        max_attempts: args.max_attempts,
        ..TaskSubmit::default()
    })
}

/// `--stdin` of `submit`: @FILE, - (this process's stdin) or the text itself.
/// The API carries stdin as text, so it must be UTF-8.
fn read_stdin_text(stdin: &Option<String>) -> Result<Option<String>, CliError> {
    match stdin.as_deref() {
        None => Ok(None),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Usage(format!("cannot read stdin as UTF-8 text: {e}")))?;
            Ok(Some(text))
        }
        Some(s) => match s.strip_prefix('@') {
            Some(file) => {
                let bytes = std::fs::read(file)
                    .map_err(|e| CliError::Usage(format!("cannot read stdin file {file}: {e}")))?;
                String::from_utf8(bytes).map(Some).map_err(|_| {
                    CliError::Usage(format!(
                        "stdin file {file} is not UTF-8 text (the API carries stdin as text)"
                    ))
                })
            }
            None => Ok(Some(s.to_owned())),
        },
    }
}

/// A `submit` plugin argument that names a file to upload rather than a
/// plugin registered on the server.
fn plugin_path(spec: &str) -> Option<&Path> {
    (spec.contains('/') || spec.ends_with(".wasm")).then(|| Path::new(spec))
}

async fn submit(
    args: SubmitArgs,
    output: OutputFormat,
    remote: &Remote,
) -> Result<ExitCode, CliError> {
    let client = remote.client()?;
    let text = output == OutputFormat::Text;
    let mut body = task_submit(&args)?;
    if let Some(path) = plugin_path(&args.plugin) {
        let (name, bytes) = read_plugin_file(path)?;
        let added = call(&client, move |c| c.add_plugin(&name, &bytes)).await??;
        if text {
            eprintln!(
                "wasmtask: uploaded {} as {} ({})",
                path.display(),
                added.plugin.name,
                added.plugin.id
            );
        }
        body.plugin = added.plugin.id;
    }
    if !args.follow {
        let record = call(&client, move |c| c.submit_task(&body)).await??;
        if text {
            println!("{}", record.id);
        } else {
            print_json(&record)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow_submission(client, body, args.task.grace, output).await
}

/// `submit --follow`: submit, stream the events, turn signals into cancels on
/// the server, and finish like `run`.
async fn follow_submission(
    client: Client,
    body: TaskSubmit,
    grace: Option<Duration>,
    output: OutputFormat,
) -> Result<ExitCode, CliError> {
    let text = output == OutputFormat::Text;
    // Watch signals before submitting: a Ctrl+C while the submission is in
    // flight must cancel the task once it exists, not kill this process and
    // leave the task running unwatched.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let submitted = call(&client, move |c| c.submit_task(&body));
    tokio::pin!(submitted);
    let mut early = Vec::new();
    let record = loop {
        tokio::select! {
            r = &mut submitted => break r??,
            _ = sigint.recv() => early.push("SIGINT"),
            _ = sigterm.recv() => early.push("SIGTERM"),
        }
    };
    let id = record.id.clone();
    if text {
        eprintln!(
            "wasmtask: submitted {id} ({} on {})",
            record.plugin_name,
            client.base()
        );
    }
    // On a terminal the task's progress is a live bar (progress.rs); the
    // canceller's messages then print above it.
    let board = if text { Board::on_stderr() } else { None };
    let mut canceller = Canceller {
        client: client.clone(),
        id: id.clone(),
        grace,
        text,
        signals: 0,
        lines: board.as_ref().map(Board::lines),
    };
    for sig in early {
        if !canceller.signal(sig) {
            return Ok(ExitCode::from(130));
        }
    }

    let source = EventSource::Task(id.clone());
    let label = record.plugin_name.clone();
    let followed = call(&client, move |c| {
        let mut printer = FollowPrinter::new(board, label);
        let result = c.follow_events(&source, None, &mut |item| {
            if text {
                printer.item(item);
            }
        });
        printer.clear();
        result
    });
    tokio::pin!(followed);
    let followed = loop {
        let sig = tokio::select! {
            r = &mut followed => break r?,
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        if !canceller.signal(sig) {
            return Ok(ExitCode::from(130));
        }
    };
    if let Err(e) = followed {
        return Err(CliError::Other(anyhow::anyhow!(
            "lost the events of task {id}: {}; it may still be running (see `wasmtask logs -f {id}`)",
            CliError::from(e).message()
        )));
    }
    let record = {
        let id = id.clone();
        call(&client, move |c| c.get_task(&id)).await??
    };
    if !record.state.is_terminal() {
        return Err(CliError::Other(anyhow::anyhow!(
            "the event stream of task {id} ended but the task is {}",
            record.state
        )));
    }
    if text {
        // A command's output was captured on the server; show it as `run` would have.
        let _ = std::io::stdout().write_all(&record.stdout.data);
        let _ = std::io::stderr().write_all(&record.stderr.data);
    }
    report_record(&record, output)?;
    Ok(exit_status(&record))
}

/// Turns the signals `submit --follow` receives into cancels on the server.
struct Canceller {
    client: Client,
    id: String,
    grace: Option<Duration>,
    text: bool,
    signals: u32,
    /// Where lines go while a progress bar is drawn.
    lines: Option<Lines>,
}

impl Canceller {
    fn say(&self, line: &str) {
        match &self.lines {
            Some(l) => l.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Handles one signal; `false` means stop waiting (the third one).
    fn signal(&mut self, sig: &'static str) -> bool {
        self.signals += 1;
        let id = self.id.clone();
        if self.signals >= 3 {
            self.say(&format!(
                "wasmtask: {sig} again: no longer waiting; task {id} is being canceled on the \
                 server (see `wasmtask logs -f {id}`)"
            ));
            return false;
        }
        // The first signal grants --grace; a second forces the stop.
        let grace_ms = if self.signals == 1 {
            self.grace.map(millis)
        } else {
            Some(0)
        };
        if self.text {
            self.say(&match grace_ms {
                Some(0) => format!("wasmtask: {sig}: stopping task {id} (forced)"),
                Some(g) => format!(
                    "wasmtask: {sig}: asking task {id} to stop ({} grace; send again to force)",
                    humantime::format_duration(Duration::from_millis(g))
                ),
                None => format!("wasmtask: {sig}: canceling task {id} (send again to force)"),
            });
        }
        let body = CancelBody {
            reason: Some(format!("interrupted by {sig}")),
            grace_ms,
            wait_ms: None,
        };
        let client = self.client.clone();
        let lines = self.lines.clone();
        // The follow goes on meanwhile: it reports how the cancel ends.
        tokio::spawn(async move {
            let say = |line: String| match &lines {
                Some(l) => l.println(&line),
                None => eprintln!("{line}"),
            };
            let outcome = call(&client, {
                let id = id.clone();
                move |c| c.cancel_task(&id, &body)
            })
            .await;
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.code() == Some("task_finished") => {}
                Ok(Err(e)) => say(format!(
                    "wasmtask: cannot cancel task {id}: {}",
                    CliError::from(e).message()
                )),
                Err(e) => say(format!(
                    "wasmtask: cannot cancel task {id}: {}",
                    e.message()
                )),
            }
        });
        true
    }
}

/// What `submit --follow` shows on stderr while a task runs: guest logs as
/// `run` shows them, the state changes worth knowing, and progress. On a
/// terminal progress is a live bar ([`Board`]) with the lines scrolling
/// above it; otherwise progress is a plain line, at most one a second (a
/// guest may report progress thousands of times a second).
struct FollowPrinter {
    board: Option<Board>,
    /// The bar's label (the plugin's name).
    label: String,
    last_progress: Option<std::time::Instant>,
}

impl FollowPrinter {
    fn new(board: Option<Board>, label: String) -> FollowPrinter {
        FollowPrinter {
            board,
            label,
            last_progress: None,
        }
    }

    fn item(&mut self, item: Followed<'_>) {
        let line = match item {
            Followed::Event(ev) => {
                if let Some(b) = self.board.as_mut() {
                    b.event(ev, &self.label);
                    if ev.kind == EventKind::TaskProgress {
                        return;
                    }
                } else if ev.kind == EventKind::TaskProgress {
                    return self.progress(&format!("[progress {}]", progress_text(&ev.data)));
                }
                match follow_line(ev) {
                    Some(line) => line,
                    None => return,
                }
            }
            Followed::Reconnecting { error, delay } => format!(
                "wasmtask: lost the event stream ({error}); reconnecting in {}",
                humantime::format_duration(delay)
            ),
        };
        match &self.board {
            Some(b) => b.println(&line),
            None => eprintln!("{line}"),
        }
    }

    /// A progress line without a terminal: at most one a second.
    fn progress(&mut self, line: &str) {
        let now = std::time::Instant::now();
        if self
            .last_progress
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_progress = Some(now);
        eprintln!("{line}");
    }

    /// Removes the progress bar before the final report.
    fn clear(&mut self) {
        if let Some(b) = self.board.as_mut() {
            b.clear();
        }
    }
}

fn follow_line(ev: &Event) -> Option<String> {
    let requeued = ev.data.get("requeued").and_then(Value::as_bool) == Some(true);
    match ev.kind {
        // A line of the guest's stdout/stderr: the final report prints the
        // captured output whole (`logs` shows these lines).
        EventKind::TaskLog if ev.data.get("stream").is_some() => None,
        EventKind::TaskLog => Some(log_text(&ev.data)),
        EventKind::TaskProgress => Some(format!("[progress {}]", progress_text(&ev.data))),
        // The final report covers the end; checkpoints and the first queued
        // event say nothing a person following needs.
        EventKind::TaskQueued if !requeued => None,
        EventKind::TaskCheckpoint
        | EventKind::TaskSucceeded
        | EventKind::TaskFailed
        | EventKind::TaskTimedOut
        | EventKind::TaskCanceled => None,
        _ => Some(format!("wasmtask: {}", event_summary(ev))),
    }
}

/// One event in a line of words, from the data the server records with it
/// (also the dashboard's event trail).
pub(crate) fn event_summary(ev: &Event) -> String {
    let d = &ev.data;
    let text = |k: &str| d.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let num = |k: &str| d.get(k).and_then(Value::as_u64);
    let latency = || {
        num("latency_us")
            .map(|us| format!(" in {}", fmt_us(us)))
            .unwrap_or_default()
    };
    match ev.kind {
        EventKind::TaskQueued => {
            if d.get("requeued").and_then(Value::as_bool) == Some(true) {
                format!(
                    "queued again after {} (attempt {} did not finish)",
                    text("reason").unwrap_or("a host restart"),
                    num("attempt").unwrap_or(1)
                )
            } else {
                match text("plugin") {
                    Some(p) => format!("queued ({p})"),
                    None => "queued".to_owned(),
                }
            }
        }
        EventKind::TaskStarted => match num("attempt") {
            Some(a) if a > 1 => format!("started (attempt {a})"),
            _ => "started".to_owned(),
        },
        EventKind::TaskLog => log_text(d),
        EventKind::TaskProgress => progress_text(d),
        EventKind::TaskCheckpoint => match num("bytes") {
            Some(b) => format!("checkpoint saved ({b} bytes)"),
            None => "checkpoint saved".to_owned(),
        },
        EventKind::TaskCancelRequested => {
            let mut s = format!(
                "cancel requested by {}: {}",
                text("actor").unwrap_or("?"),
                text("reason").unwrap_or("no reason given")
            );
            if let Some(g) = num("grace_ms").filter(|g| *g > 0) {
                s.push_str(&format!(
                    " ({} grace)",
                    humantime::format_duration(Duration::from_millis(g))
                ));
            }
            if d.get("escalated").and_then(Value::as_bool) == Some(true) {
                s.push_str(", forcing it sooner");
            }
            s
        }
        EventKind::TaskCancelAcknowledged => format!("the guest stopped by itself{}", latency()),
        EventKind::TaskCancelForced => format!("stopped by force{}", latency()),
        EventKind::TaskCancelFailed => format!(
            "the cancel could not be delivered: {}",
            text("reason")
                .or(text("message"))
                .map(str::to_owned)
                .unwrap_or_else(|| compact(d))
        ),
        EventKind::TaskSucceeded => "succeeded".to_owned(),
        EventKind::TaskFailed | EventKind::TaskTimedOut | EventKind::TaskCanceled => {
            let state = ev
                .kind
                .as_str()
                .trim_start_matches("task.")
                .replace('_', " ");
            let mut s = state;
            // A canceled task's error kind is `canceled`: saying so twice adds nothing.
            if let Some(e) = d
                .get("error")
                .filter(|e| e.get("kind").and_then(Value::as_str) != Some("canceled"))
            {
                let kind = e.get("kind").and_then(Value::as_str).unwrap_or("error");
                match e.get("detail").and_then(Value::as_str) {
                    Some(detail) => s.push_str(&format!(": {kind} ({detail})")),
                    None => s.push_str(&format!(": {kind}")),
                }
            }
            if let Some(code) = d.get("exit_code").and_then(Value::as_i64) {
                s.push_str(&format!(", exit code {code}"));
            }
            if let Some(reason) = d
                .get("cancel")
                .and_then(|c| c.get("reason"))
                .and_then(Value::as_str)
            {
                s.push_str(&format!(" ({reason})"));
            }
            s
        }
        EventKind::TaskLockAcquired => format!("lock acquired{}", lock_keys(d)),
        EventKind::TaskLockReleased => format!("lock released{}", lock_keys(d)),
        EventKind::RunCreated => match text("name") {
            Some(n) => format!("run created ({n})"),
            None => "run created".to_owned(),
        },
        EventKind::RunAbortRequested => match (text("actor"), text("reason")) {
            (Some(a), Some(r)) => format!("abort requested by {a}: {r}"),
            _ => format!("abort requested {}", compact(d))
                .trim_end()
                .to_owned(),
        },
        EventKind::RunFinished => match text("state") {
            Some(s) => format!("run finished: {s}"),
            None => format!("run finished {}", compact(d)).trim_end().to_owned(),
        },
    }
}

/// `[level] message k=v …` of a `task.log` event.
fn log_text(d: &Value) -> String {
    let level = d.get("level").and_then(Value::as_str).unwrap_or("info");
    let message = d.get("message").and_then(Value::as_str).unwrap_or("");
    let mut s = format!("[{level}] {message}");
    if let Some(fields) = d.get("fields").and_then(Value::as_object) {
        for (k, v) in fields {
            match v.as_str() {
                Some(v) => s.push_str(&format!(" {k}={v}")),
                None => s.push_str(&format!(" {k}={v}")),
            }
        }
    }
    s
}

/// `42% message` of a `task.progress` event.
fn progress_text(d: &Value) -> String {
    let fraction = d.get("fraction").and_then(Value::as_f64).unwrap_or(0.0);
    let message = d.get("message").and_then(Value::as_str).unwrap_or("");
    format!("{:.0}% {message}", fraction * 100.0)
        .trim_end()
        .to_owned()
}

fn lock_keys(d: &Value) -> String {
    if let Some(k) = d.get("key").and_then(Value::as_str) {
        return format!(": {k}");
    }
    if let Some(keys) = d.get("keys").and_then(Value::as_array) {
        let keys: Vec<_> = keys.iter().filter_map(Value::as_str).collect();
        return format!(": {}", keys.join(", "));
    }
    let c = compact(d);
    if c.is_empty() { c } else { format!(" {c}") }
}

/// Event data as compact JSON, or nothing when there is none.
fn compact(d: &Value) -> String {
    match d {
        Value::Null => String::new(),
        Value::Object(m) if m.is_empty() => String::new(),
        other => other.to_string(),
    }
}

fn fmt_when_millis(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// One line of `logs`: `SEQ TIME [TASK] KIND SUMMARY`, or the event as JSON.
fn log_line(ev: &Event, output: OutputFormat, with_task: bool) -> String {
    if output == OutputFormat::Json {
        return serde_json::to_string(ev).unwrap_or_default();
    }
    // Task ids are 28 characters; a run's own events leave the column blank.
    let task = if with_task {
        format!("{:<28}  ", ev.task_id.as_deref().unwrap_or("-"))
    } else {
        String::new()
    };
    format!(
        "{:>6}  {}  {task}{:<24}  {}",
        ev.seq,
        fmt_when_millis(ev.at),
        ev.kind.as_str(),
        event_summary(ev)
    )
}

/// Prints a line on stdout; a closed pipe (`wasmtask logs -f … | head`) ends
/// the process quietly instead of panicking.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

async fn logs(args: LogsArgs, output: OutputFormat, client: &Client) -> Result<ExitCode, CliError> {
    let source = EventSource::for_id(&args.id);
    let with_task = matches!(source, EventSource::Run(_));
    if args.follow {
        let after = args.after;
        // On a terminal each running task gets a live bar on stderr; its
        // progress events then stop printing as lines when stdout is that
        // terminal too (a file or pipe still gets every line).
        let board = if output == OutputFormat::Text {
            Board::on_stderr()
        } else {
            None
        };
        let stdout_tty = std::io::stdout().is_terminal();
        call(client, move |c| {
            let mut board = board;
            // Bars are labelled with the task's key in a run, else its plugin.
            let labels: std::collections::HashMap<String, String> = match (&board, &source) {
                (None, _) => Default::default(),
                (Some(_), EventSource::Run(id)) => c
                    .get_run(id)
                    .map(|v| {
                        v.tasks
                            .into_iter()
                            .map(|t| (t.id, t.spec.key.unwrap_or(t.plugin_name)))
                            .collect()
                    })
                    .unwrap_or_default(),
                (Some(_), EventSource::Task(id)) => c
                    .get_task(id)
                    .map(|t| [(t.id, t.plugin_name)].into_iter().collect())
                    .unwrap_or_default(),
            };
            let result = c.follow_events(&source, after, &mut |item| match item {
                Followed::Event(ev) => {
                    let line = log_line(ev, output, with_task);
                    match board.as_mut() {
                        Some(b) => {
                            if let Some(t) = &ev.task_id {
                                let label = labels.get(t).map_or(short_id(t), String::as_str);
                                b.event(ev, label);
                            }
                            if stdout_tty {
                                if ev.kind != EventKind::TaskProgress {
                                    b.suspend(|| print_line(&line));
                                }
                            } else {
                                print_line(&line);
                            }
                        }
                        None => print_line(&line),
                    }
                }
                Followed::Reconnecting { error, delay } => {
                    let line = format!(
                        "wasmtask: lost the event stream ({error}); reconnecting in {}",
                        humantime::format_duration(delay)
                    );
                    match &board {
                        Some(b) => b.println(&line),
                        None => eprintln!("{line}"),
                    }
                }
            });
            if let Some(b) = board.as_mut() {
                b.clear();
            }
            result
        })
        .await??;
        return Ok(ExitCode::SUCCESS);
    }
    let mut after = args.after;
    loop {
        let src = source.clone();
        let page = call(client, move |c| c.events_page(&src, after, EVENTS_PAGE)).await??;
        for ev in &page.events {
            print_line(&log_line(ev, output, with_task));
        }
        match page.last_seq {
            Some(last) if Some(last) != after => after = Some(last),
            _ => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first characters of a task id, enough to tell tasks apart on a bar.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A `409` answer to `cancel`/`abort`: the body as JSON for scripts, else a
/// line on stderr; exit 1 either way.
fn report_conflict(
    error: &ApiError,
    output: OutputFormat,
    line: String,
) -> Result<ExitCode, CliError> {
    if output == OutputFormat::Json {
        print_json(error)?;
    } else {
        eprintln!("wasmtask: {line}");
    }
    Ok(ExitCode::from(1))
}

async fn cancel(
    args: CancelArgs,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let body = CancelBody {
        reason: args.reason.clone(),
        grace_ms: args.grace.map(millis),
        wait_ms: args.wait.map(millis),
    };
    let id = args.id.clone();
    match call(client, move |c| c.cancel_task(&id, &body)).await? {
        Ok(reply) => {
            let r = &reply.task;
            if output == OutputFormat::Json {
                print_json(r)?;
            } else {
                let mut s = format!("task      {}\nstate     {}\n", r.id, r.state);
                if let Some(c) = &r.cancel {
                    s.push_str(&cancel_line(c, r.state));
                }
                print!("{s}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Api { status: 409, error }) if error.code == "task_finished" => {
            let state = error
                .task
                .as_ref()
                .map(|t| t.state.as_str())
                .unwrap_or("unknown state");
            let line = format!("task {} already finished: {state}", args.id);
            report_conflict(&error, output, line)
        }
        Err(e) => Err(e.into()),
    }
}

async fn abort(
    args: AbortArgs,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let body = CancelBody {
        reason: args.reason.clone(),
        grace_ms: args.grace.map(millis),
        wait_ms: args.wait.map(millis),
    };
    let id = args.id.clone();
    match call(client, move |c| c.abort_run(&id, &body)).await? {
        Ok(reply) => {
            print_run_view(&reply.view, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Api { status: 409, error }) => {
            let line = error.message.clone();
            report_conflict(&error, output, line)
        }
        Err(e) => Err(e.into()),
    }
}

fn print_run_view(v: &RunView, output: OutputFormat) -> Result<(), CliError> {
    if output == OutputFormat::Json {
        return print_json(v);
    }
    let r = &v.run;
    let mut s = format!("run       {}", r.id);
    if let Some(n) = &r.name {
        s.push_str(&format!(" ({n})"));
    }
    s.push('\n');
    s.push_str(&format!(
        "state     {}{}\n",
        r.state.as_str(),
        if r.fail_fast { " (fail-fast)" } else { "" }
    ));
    s.push_str(&format!("created   {}\n", fmt_when(r.created_at)));
    if let Some(t) = r.finished_at {
        s.push_str(&format!("finished  {}\n", fmt_when(t)));
    }
    if let Some(a) = &r.abort {
        s.push_str(&format!(
            "abort     by {} at {}: {}\n",
            a.actor,
            fmt_when(a.requested_at),
            a.reason
        ));
    }
    s.push_str("\nKEY              TASK                            STATE\n");
    for t in &v.tasks {
        s.push_str(&format!(
            "{:<16} {:<31} {}\n",
            truncate(t.spec.key.as_deref().unwrap_or("-"), 16),
            t.id,
            t.state.as_str()
        ));
    }
    print!("{s}");
    Ok(())
}

async fn runs(args: RunsArgs, output: OutputFormat, client: &Client) -> Result<ExitCode, CliError> {
    if let Some(RunsCommand::Show(show)) = args.command {
        let view = call(client, move |c| c.get_run(&show.id)).await??;
        print_run_view(&view, output)?;
        return Ok(ExitCode::SUCCESS);
    }
    let limit = args.limit;
    let runs = call(client, move |c| c.list_runs(Some(limit))).await??;
    if output == OutputFormat::Json {
        print_json(&runs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::from(
        "ID                             NAME             STATE      CREATED               FINISHED\n",
    );
    for r in &runs {
        s.push_str(&format!(
            "{:<30} {:<16} {:<10} {:<21} {}\n",
            r.id,
            truncate(r.name.as_deref().unwrap_or("-"), 16),
            r.state.as_str(),
            fmt_when(r.created_at),
            r.finished_at
                .map(fmt_when)
                .unwrap_or_else(|| "-".to_owned())
        ));
    }
    print!("{s}");
    Ok(ExitCode::SUCCESS)
}

async fn ps_remote(
    args: PsArgs,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let state = parse_state(&args.state)?;
    let mut tasks: Vec<TaskRecord> = Vec::new();
    let mut cursor = None;
    while tasks.len() < args.limit {
        let query = TaskQuery {
            state,
            run: args.run.clone(),
            plugin: args.plugin.clone(),
            limit: Some((args.limit - tasks.len()).min(db::MAX_TASKS_PAGE)),
            cursor: cursor.take(),
        };
        let page = call(client, move |c| c.list_tasks(&query)).await??;
        let empty = page.tasks.is_empty();
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(next) if !empty => cursor = Some(next),
            _ => break,
        }
    }
    tasks.truncate(args.limit);
    print_tasks(&tasks, output)
}

async fn show_remote(
    args: ShowArgs,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let r = call(client, move |c| c.get_task(&args.id)).await??;
    print_task(&r, output)
}

async fn plugins_remote(output: OutputFormat, client: &Client) -> Result<ExitCode, CliError> {
    let list = call(client, |c| c.list_plugins()).await??;
    if output == OutputFormat::Json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = format!(
        "{:<16} {:<8} {:>10}  {:<21} {}\n",
        "NAME", "KIND", "SIZE", "CREATED", "ID"
    );
    for p in &list {
        s.push_str(&format!(
            "{:<16} {:<8} {:>10}  {:<21} {}\n",
            truncate(&p.name, 16),
            p.kind.as_str(),
            fmt_bytes(p.size_bytes),
            fmt_when(p.created_at),
            p.id
        ));
    }
    print!("{s}");
    Ok(ExitCode::SUCCESS)
}

async fn plugins_add(
    args: PluginAddArgs,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let (stem, bytes) = read_plugin_file(&args.file)?;
    let name = args.name.unwrap_or(stem);
    if name.is_empty() {
        return Err(CliError::Usage("--name must not be empty".to_owned()));
    }
    let added = call(client, move |c| c.add_plugin(&name, &bytes)).await??;
    let p: &PluginRow = &added.plugin;
    if output == OutputFormat::Json {
        print_json(p)?;
    } else {
        println!(
            "{} {} ({}, {}, {})",
            if added.created {
                "registered"
            } else {
                "already registered:"
            },
            p.name,
            p.kind.as_str(),
            fmt_bytes(p.size_bytes),
            p.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_bytes(n: u64) -> String {
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Catches clashing flags (the global --token and `serve --token`
        // share one id on purpose) and malformed attributes.
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn submit_flags_become_a_task_submit() {
        let cli = parse(&[
            "wasmtask",
            "submit",
            "hello",
            "--input",
            r#"{"text":"hi"}"#,
            "--timeout",
            "2s",
            "--max-memory",
            "16MiB",
            "--fuel",
            "1000",
            "--grace",
            "1500ms",
            "--dir",
            "rel/data::/data:rw",
            "--dir",
            "/abs",
            "--env",
            "A=1",
            "--env",
            "A=2",
            "--env",
            "B=x=y",
            "--stdin",
            "some text",
            "--lock",
            "db",
            "--lock",
            "net",
            "--max-attempts",
            "3",
            "--",
            "one",
            "--two",
        ]);
        let Command::Submit(args) = cli.command else {
            panic!("not submit: {:?}", cli.command)
        };
        assert!(!args.follow);
        let t = task_submit(&args).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let expected = TaskSubmit {
            plugin: "hello".into(),
            input: Some(serde_json::json!({"text": "hi"})),
            args: vec!["one".into(), "--two".into()],
            env: [
                ("A".to_owned(), "2".to_owned()),
                ("B".to_owned(), "x=y".to_owned()),
            ]
            .into_iter()
            .collect(),
            stdin: Some("some text".into()),
            dirs: vec![
                DirSpec {
                    host: cwd.join("rel/data").to_str().unwrap().to_owned(),
                    guest: "/data".into(),
                    writable: true,
                },
                DirSpec {
                    host: "/abs".into(),
                    guest: "/abs".into(),
                    writable: false,
                },
            ],
            limits: Limits {
                timeout_ms: Some(2000),
                max_memory_bytes: Some(16 << 20),
                fuel: Some(1000),
            },
            grace_ms: Some(1500),
            locks: vec!["db".into(), "net".into()],
            max_attempts: Some(3),
            ..TaskSubmit::default()
        };
        assert_eq!(t, expected);
        // What goes over the wire: no stream request, nothing unset.
        let wire = serde_json::to_value(&t).unwrap();
        assert_eq!(wire["stream"], false);
        assert!(wire.get("on_disconnect").is_none());
    }

    #[test]
    fn submit_refuses_bad_input_as_usage_errors() {
        let cli = parse(&["wasmtask", "submit", "hello", "--input", "{nope"]);
        let Command::Submit(args) = cli.command else {
            panic!()
        };
        assert!(matches!(task_submit(&args), Err(CliError::Usage(_))));
        let cli = parse(&["wasmtask", "submit", "hello", "--stdin", "@/no/such/file"]);
        let Command::Submit(args) = cli.command else {
            panic!()
        };
        assert!(matches!(task_submit(&args), Err(CliError::Usage(_))));
        assert!(Cli::try_parse_from(["wasmtask", "submit", "x", "--max-attempts", "0"]).is_err());
    }

    #[test]
    fn submit_uploads_paths_and_sends_names_as_they_are() {
        assert_eq!(plugin_path("hello"), None);
        assert_eq!(plugin_path("sha256:0a1b"), None);
        assert_eq!(plugin_path("greet.wasm"), Some(Path::new("greet.wasm")));
        assert_eq!(plugin_path("./target/x"), Some(Path::new("./target/x")));
    }

    #[test]
    fn global_flags_parse_before_or_after_the_command() {
        let cli = parse(&["wasmtask", "--server", "http://h:1", "ps"]);
        assert_eq!(cli.server.as_deref(), Some("http://h:1"));
        let cli = parse(&[
            "wasmtask", "logs", "t_1", "-f", "--token", "s", "--output", "json",
        ]);
        assert_eq!(cli.token.as_deref(), Some("s"));
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Logs(l) = cli.command else {
            panic!()
        };
        assert!(l.follow);
        let cli = parse(&[
            "wasmtask",
            "serve",
            "--token",
            "t",
            "--listen",
            "127.0.0.1:0",
        ]);
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.token.as_deref(), Some("t"));
    }

    #[test]
    fn plugins_without_a_subcommand_lists() {
        let cli = parse(&["wasmtask", "plugins"]);
        assert!(matches!(
            cli.command,
            Command::Plugins(PluginsArgs { command: None })
        ));
        let cli = parse(&["wasmtask", "plugins", "add", "x.wasm", "--name", "x"]);
        assert!(matches!(
            cli.command,
            Command::Plugins(PluginsArgs {
                command: Some(PluginsCommand::Add(_))
            })
        ));
        let cli = parse(&["wasmtask", "runs", "show", "r_1"]);
        assert!(matches!(
            cli.command,
            Command::Runs(RunsArgs {
                command: Some(RunsCommand::Show(_)),
                ..
            })
        ));
    }

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            error: ApiError {
                code: code.into(),
                message: format!("{code} happened"),
                task: None,
            },
        }
    }

    #[test]
    fn request_failures_map_to_exit_statuses_and_messages() {
        // The user's own input refused: 2.
        for (status, code) in [
            (400, "bad_request"),
            (413, "payload_too_large"),
            (422, "invalid_plugin"),
        ] {
            let e = CliError::from(api(status, code));
            assert!(matches!(e, CliError::Usage(_)), "{status}");
            assert_eq!(e.message(), format!("{code} happened ({code})"));
        }
        // Everything else: 1.
        for (status, code) in [
            (404, "not_found"),
            (409, "task_finished"),
            (500, "internal"),
            (503, "unavailable"),
        ] {
            let e = CliError::from(api(status, code));
            assert!(matches!(e, CliError::Other(_)), "{status}");
            assert_eq!(e.message(), format!("{code} happened ({code})"));
        }
        let e = CliError::from(ClientError::Unauthorized {
            token_sent: false,
            message: "missing token".into(),
        });
        assert!(matches!(e, CliError::Other(_)));
        assert_eq!(
            e.message(),
            "unauthorized: pass --token or set WASMTASK_TOKEN"
        );
        let e = CliError::from(ClientError::Unauthorized {
            token_sent: true,
            message: "wrong token".into(),
        });
        assert!(e.message().contains("refused the token"), "{}", e.message());
        let e = CliError::from(ClientError::Unreachable {
            server: "http://127.0.0.1:7480".into(),
            cause: "connection refused".into(),
        });
        assert!(matches!(e, CliError::Other(_)));
        assert!(
            e.message().starts_with(
                "cannot reach the server at http://127.0.0.1:7480: connection refused"
            ),
            "{}",
            e.message()
        );
        let e = CliError::from(Client::new("https://h:1", None).unwrap_err());
        assert!(matches!(e, CliError::Usage(_)));
    }

    fn event(kind: EventKind, data: Value) -> Event {
        Event {
            seq: 42,
            task_id: Some("t_1".into()),
            run_id: None,
            kind,
            at: 0,
            data,
        }
    }

    #[test]
    fn events_read_as_words() {
        use serde_json::json;
        let log = event(
            EventKind::TaskLog,
            json!({"level": "warn", "message": "low disk", "fields": {"free": "1%"}}),
        );
        assert_eq!(follow_line(&log).unwrap(), "[warn] low disk free=1%");
        let progress = event(
            EventKind::TaskProgress,
            json!({"fraction": 0.5, "message": "half"}),
        );
        assert_eq!(follow_line(&progress).unwrap(), "[progress 50% half]");
        let cancel = event(
            EventKind::TaskCancelRequested,
            json!({"actor": "api:ci", "reason": "interrupted by SIGINT", "grace_ms": 5000}),
        );
        assert_eq!(
            event_summary(&cancel),
            "cancel requested by api:ci: interrupted by SIGINT (5s grace)"
        );
        let failed = event(
            EventKind::TaskFailed,
            json!({"attempt": 1, "error": {"kind": "trap", "detail": "stack_overflow"}}),
        );
        assert_eq!(event_summary(&failed), "failed: trap (stack_overflow)");
        assert_eq!(
            follow_line(&failed),
            None,
            "the final report covers the end"
        );
        let forced = event(EventKind::TaskCancelForced, json!({"latency_us": 250}));
        assert_eq!(event_summary(&forced), "stopped by force in 250µs");
        let queued = event(
            EventKind::TaskQueued,
            json!({"plugin": "hello", "max_attempts": 1}),
        );
        assert_eq!(follow_line(&queued), None);
        let requeued = event(
            EventKind::TaskQueued,
            json!({"requeued": true, "reason": "host_restart", "attempt": 1}),
        );
        assert_eq!(
            follow_line(&requeued).unwrap(),
            "wasmtask: queued again after host_restart (attempt 1 did not finish)"
        );
        let line = log_line(&log, OutputFormat::Text, true);
        assert_eq!(
            line,
            format!(
                "    42  1970-01-01T00:00:00.000Z  {:<28}  {:<24}  [warn] low disk free=1%",
                "t_1", "task.log"
            )
        );
        let canceled = event(
            EventKind::TaskCanceled,
            json!({"error": {"kind": "canceled"}, "cancel": {"reason": "stop it"}}),
        );
        assert_eq!(event_summary(&canceled), "canceled (stop it)");
        let json_line = log_line(&log, OutputFormat::Json, false);
        assert_eq!(serde_json::from_str::<Event>(&json_line).unwrap(), log);
    }
}
