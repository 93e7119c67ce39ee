//! Pipelines: a TOML manifest describing one run of steps, run locally
//! (`wasmtask pipeline run`) or sent to a server (`wasmtask pipeline submit`).
//!
//! Model: a manifest is parsed and checked in full *before anything runs*:
//! unknown keys (with the line), bad durations or sizes, unknown `needs`,
//! cycles, missing plugin files (naming the step) — then turned into the
//! same [`RunSubmit`] the HTTP API takes (`POST /v1/runs`). The service checks
//! the rest (plugins it knows, allowed directories, the workspace) in one
//! place for both paths, and creates the run with all its tasks in one
//! transaction or not at all. A local run is that same [`Service`] over a
//! fresh SQLite database in its own data directory: the dispatcher, `needs`,
//! `fail_fast`, aborts and workspace cleanup are the server's, not a second
//! scheduler.
//!
//! Paths in a manifest (plugin files, `dirs.host`, `workspace.source` and
//! `workspace.dir`) are relative to the manifest's directory. The format is
//! documented in `docs/pipelines.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use toml::Spanned;
use wasmtask_runtime::{Runtime, RuntimeConfig, Stdin};

use crate::cli::{CliError, OutputFormat, default_data_dir, parse_duration, parse_size};
use crate::client::Client;
use crate::db::Db;
use crate::model::{
    DirSpec, Event, EventKind, Limits, RunState, RunSubmit, RunView, TaskState, TaskSubmit,
    WorkspaceAccess, WorkspaceCleanup, WorkspaceSpec,
};
use crate::progress::Board;
use crate::service::{Cancel, Service, ServiceConfig, ServiceError};

/// The manifest as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: Option<String>,
    /// When a step fails, cancel the rest. Default `true`.
    #[serde(default = "yes")]
    pub fail_fast: bool,
    /// Abort the whole run after this long (e.g. `10m`).
    pub timeout: Option<String>,
    /// Grace a cancel gives each step that names none (e.g. `2s`).
    pub grace: Option<String>,
    pub workspace: Option<ManifestWorkspace>,
    #[serde(default)]
    pub steps: BTreeMap<String, Spanned<Step>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestWorkspace {
    pub source: Option<String>,
    pub dir: Option<String>,
    pub guest: Option<String>,
    #[serde(default)]
    pub cleanup: WorkspaceCleanup,
}

/// One step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A built-in plugin's name (or one registered on the server), or a path
    /// to a `.wasm` file.
    pub plugin: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Input of task plugins (any TOML value, passed as JSON).
    pub input: Option<toml::Value>,
    /// The step's stdin, as text.
    pub stdin: Option<String>,
    /// Local runs only: the step reads `wasmtask`'s own stdin.
    #[serde(default)]
    pub stdin_inherit: bool,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub dirs: Vec<ManifestDir>,
    pub cwd: Option<String>,
    /// `ro` (default), `rw` or `none`.
    pub workspace: Option<WorkspaceAccess>,
    pub timeout: Option<String>,
    pub max_memory: Option<SizeValue>,
    pub fuel: Option<u64>,
    pub grace: Option<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default)]
    pub locks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestDir {
    pub host: String,
    /// Default: the `host` path as written.
    pub guest: Option<String>,
    #[serde(default)]
    pub writable: bool,
}

/// A size: bytes, or a string like `64MiB`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Why a manifest was refused. Every message names the file, and the line or
/// the step.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}:{line}: step `{step}`: {message}")]
    Step {
        path: String,
        line: usize,
        step: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Pipeline { path: String, message: String },
}

