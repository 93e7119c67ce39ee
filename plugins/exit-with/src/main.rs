//! Fixture command: show what the host passed in, then exit with a chosen code.
//!
//! Prints `arg: <a>` for each argument (not the program name), then
//! `env: K=V` for each environment variable sorted by name, then exits with
//! the code in `EXIT_CODE` (default 0). An `EXIT_CODE` that is not an
//! integer in 0..=255 is reported on stderr and exits with 2. Non-UTF-8 args
//! and variables are printed lossily.
//!
//! Why not `std::process::exit`: on `wasm32-wasip2` it goes through
//! `wasi:cli/exit#exit(result)`, which carries only success or failure, so
//! every non-zero code reaches the host as 1. This fixture exists to check
//! that a command's exact code gets through, so it calls
//! `wasi:cli/exit#exit-with-code` (WASI 0.2.12; wasmtime 48 provides it).
//! The component therefore needs a host with WASI 0.2.12 or later.

use std::io::Write;

mod wasi_exit {
    wit_bindgen::generate!({
        inline: r#"
            package wasmtask:exit-with;

            world exit-with {
                import wasi:cli/exit@0.2.12;
            }

            package wasi:cli@0.2.12 {
                interface exit {
                    exit: func(status: result);
                    exit-with-code: func(status-code: u8);
                }
            }
        "#,
        world: "wasmtask:exit-with/exit-with",
        generate_all,
    });

    pub use self::wasi::cli::exit::exit_with_code;
}

fn main() {
    let mut lines = Vec::new();
    for arg in std::env::args_os().skip(1) {
        lines.push(format!("arg: {}", arg.to_string_lossy()));
    }
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    vars.sort();
    for (k, v) in &vars {
        lines.push(format!("env: {k}={v}"));
    }
    let code = match vars.iter().find(|(k, _)| k == "EXIT_CODE") {
        None => 0,
        Some((_, v)) => match v.trim().parse::<u8>() {
            Ok(code) => code,
            Err(error) => {
                eprintln!("exit-with: EXIT_CODE={v:?} is not an exit code (0..=255): {error}");
                2
            }
        },
    };

    let mut out = std::io::stdout().lock();
    for line in lines {
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    // Exiting through WASI skips Rust's own cleanup, so flush first.
    let _ = out.flush();
    drop(out);
    wasi_exit::exit_with_code(code);
}
