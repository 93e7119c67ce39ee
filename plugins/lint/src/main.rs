//! Example command: a source checker for CI.
//!
//! `lint [--max-line N] [--allow-tabs] [--report FILE] PATH...` reads every
//! file under each PATH (directories recursively, sorted, symlinks not
//! followed; files that are not UTF-8 are skipped with a note) and reports,
//! one finding per line on stdout, `path:line: message` for
//! - trailing whitespace (spaces or tabs before the end of the line),
//! - a tab character (unless `--allow-tabs`),
//! - a line longer than N characters (default 100).
//!
//! The last line is `lint: <n> finding(s) in <f> file(s)`. With `--report
//! FILE` the findings are also written to FILE (so the step needs a writable
//! directory). Exit code: 0 clean, 1 findings, 2 bad usage or unreadable path.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

struct Options {
    max_line: usize,
    allow_tabs: bool,
    report: Option<PathBuf>,
    paths: Vec<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        max_line: 100,
        allow_tabs: false,
        report: None,
        paths: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-line" => {
                let v = args.next().ok_or("--max-line needs a number")?;
                o.max_line = v.parse().map_err(|_| format!("bad --max-line {v:?}"))?;
            }
            "--allow-tabs" => o.allow_tabs = true,
            "--report" => {
                o.report = Some(PathBuf::from(args.next().ok_or("--report needs a file")?))
            }
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => o.paths.push(PathBuf::from(a)),
        }
    }
    if o.paths.is_empty() {
        return Err("usage: lint [--max-line N] [--allow-tabs] [--report FILE] PATH...".into());
    }
    Ok(o)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn check(path: &Path, text: &str, o: &Options, findings: &mut Vec<String>) {
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let shown = path.display();
        if line.ends_with(' ') || line.ends_with('\t') {
            findings.push(format!("{shown}:{n}: trailing whitespace"));
        }
        if !o.allow_tabs && line.contains('\t') {
            findings.push(format!("{shown}:{n}: tab character"));
        }
        let len = line.chars().count();
        if len > o.max_line {
            findings.push(format!(
                "{shown}:{n}: line is {len} characters (max {})",
                o.max_line
            ));
        }
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lint: {e}");
            return ExitCode::from(2);
        }
    };
    let mut files = Vec::new();
    for p in &o.paths {
        if let Err(e) = collect(p, &mut files) {
            eprintln!("lint: {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if let Some(r) = &o.report {
        // Do not lint our own report from an earlier run.
        files.retain(|f| f.file_name() != r.file_name());
    }
    let mut findings = Vec::new();
    for f in &files {
        match std::fs::read(f) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => check(f, &text, &o, &mut findings),
                Err(_) => eprintln!("lint: {}: not UTF-8, skipped", f.display()),
            },
            Err(e) => {
                eprintln!("lint: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    }
    for line in &findings {
        println!("{line}");
    }
    println!(
        "lint: {} finding(s) in {} file(s)",
        findings.len(),
        files.len()
    );
    if let Some(r) = &o.report {
        let mut text = findings.join("\n");
        text.push('\n');
        if let Err(e) = std::fs::write(r, text) {
            eprintln!("lint: cannot write the report {}: {e}", r.display());
            return ExitCode::from(2);
        }
    }
    if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