/// A checked manifest, ready to submit.
#[derive(Debug)]
pub struct Pipeline {
    pub run: RunSubmit,
    /// Plugin files to register first: (name the run uses, file).
    pub uploads: Vec<(String, PathBuf)>,
    /// The step whose stdin is this process's stdin, if any.
    pub stdin_inherit: Option<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

fn valid_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses and checks a manifest. `path` is what errors call it; relative
/// paths inside are resolved against `base`.
pub fn parse(text: &str, path: &str, base: &Path) -> Result<Pipeline, ManifestError> {
    let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let pipeline_err = |message: String| ManifestError::Pipeline {
        path: path.to_owned(),
        message,
    };
    if manifest.steps.is_empty() {
        return Err(pipeline_err(
            "no steps: add at least one [steps.NAME] table".into(),
        ));
    }
    let duration = |what: &str, s: &Option<String>| -> Result<Option<u64>, String> {
        match s {
            None => Ok(None),
            Some(s) => {
                let d = parse_duration(s).map_err(|e| format!("{what}: {e}"))?;
                if d.is_zero() {
                    return Err(format!("{what}: must be positive"));
                }
                Ok(Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
            }
        }
    };
    let timeout_ms = duration("timeout", &manifest.timeout).map_err(pipeline_err)?;
    let default_grace = duration("grace", &manifest.grace).map_err(pipeline_err)?;
    let resolve = |p: &str| -> String {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_string_lossy().into_owned()
        } else {
            base.join(p).to_string_lossy().into_owned()
        }
    };
    let workspace = manifest.workspace.as_ref().map(|w| WorkspaceSpec {
        source: w.source.as_deref().map(resolve),
        dir: w.dir.as_deref().map(resolve),
        guest: w.guest.clone(),
        cleanup: w.cleanup,
    });
    if let Some(w) = &workspace
        && w.source.is_some() == w.dir.is_some()
    {
        return Err(pipeline_err(
            "[workspace]: give exactly one of `source` (copied) and `dir` (used in place)".into(),
        ));
    }

    let mut tasks = Vec::new();
    let mut uploads: Vec<(String, PathBuf)> = Vec::new();
    let mut stdin_inherit = None;
    for (name, step) in &manifest.steps {
        let line = line_of(text, step.span().start);
        let step_err = |message: String| ManifestError::Step {
            path: path.to_owned(),
            line,
            step: name.clone(),
            message,
        };
        let step = step.get_ref();
        if !valid_step_name(name) {
            return Err(step_err(
                "a step name has 1 to 64 letters, digits, `-` or `_`".into(),
            ));
        }
        for need in &step.needs {
            if !manifest.steps.contains_key(need) {
                return Err(step_err(format!("needs `{need}`, which is not a step")));
            }
            if need == name {
                return Err(step_err("needs itself".into()));
            }
        }
        if step.workspace.is_some() && workspace.is_none() {
            return Err(step_err(
                "`workspace` is set but the pipeline has no [workspace]".into(),
            ));
        }
        if step.stdin_inherit {
            if step.stdin.is_some() {
                return Err(step_err(
                    "`stdin` and `stdin_inherit` exclude each other".into(),
                ));
            }
            if let Some(other) = &stdin_inherit {
                return Err(step_err(format!(
                    "only one step may inherit stdin (`{other}` does already)"
                )));
            }
            stdin_inherit = Some(name.clone());
        }
        let plugin = if step.plugin.contains('/') || step.plugin.ends_with(".wasm") {
            let file = PathBuf::from(resolve(&step.plugin));
            if !file.is_file() {
                return Err(step_err(format!(
                    "plugin file `{}` does not exist",
                    file.display()
                )));
            }
            let stem = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut reg: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(100)
                .collect();
            if reg.is_empty() {
                reg = format!("step-{name}");
            }
            if let Some((_, f)) = uploads.iter().find(|(n, _)| *n == reg) {
                if *f != file {
                    reg = format!("{reg}-{name}");
                    uploads.push((reg.clone(), file));
                }
            } else {
                uploads.push((reg.clone(), file));
            }
            reg
        } else {
            step.plugin.clone()
        };
        let input = match &step.input {
            None => None,
            Some(v) => Some(serde_json::to_value(v).map_err(|e| step_err(format!("input: {e}")))?),
        };
        let max_memory_bytes = match &step.max_memory {
            None => None,
            Some(SizeValue::Bytes(n)) => Some(*n),
            Some(SizeValue::Text(s)) => {
                Some(parse_size(s).map_err(|e| step_err(format!("max_memory: {e}")))?)
            }
        };
        let dirs = step
            .dirs
            .iter()
            .map(|d| DirSpec {
                host: resolve(&d.host),
                guest: d.guest.clone().unwrap_or_else(|| d.host.clone()),
                writable: d.writable,
            })
            .collect();
        tasks.push(TaskSubmit {
            plugin,
            input,
            args: step.args.clone(),
            env: step.env.clone(),
            stdin: step.stdin.clone(),
            dirs,
            cwd: step.cwd.clone(),
            limits: Limits {
                timeout_ms: duration("timeout", &step.timeout).map_err(step_err)?,
                max_memory_bytes,
                fuel: step.fuel,
            },
            grace_ms: duration("grace", &step.grace)
                .map_err(step_err)?
                .or(default_grace),
            locks: step.locks.clone(),
            key: Some(name.clone()),
            needs: step.needs.clone(),
            workspace: step.workspace,
            ..TaskSubmit::default()
        });
    }
    if let Some(cycle) = find_cycle(&manifest.steps) {
        return Err(pipeline_err(format!(
            "the steps' `needs` form a cycle: {}",
            cycle.join(" → ")
        )));
    }
    Ok(Pipeline {
        run: RunSubmit {
            name: manifest.name.clone(),
            fail_fast: manifest.fail_fast,
            tasks,
            workspace,
            timeout_ms,
        },
        uploads,
        stdin_inherit,
    })
}

/// A cycle through `needs`, as step names (first repeated at the end).
fn find_cycle(steps: &BTreeMap<String, Spanned<Step>>) -> Option<Vec<String>> {
    // 0 = unvisited, 1 = on the current path, 2 = done.
    fn visit<'a>(
        n: &'a str,
        steps: &'a BTreeMap<String, Spanned<Step>>,
        mark: &mut HashMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(n, 1);
        path.push(n);
        if let Some(step) = steps.get(n) {
            for need in &step.get_ref().needs {
                if let Some(c) = visit(need, steps, mark, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        mark.insert(n, 2);
        None
    }
    let mut mark = HashMap::new();
    for name in steps.keys() {
        let mut path = Vec::new();
        if let Some(c) = visit(name, steps, &mut mark, &mut path) {
            return Some(c);
        }
    }
    None
}

/// Reads and checks a manifest file.
pub fn load(file: &Path) -> Result<Pipeline, ManifestError> {
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| ManifestError::Read {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let base = std::fs::canonicalize(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    parse(&text, &shown, &base)
}

// ---------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------

/// `wasmtask pipeline run`'s settings.
#[derive(Debug)]
pub struct LocalOptions {
    /// Where the run's database, plugins and workspace live. Default: a new
    /// directory under `<data dir>/pipelines/`.
    pub data_dir: Option<PathBuf>,
    /// Host directories steps may share besides the manifest's own.
    pub allow_dirs: Vec<PathBuf>,
    /// Steps that may run at once. Default 8.
    pub max_running: usize,
}

fn usage(e: ManifestError) -> CliError {
    CliError::Usage(e.to_string())
}

fn service_error(e: ServiceError) -> CliError {
    match e {
        ServiceError::InvalidSpec(m)
        | ServiceError::UnknownPlugin(m)
        | ServiceError::InvalidPlugin(m) => CliError::Usage(m),
        e => CliError::Other(anyhow::Error::new(e)),
    }
}

/// Runs a pipeline in this process and prints its summary. Exit status: 0
/// succeeded, 1 failed, 130 aborted (Ctrl+C), 2 a bad manifest.
pub async fn run_local(
    file: &Path,
    opts: LocalOptions,
    output: OutputFormat,
) -> Result<ExitCode, CliError> {
    let pipeline = load(file).map_err(usage)?;
    let manifest_dir = std::fs::canonicalize(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .context("cannot resolve the manifest's directory")?;
    let mut allowed = vec![manifest_dir];
    for d in &opts.allow_dirs {
        allowed.push(
            std::fs::canonicalize(d)
                .map_err(|e| CliError::Usage(format!("--allow-dir {}: {e}", d.display())))?,
        );
    }
    let data_dir = match opts.data_dir {
        Some(d) => d,
        None => default_data_dir().join("pipelines").join(format!(
            "{}-{}",
            crate::model::now_millis(),
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: Some(default_data_dir().join("cache")),
        max_concurrent: 64,
        ..RuntimeConfig::default()
    })
    .map_err(CliError::Other)?;
    let db_path = data_dir.join("wasmtask.db");
    let db = Db::open(&db_path)
        .await
        .with_context(|| format!("cannot open the database {}", db_path.display()))?;
    let svc = Service::start(
        rt,
        db.clone(),
        ServiceConfig {
            allowed_dirs: allowed,
            max_running: opts.max_running.max(1),
            plugin_dir: data_dir.join("plugins"),
            builtin_fixtures: true,
            workspace_dir: data_dir.join("workspaces"),
        },
    )
    .await
    .map_err(CliError::Other)?;
    for (name, path) in &pipeline.uploads {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
        svc.add_plugin(name, bytes)
            .await
            .map_err(|e| CliError::Usage(format!("plugin {}: {}", path.display(), e)))?;
    }
    // Watch signals before anything runs: a Ctrl+C must abort the run, not
    // kill the process with steps half done.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut watch = db.watch_events();
    let stdin = pipeline
        .stdin_inherit
        .clone()
        .map(|key| (key, Stdin::Reader(Box::new(tokio::io::stdin()))));
    let view = svc
        .submit_run_with_stdin(&pipeline.run, stdin)
        .await
        .map_err(service_error)?;
    let run_id = view.run.id.clone();
    let keys: HashMap<String, String> = view
        .tasks
        .iter()
        .map(|t| (t.id.clone(), t.spec.key.clone().unwrap_or_default()))
        .collect();
    eprintln!(
        "pipeline {}: run {run_id}, {} steps (records in {})",
        pipeline.run.name.as_deref().unwrap_or("-"),
        view.tasks.len(),
        db_path.display()
    );
    // On a terminal (text output) each running step gets a live bar on
    // stderr, the lines scrolling above; otherwise plain lines.
    let mut board = if output == OutputFormat::Text {
        Board::on_stderr()
    } else {
        None
    };
    let say = |board: &Option<Board>, line: &str| match board {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    let mut after = 0i64;
    let mut signals = 0u32;
    'follow: loop {
        let page = db
            .run_events(&run_id, after, 500)
            .await
            .map_err(|e| CliError::Other(e.into()))?;
        let empty = page.is_empty();
        for ev in &page {
            after = ev.seq;
            // Progress goes to stderr whatever the output format: stdout
            // carries only the summary.
            if let (Some(b), Some(task)) = (board.as_mut(), ev.task_id.as_ref()) {
                b.event(ev, keys.get(task).map_or("", String::as_str));
            }
            if let Some(line) = progress_line(ev, &keys) {
                say(&board, &line);
            }
            if ev.kind == EventKind::RunFinished {
                break 'follow;
            }
        }
        if !empty {
            continue;
        }
        let sig = tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    break 'follow;
                }
                continue;
            }
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        signals += 1;
        // The first signal aborts with each step's own grace; a second one
        // forces every step at once.
        let c = Cancel {
            actor: format!("signal:{sig}"),
            reason: Some(format!("pipeline interrupted by {sig}")),
            grace_ms: if signals == 1 { None } else { Some(0) },
            wait: None,
        };
        say(
            &board,
            &format!(
                "wasmtask: {sig}: aborting the pipeline{}",
                if signals == 1 { "" } else { " (forced)" }
            ),
        );
        match svc.abort(&run_id, c).await {
            Ok(_) | Err(ServiceError::RunFinished(_)) => {}
            Err(e) => tracing::warn!(run = %run_id, error = %e, "abort failed"),
        }
    }
    // The bars go before the summary.
    drop(board);
    let view = svc.get_run(&run_id).await.map_err(service_error)?;
    svc.stop_accepting();
    print_summary(&view, output)?;
    Ok(match view.run.state {
        RunState::Succeeded => ExitCode::SUCCESS,
        RunState::Aborted => ExitCode::from(130),
        _ => ExitCode::from(1),
    })
}

/// One line of live progress for an event of the run, if it deserves one.
fn progress_line(ev: &Event, keys: &HashMap<String, String>) -> Option<String> {
    let step = ev
        .task_id
        .as_ref()
        .and_then(|id| keys.get(id))
        .map(String::as_str);
    let d = &ev.data;
    let msg = d.get("message").and_then(|m| m.as_str()).unwrap_or("");
    match (ev.kind, step) {
        (EventKind::TaskStarted, Some(s)) => Some(format!("[{s}] started")),
        (EventKind::TaskLog, Some(s)) => match d.get("stream").and_then(|v| v.as_str()) {
            Some("stderr") => Some(format!("[{s}] (stderr) {msg}")),
            Some(_) => Some(format!("[{s}] {msg}")),
            None => Some(format!(
                "[{s}] [{}] {msg}",
                d.get("level").and_then(|v| v.as_str()).unwrap_or("info")
            )),
        },
        (EventKind::TaskLog, None) => Some(format!("[run] {msg}: {}", d.get("path")?.as_str()?)),
        (EventKind::RunAbortRequested, _) => Some(format!(
            "[run] abort requested: {}",
            d.get("reason").and_then(|v| v.as_str()).unwrap_or("")
        )),
        (k, Some(s)) if k.as_str().starts_with("task.") && is_terminal_kind(k) => {
            Some(format!("[{s}] {}", &k.as_str()["task.".len()..]))
        }
        _ => None,
    }
}

fn is_terminal_kind(k: EventKind) -> bool {
    matches!(
        k,
        EventKind::TaskSucceeded
            | EventKind::TaskFailed
            | EventKind::TaskTimedOut
            | EventKind::TaskCanceled
    )
}

/// The run summary: one row per step, or the run view as JSON.
pub fn print_summary(view: &RunView, output: OutputFormat) -> Result<(), CliError> {
    if output == OutputFormat::Json {
        let text = serde_json::to_string_pretty(view).context("cannot serialize the run")?;
        println!("{text}");
        return Ok(());
    }
    let mut s = format!(
        "run {} {}{}\n\n",
        view.run.id,
        view.run.state.as_str(),
        view.run
            .abort
            .as_ref()
            .map(|a| format!(" ({} by {})", a.reason, a.actor))
            .unwrap_or_default()
    );
    s.push_str(&format!(
        "{:<16} {:<10} {:>4} {:>9}  {}\n",
        "STEP", "STATE", "EXIT", "TIME", "DETAIL"
    ));
    for t in &view.tasks {
        let time = match (t.started_at, t.finished_at) {
            (Some(a), Some(b)) => format!("{:.2}s", (b - a).max(0) as f64 / 1000.0),
            _ => "-".into(),
        };
        let detail = if let Some(e) = &t.error {
            e.message.lines().next().unwrap_or("").to_owned()
        } else if t.state == TaskState::Canceled
            && let Some(c) = &t.cancel
        {
            c.reason.clone()
        } else if t.stdout.truncated || t.stderr.truncated {
            "output truncated".into()
        } else {
            String::new()
        };
        let row = format!(
            "{:<16} {:<10} {:>4} {:>9}  {}",
            t.spec.key.as_deref().unwrap_or("-"),
            t.state.as_str(),
            t.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            time,
            detail
        );
        s.push_str(row.trim_end());
        s.push('\n');
    }
    print!("{s}");
    Ok(())
}

/// Sends a pipeline to a server as a run (uploading plugin files first) and
/// prints the run. Exit status 0 once the run is created.
pub async fn submit(
    file: &Path,
    output: OutputFormat,
    client: &Client,
) -> Result<ExitCode, CliError> {
    let pipeline = load(file).map_err(usage)?;
    if let Some(step) = &pipeline.stdin_inherit {
        return Err(CliError::Usage(format!(
            "step `{step}`: `stdin_inherit` works only with `pipeline run` (a server has no terminal)"
        )));
    }
    let client = client.clone();
    let view = tokio::task::spawn_blocking(move || -> Result<RunView, CliError> {
        for (name, path) in &pipeline.uploads {
            let bytes = std::fs::read(path)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
            client.add_plugin(name, &bytes)?;
        }
        Ok(client.submit_run(&pipeline.run)?)
    })
    .await
    .map_err(|e| CliError::Other(e.into()))??;
    if output == OutputFormat::Json {
        let text = serde_json::to_string_pretty(&json!({"run": view.run, "tasks": view.tasks}))
            .context("cannot serialize the run")?;
        println!("{text}");
    } else {
        println!("{}", view.run.id);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Pipeline {
        parse(text, "p.toml", Path::new("/base")).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(text, "p.toml", Path::new("/base"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn steps_defaults_and_conversions() {
        let p = parse_ok(
            r#"
[workspace]
source = "sample"

[steps.count]
plugin = "wc"
args = ["--json", "."]

[steps.greet]
plugin = "hello"
input = { text = "hi", n = 3 }
needs = ["count"]
workspace = "rw"
timeout = "30s"
max_memory = "64MiB"
env = { A = "1" }
dirs = [{ host = "data", guest = "/data", writable = true }]
"#,
        );
        let r = &p.run;
        assert!(r.fail_fast, "fail_fast defaults to true");
        assert_eq!(r.timeout_ms, None);
        let ws = r.workspace.as_ref().unwrap();
        assert_eq!(ws.source.as_deref(), Some("/base/sample"));
        assert_eq!(ws.cleanup, WorkspaceCleanup::Always);
        assert_eq!(r.tasks.len(), 2);
        let count = &r.tasks[0];
        assert_eq!(count.key.as_deref(), Some("count"));
        assert_eq!(count.args, vec!["--json", "."]);
        assert_eq!(count.workspace, None);
        let greet = &r.tasks[1];
        assert_eq!(greet.input, Some(json!({"text": "hi", "n": 3})));
        assert_eq!(greet.needs, vec!["count"]);
        assert_eq!(greet.workspace, Some(WorkspaceAccess::Rw));
        assert_eq!(greet.limits.timeout_ms, Some(30_000));
        assert_eq!(greet.limits.max_memory_bytes, Some(64 << 20));
        assert_eq!(greet.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            greet.dirs,
            vec![DirSpec {
                host: "/base/data".into(),
                guest: "/data".into(),
                writable: true
            }]
        );
        assert!(p.uploads.is_empty());
    }

    #[test]
    fn pipeline_options_apply_to_every_step() {
        let p = parse_ok(
            r#"
fail_fast = false
timeout = "2m"
grace = "1500ms"
[steps.a]
plugin = "hello"
[steps.b]
plugin = "hello"
grace = "10ms"
"#,
        );
        assert!(!p.run.fail_fast);
        assert_eq!(p.run.timeout_ms, Some(120_000));
        assert_eq!(p.run.tasks[0].grace_ms, Some(1500));
        assert_eq!(p.run.tasks[1].grace_ms, Some(10));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = parse_err("[steps.a]\nplugin = \"hello\"\nargz = []\n");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("argz"), "{e}");
        let e = parse_err("colour = 1\n[steps.a]\nplugin = \"hello\"\n");
        assert!(e.contains("line 1") && e.contains("colour"), "{e}");
    }

    #[test]
    fn cycles_and_unknown_needs_name_the_steps() {
        let e = parse_err(
            "[steps.a]\nplugin = \"hello\"\nneeds = [\"c\"]\n[steps.b]\nplugin = \"hello\"\nneeds = [\"a\"]\n[steps.c]\nplugin = \"hello\"\nneeds = [\"b\"]\n",
        );
        assert!(e.contains("cycle"), "{e}");
        assert!(e.contains('a') && e.contains('b') && e.contains('c'), "{e}");
        let e = parse_err(
            "[steps.a]\nplugin = \"hello\"\n\n[steps.b]\nplugin = \"hello\"\nneeds = [\"nope\"]\n",
        );
        assert!(e.contains("step `b`") && e.contains("nope"), "{e}");
        assert!(e.contains("p.toml:4"), "the line of step b's header: {e}");
        let e = parse_err("[steps.a]\nplugin = \"hello\"\nneeds = [\"a\"]\n");
        assert!(e.contains("needs itself"), "{e}");
    }

    #[test]
    fn bad_values_name_the_step() {
        let e = parse_err("[steps.a]\nplugin = \"hello\"\ntimeout = \"soon\"\n");
        assert!(e.contains("step `a`") && e.contains("timeout"), "{e}");
        let e = parse_err("[steps.a]\nplugin = \"hello\"\nmax_memory = \"12XB\"\n");
        assert!(e.contains("max_memory"), "{e}");
        let e = parse_err("[steps.a]\nplugin = \"./missing.wasm\"\n");
        assert!(
            e.contains("step `a`") && e.contains("does not exist"),
            "{e}"
        );
        let e = parse_err("[steps.a]\nplugin = \"hello\"\nworkspace = \"rw\"\n");
        assert!(e.contains("no [workspace]"), "{e}");
        let e = parse_err("[steps.a]\nplugin = \"hello\"\nworkspace = \"rwx\"\n");
        assert!(e.contains("rwx"), "{e}");
        let e = parse_err("[workspace]\nguest = \"/w\"\n[steps.a]\nplugin = \"hello\"\n");
        assert!(e.contains("exactly one"), "{e}");
        let e = parse_err("name = \"empty\"\n");
        assert!(e.contains("no steps"), "{e}");
        let e = parse_err("[steps.\"a b\"]\nplugin = \"hello\"\n");
        assert!(e.contains("step `a b`"), "{e}");
        let e = parse_err(
            "[steps.a]\nplugin = \"hello\"\nstdin_inherit = true\n[steps.b]\nplugin = \"hello\"\nstdin_inherit = true\n",
        );
        assert!(e.contains("only one step"), "{e}");
    }

    #[test]
    fn plugin_files_are_uploaded_once_under_their_stem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lint.wasm"), b"\0asm").unwrap();
        let p = parse(
            "[steps.a]\nplugin = \"lint.wasm\"\n[steps.b]\nplugin = \"./lint.wasm\"\n",
            "p.toml",
            dir.path(),
        )
        .unwrap();
        assert_eq!(p.uploads.len(), 1, "{:?}", p.uploads);
        assert_eq!(p.uploads[0].0, "lint");
        assert_eq!(p.run.tasks[0].plugin, "lint");
        assert_eq!(p.run.tasks[1].plugin, "lint");
    }
}
