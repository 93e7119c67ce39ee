//! Example and fixture task: sleep, then answer.
//!
//! Input `{"ms": n}`; the task sleeps `n` milliseconds with
//! `std::thread::sleep` (a WASI `poll` on a monotonic-clock pollable, so the
//! guest is blocked in the host, not spinning) and returns `{"slept_ms": n}`.
//! It shows that a cancel reaches a guest that is waiting in a host call.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Result};

#[derive(Deserialize)]
struct Input {
    ms: u64,
}

#[derive(Serialize)]
struct Output {
    slept_ms: u64,
}

fn run(_ctx: &Context, input: Input) -> Result<Output> {
    std::thread::sleep(Duration::from_millis(input.ms));
    Ok(Output { slept_ms: input.ms })
}

wasmtask_guest::task!(run);
