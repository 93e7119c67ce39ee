//! Example command: count lines, words and bytes, like a small `wc`.
//!
//! `wc [--json] [PATH...]` counts each file; a directory counts every file
//! under it (recursively, in sorted path order, not following symlinked
//! directories). With no PATH it counts stdin, named `-`. The output is an
//! aligned table with a header and a `total` row, or with `--json` one object
//! `{"files": [{"path", "lines", "words", "bytes"}], "total": {"lines", "words", "bytes"}}`.
//!
//! Lines are `\n` bytes; words are maximal runs of bytes that are not ASCII
//! whitespace (space, `\t`, `\n`, `\v`, `\f`, `\r`). A path that cannot be
//! read is reported on stderr and skipped; the exit code is then 1, else 0.
//!
//! It is an ordinary `wasm32-wasip2` program: the host runs it as a
//! `wasi:cli` command with args, env, stdin and preopened directories.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

#[derive(Default, Clone, Copy, Serialize)]
struct Counts {
    lines: u64,
    words: u64,
    bytes: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.lines += other.lines;
        self.words += other.words;
        self.bytes += other.bytes;
    }
}

fn main() -> ExitCode {
    let mut json_output = false;
    let mut paths = Vec::new();
    for arg in std::env::args_os().skip(1) {
        if arg == "--json" {
            json_output = true;
        } else {
            paths.push(PathBuf::from(arg));
        }
    }

    let mut ok = true;
    let mut rows: Vec<(String, Counts)> = Vec::new();
    if paths.is_empty() {
        match count(io::stdin().lock()) {
            Ok(counts) => rows.push(("-".to_owned(), counts)),
            Err(error) => {
                eprintln!("wc: -: {error}");
                ok = false;
            }
        }
    }
    for path in &paths {
        let mut files = Vec::new();
        if let Err(error) = collect(path, &mut files) {
            eprintln!("wc: {}: {error}", path.display());
            ok = false;
            continue;
        }
        for file in files {
            match fs::File::open(&file).and_then(count) {
                Ok(counts) => rows.push((file.display().to_string(), counts)),
                Err(error) => {
                    eprintln!("wc: {}: {error}", file.display());
                    ok = false;
                }
            }
        }
    }

    let mut total = Counts::default();
    for (_, counts) in &rows {
        total.add(*counts);
    }
    let printed = if json_output {
        print_json(&rows, total)
    } else {
        print_table(&rows, total)
    };
    if let Err(error) = printed {
        eprintln!("wc: cannot write output: {error}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `path` itself if it is not a directory, else every non-directory under
/// it, sorted. Symlinked directories inside `path` are skipped.
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    if !fs::metadata(path)?.is_dir() {
        files.push(path.to_owned());
        return Ok(());
    }
    let mut found = Vec::new();
    walk(path, &mut found)?;
    found.sort();
    files.extend(found);
    Ok(())
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            walk(&path, files)?;
        } else if file_type.is_symlink() {
            if fs::metadata(&path).is_ok_and(|meta| !meta.is_dir()) {
                files.push(path);
            }
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn count(mut reader: impl Read) -> io::Result<Counts> {
    let mut counts = Counts::default();
    let mut in_word = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(counts),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        counts.bytes += n as u64;
        for &byte in buf.iter().take(n) {
            if byte == b'\n' {
                counts.lines += 1;
            }
            if matches!(byte, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
                in_word = false;
            } else if !in_word {
                in_word = true;
                counts.words += 1;
            }
        }
    }
}

fn print_table(rows: &[(String, Counts)], total: Counts) -> io::Result<()> {
    let width = |header: &str, field: fn(&Counts) -> u64| {
        rows.iter()
            .map(|(_, counts)| field(counts))
            .chain([field(&total)])
            .map(|value| value.to_string().len())
            .chain([header.len()])
            .max()
            .unwrap_or(0)
    };
    let lw = width("lines", |c| c.lines);
    let ww = width("words", |c| c.words);
    let bw = width("bytes", |c| c.bytes);
    let mut out = io::BufWriter::new(io::stdout().lock());
    writeln!(
        out,
        "{:>lw$} {:>ww$} {:>bw$} path",
        "lines", "words", "bytes"
    )?;
    for (path, c) in rows
        .iter()
        .map(|(p, c)| (p.as_str(), c))
        .chain([("total", &total)])
    {
        writeln!(
            out,
            "{:>lw$} {:>ww$} {:>bw$} {path}",
            c.lines, c.words, c.bytes
        )?;
    }
    out.flush()
}

#[derive(Serialize)]
struct FileReport<'a> {
    path: &'a str,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Serialize)]
struct Report<'a> {
    files: Vec<FileReport<'a>>,
    total: Counts,
}

fn print_json(rows: &[(String, Counts)], total: Counts) -> io::Result<()> {
    let files = rows
        .iter()
        .map(|(path, counts)| FileReport {
            path,
            counts: *counts,
        })
        .collect();
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &Report { files, total })?;
    writeln!(out)?;
    out.flush()
}
