//! Builds the guest plugins in `plugins/` and embeds them (see `src/builtin.rs`).
//!
//! The plugins are a separate cargo workspace that targets `wasm32-wasip2`,
//! so this script runs a nested
//! `cargo build --release --target wasm32-wasip2` on `plugins/Cargo.toml`
//! with its own target directory (`plugins/target`), copies each component
//! to `$OUT_DIR/plugins/<name>.wasm` and writes `$OUT_DIR/plugins.rs` with a
//! table that `include_bytes!`s them.
//!
//! The nested cargo must not inherit the outer build's settings: the outer
//! `RUSTFLAGS`, target, profile overrides, wrappers and jobserver are meant
//! for the host binary (a coverage or sanitizer flag would break a wasm
//! build), so they are removed from its environment. The plugins are always
//! built in release: they are test fixtures whose speed and size should not
//! depend on how the host is built.
//!
//! A plugin is a directory `plugins/<name>/` holding a `Cargo.toml` whose
//! package is named `<name>`; task plugins are `cdylib`s (`src/lib.rs`),
//! command plugins binaries (`src/main.rs`). Every such directory must be a
//! member of `plugins/Cargo.toml`, or the build fails here.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::{env, fs};

const WASM_TARGET: &str = "wasm32-wasip2";

/// Plugins that are also built for WASI preview 1 (`wasm32-wasip1`, a core
/// module with `_start`); the preview-1 build is the one embedded.
const P1_TARGET: &str = "wasm32-wasip1";
const P1_PLUGINS: [&str; 1] = ["p1-command"];

/// Preamble of a core WebAssembly module: magic, version `1`, layer `0`.
const CORE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// Plugins shown to users; every other plugin is a test fixture.
const EXAMPLES: [&str; 6] = ["hello", "cooperative", "sleeper", "wc", "lint", "minitest"];

/// Preamble of a WebAssembly component: magic, then version `0x0d` and
/// layer `1` (a core module has version `1` and layer `0`).
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

struct Plugin {
    name: String,
    /// `true` for a binary (`src/main.rs`), `false` for a `cdylib`.
    is_command: bool,
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let repo = manifest_dir
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent directory")?
        .to_owned();
    let plugins_dir = repo.join("plugins");
    let out_dir = PathBuf::from(var("OUT_DIR")?);

    let plugins = discover(&plugins_dir)?;
    rerun_if_changed(&repo, &plugins_dir, &plugins);
    build_plugins(&plugins_dir, WASM_TARGET, &[])?;
    build_plugins(&plugins_dir, P1_TARGET, &P1_PLUGINS)?;

    let target_dir = plugins_target_dir(&plugins_dir);
    let dest_dir = out_dir.join("plugins");
    fs::create_dir_all(&dest_dir)
        .map_err(|e| format!("cannot create {}: {e}", dest_dir.display()))?;

    let mut table = String::new();
    for plugin in &plugins {
        // Cargo names a cdylib artifact after the crate (`-` becomes `_`)
        // and a binary after the binary (the package name as is).
        let artifact = if plugin.is_command {
            plugin.name.clone()
        } else {
            plugin.name.replace('-', "_")
        };
        let p1 = P1_PLUGINS.contains(&plugin.name.as_str());
        let (target, header) = if p1 {
            (P1_TARGET, CORE_HEADER)
        } else {
            (WASM_TARGET, COMPONENT_HEADER)
        };
        let built = target_dir
            .join(target)
            .join("release")
            .join(format!("{artifact}.wasm"));
        let bytes = fs::read(&built).map_err(|e| {
            format!(
                "plugin `{}` was not built ({}: {e}); is it a member of plugins/Cargo.toml?",
                plugin.name,
                built.display()
            )
        })?;
        if !bytes.starts_with(&header) {
            return Err(format!(
                "{} is not what {target} produces (a {})",
                built.display(),
                if p1 { "core module" } else { "component" }
            ));
        }
        let dest = dest_dir.join(format!("{}.wasm", plugin.name));
        write_if_changed(&dest, &bytes)?;
        let role = if EXAMPLES.contains(&plugin.name.as_str()) {
            "Example"
        } else {
            "Fixture"
        };
        let dest = dest
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", dest.display()))?;
        // `{:?}` writes a Rust string literal with every needed escape.
        let _ = writeln!(
            table,
            "    BuiltPlugin {{ name: {name:?}, kind: PluginRole::{role}, bytes: include_bytes!({dest:?}) }},",
            name = plugin.name,
        );
    }

    let dest_dir = dest_dir
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", dest_dir.display()))?;
    let source = format!(
        "// Generated by host/build.rs; do not edit.\n\n\
         /// Every plugin under `plugins/`, sorted by name.\n\
         pub static PLUGINS: &[BuiltPlugin] = &[\n{table}];\n\n\
         /// Absolute directory holding `<name>.wasm` for every plugin in [`PLUGINS`].\n\
         pub const PLUGIN_DIR: &str = {dest_dir:?};\n"
    );
    write_if_changed(&out_dir.join("plugins.rs"), source.as_bytes())
}

fn var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("{name}: {e}"))
}

