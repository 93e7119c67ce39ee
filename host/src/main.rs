//! The `wasmtask` binary: parse arguments, start the async runtime, dispatch.

use std::process::ExitCode;

use clap::Parser;
use wasmtask::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASMTASK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(cli::stderr_is_terminal())
        .init();
    let runtime = match wasmtask::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wasmtask: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wasmtask: {}", e.message());
            e.exit_code()
        }
    };
    // Everything that matters is committed before `dispatch` returns. What
    // may remain is a blocking-pool thread of a canceled guest stuck in a
    // system call that never returns by itself (WASI opening a FIFO nobody
    // writes, say); dropping the runtime would wait for it forever.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
