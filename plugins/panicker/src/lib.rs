//! Fixture task: panic on purpose.
//!
//! Writes `about to panic` to stderr, then panics with
//! `panicker: deliberate panic`. On `wasm32-wasip2` a panic aborts, so the
//! host sees a trap (with the panic message on the task's stderr), never an
//! error value. The input is ignored.

use std::io::Write;

use wasmtask_guest::{Context, Result, serde::de::IgnoredAny};

#[expect(clippy::panic, reason = "panicking is what this fixture is for")]
fn run(_ctx: &Context, _input: IgnoredAny) -> Result<()> {
    let mut stderr = std::io::stderr();
    // Best effort: the panic below is the behaviour under test, not this line.
    let _ = writeln!(stderr, "about to panic");
    panic!("panicker: deliberate panic");
}

wasmtask_guest::task!(run);