/// Every `plugins/<name>/` with a `Cargo.toml`, sorted by name.
fn discover(plugins_dir: &Path) -> Result<Vec<Plugin>, String> {
    let workspace = fs::read_to_string(plugins_dir.join("Cargo.toml"))
        .map_err(|e| format!("cannot read plugins/Cargo.toml: {e}"))?;
    let entries = fs::read_dir(plugins_dir)
        .map_err(|e| format!("cannot list {}: {e}", plugins_dir.display()))?;
    let mut plugins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", plugins_dir.display()))?;
        let dir = entry.path();
        if !dir.join("Cargo.toml").is_file() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| format!("plugin directory {name:?} is not UTF-8"))?;
        if !workspace.contains(&format!("\"{name}\"")) {
            return Err(format!(
                "plugins/{name} is not listed in plugins/Cargo.toml `members`"
            ));
        }
        let is_command = dir.join("src").join("main.rs").is_file();
        plugins.push(Plugin { name, is_command });
    }
    plugins.sort_by(|a, b| a.name.cmp(&b.name));
    if plugins.is_empty() {
        return Err(format!(
            "no plugin crates found under {}",
            plugins_dir.display()
        ));
    }
    Ok(plugins)
}

/// Rerun when a plugin, the SDK or the WIT changes. Directories are scanned
/// recursively by cargo, so `plugins/` itself is not listed: that would
/// include `plugins/target`, which every run changes.
fn rerun_if_changed(repo: &Path, plugins_dir: &Path, plugins: &[Plugin]) {
    let mut paths = vec![
        plugins_dir.join("Cargo.toml"),
        plugins_dir.join("Cargo.lock"),
        repo.join("guest-sdk").join("Cargo.toml"),
        repo.join("guest-sdk").join("src"),
        repo.join("wit"),
    ];
    for plugin in plugins {
        let dir = plugins_dir.join(&plugin.name);
        paths.push(dir.join("Cargo.toml"));
        paths.push(dir.join("src"));
        // Listed only if present: cargo reruns on every build for a missing path.
        if dir.join("build.rs").is_file() {
            paths.push(dir.join("build.rs"));
        }
    }
    for path in paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// Whether an environment variable of the outer build must not reach the
/// nested cargo: flags, wrappers, target and profile settings meant for the
/// host binary, the outer jobserver, and the variables cargo sets for this
/// build script. The toolchain (`CARGO`, `RUSTC`, `RUSTUP_TOOLCHAIN`) and
/// user settings such as `CARGO_HOME` or `CARGO_NET_OFFLINE` pass through.
fn leaks_outer_settings(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
        "CARGO_INCREMENTAL",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_CRATE_NAME",
        "CARGO_RUSTC_CURRENT_DIR",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "NUM_JOBS",
    ];
    const PREFIXES: &[&str] = &[
        // `CARGO_TARGET_DIR` and the per-target `CARGO_TARGET_<TRIPLE>_*`
        // (linker, runner, rustflags).
        "CARGO_TARGET_",
        "CARGO_PROFILE_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_",
        "__CARGO",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// Where the nested build puts its output: `plugins/target`, unless
/// `WASMTASK_PLUGINS_TARGET_DIR` names another directory (CI keeps it outside
/// the fresh clone so the plugins are not rebuilt from scratch every run).
fn plugins_target_dir(plugins_dir: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=WASMTASK_PLUGINS_TARGET_DIR");
    match env::var_os("WASMTASK_PLUGINS_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => plugins_dir.join("target"),
    }
}

/// Builds `packages` (all of the workspace when empty) for `target`.
fn build_plugins(plugins_dir: &Path, target: &str, packages: &[&str]) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--release", "--target", target, "--manifest-path"])
        .arg(plugins_dir.join("Cargo.toml"));
    for p in packages {
        command.args(["--package", p]);
    }
    command
        .arg("--target-dir")
        .arg(plugins_target_dir(plugins_dir))
        // Cargo reads `.cargo/config.toml` from the current directory up, so
        // run from the plugins workspace, not from wherever the outer build ran.
        .current_dir(plugins_dir);
    for (name, _) in env::vars_os() {
        if name.to_str().is_none_or(leaks_outer_settings) {
            command.env_remove(&name);
        }
    }

    let output = command.output().map_err(|e| {
        format!(
            "cannot run `{}` to build the plugins: {e}",
            Path::new(&cargo).display()
        )
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "building the plugins failed ({}).\n\
             If the error says the `{target}` target is missing (\"can't find crate for `core`\", \
             \"target may not be installed\"), run:\n\n    rustup target add {target}\n\n\
             To reproduce: cargo build --release --target {target} --manifest-path plugins/Cargo.toml\n\n\
             --- nested cargo stderr ---\n{stderr}",
            output.status
        ));
    }
    // The plugins must build without warnings; repeat any so they are seen.
    for line in stderr.lines().filter(|line| line.starts_with("warning")) {
        println!("cargo:warning=plugins: {line}");
    }
    Ok(())
}

/// Write `bytes` to `path` unless it already holds them, so an unchanged
/// plugin does not make cargo recompile the crate that embeds it.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
