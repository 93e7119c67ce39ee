//! Fixture command: show what the host passed in, then exit with a chosen code.
//!
//! Prints `arg: <a>` for each argument (not the program name), then
//! `env: K=V` for each environment variable sorted by name, then exits with
//! the code in `EXIT_CODE` (default 0). An `EXIT_CODE` that is not an integer
//! is reported on stderr and exits with 2. Non-UTF-8 args and variables are
//! printed lossily.

use std::io::Write;

fn main() {
    let mut out = std::io::stdout().lock();
    let mut lines = Vec::new();
    for arg in std::env::args_os().skip(1) {
        lines.push(format!("arg: {}", arg.to_string_lossy()));
    }
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    vars.sort();
    for (k, v) in &vars {
        lines.push(format!("env: {k}={v}"));
    }
    let code = match vars.iter().find(|(k, _)| k == "EXIT_CODE") {
        None => 0,
        Some((_, v)) => match v.trim().parse::<i32>() {
            Ok(code) => code,
            Err(error) => {
                eprintln!("exit-with: EXIT_CODE={v:?} is not an integer: {error}");
                2
            }
        },
    };
    for line in lines {
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    let _ = out.flush();
    drop(out);
    std::process::exit(code);
}
