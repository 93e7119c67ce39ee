//! Example command: a tiny test runner for a tiny language.
//!
//! `minitest PATH...` runs every `*.t` file under each PATH (sorted). A test
//! file holds one test per line, `test <name>: <expr> = <expr>`, where an
//! expression is integer arithmetic (`+ - * /`, parentheses, unary minus,
//! 64-bit, checked); blank lines and lines starting with `#` are ignored.
//! Each test prints `ok - <file>: <name>` or `not ok - <file>: <name>: <why>`
//! (sides differ, division by zero, overflow, a syntax error), then a last
//! line `minitest: <passed> passed, <failed> failed`.
//! Exit code: 0 all passed, 1 some failed, 2 no tests or an unreadable path.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn expr(&mut self) -> Result<i64, String> {
        let mut v = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.i += 1;
            let r = self.term()?;
            v = if op == b'+' {
                v.checked_add(r)
            } else {
                v.checked_sub(r)
            }
            .ok_or("overflow")?;
        }
        Ok(v)
    }
    fn term(&mut self) -> Result<i64, String> {
        let mut v = self.atom()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.i += 1;
            let r = self.atom()?;
            v = if op == b'*' {
                v.checked_mul(r).ok_or("overflow")?
            } else if r == 0 {
                return Err("division by zero".into());
            } else {
                v.checked_div(r).ok_or("overflow")?
            };
        }
        Ok(v)
    }
    fn atom(&mut self) -> Result<i64, String> {
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(format!("expected `)` at column {}", self.i + 1));
                }
                self.i += 1;
                Ok(v)
            }
            Some(b'-') => {
                self.i += 1;
                self.atom()?.checked_neg().ok_or_else(|| "overflow".into())
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| "number too large".into())
            }
            Some(c) => Err(format!(
                "unexpected `{}` at column {}",
                c as char,
                self.i + 1
            )),
            None => Err("unexpected end of expression".into()),
        }
    }
}

fn eval(text: &str) -> Result<i64, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.expr()?;
    if p.peek().is_some() {
        return Err(format!("unexpected text at column {}", p.i + 1));
    }
    Ok(v)
}

/// Runs one test line; `Ok(())` when it passes.
fn run_test(body: &str) -> Result<(), String> {
    let (left, right) = body.split_once('=').ok_or("no `=` in the test")?;
    let l = eval(left).map_err(|e| format!("left side: {e}"))?;
    let r = eval(right).map_err(|e| format!("right side: {e}"))?;
    if l == r {
        Ok(())
    } else {
        Err(format!("{} is {l}, expected {r}", left.trim()))
    }
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
    } else if meta.is_file() && path.extension().is_some_and(|e| e == "t") {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn main() -> ExitCode {
    let paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        eprintln!("usage: minitest PATH...");
        return ExitCode::from(2);
    }
    let mut files = Vec::new();
    for p in &paths {
        if let Err(e) = collect(p, &mut files) {
            eprintln!("minitest: {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    let (mut passed, mut failed) = (0u32, 0u32);
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("minitest: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let shown = f.display();
            let Some(rest) = line.strip_prefix("test ") else {
                println!("not ok - {shown}:{}: not a test line", i + 1);
                failed += 1;
                continue;
            };
            let (name, body) = rest.split_once(':').unwrap_or((rest, ""));
            match run_test(body) {
                Ok(()) => {
                    println!("ok - {shown}: {}", name.trim());
                    passed += 1;
                }
                Err(why) => {
                    println!("not ok - {shown}: {}: {why}", name.trim());
                    failed += 1;
                }
            }
        }
    }
    println!("minitest: {passed} passed, {failed} failed");
    if passed + failed == 0 {
        eprintln!("minitest: no tests found");
        return ExitCode::from(2);
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
