//! Fixture task: deep, non-tail recursion.
//!
//! Input `{"depth": n}` recurses to depth `n` (levels `1..=n`) and returns
//! `{"depth": n, "sum": n * (n + 1) / 2}` (the sum of the levels, wrapping).
//! Input `{"depth": null}` (or no input) recurses until the stack runs out,
//! which must end in a stack-overflow trap, never a host crash.
//!
//! Every level keeps a 64-byte array alive across the recursive call and
//! hands its address to `black_box`, so the compiler can neither turn the
//! recursion into a loop nor shrink the frames. `build.rs` enlarges the
//! shadow stack so the trap is wasmtime's stack overflow, not an
//! out-of-bounds access (see there).

use std::hint::black_box;

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Result};

#[derive(Deserialize)]
struct Input {
    depth: Option<u64>,
}

#[derive(Serialize)]
struct Output {
    depth: u64,
    sum: u64,
}

fn run(_ctx: &Context, input: Option<Input>) -> Result<Output> {
    let depth = input.and_then(|input| input.depth);
    let sum = recurse(1, depth);
    Ok(Output {
        depth: depth.unwrap_or(u64::MAX),
        sum,
    })
}

/// Sum of the levels `level..=depth`; without a depth it never returns.
#[inline(never)]
fn recurse(level: u64, depth: Option<u64>) -> u64 {
    if depth.is_some_and(|depth| level > depth) {
        return 0;
    }
    let mut frame = [level; 8];
    black_box(&mut frame);
    let below = recurse(level + 1, depth);
    black_box(&mut frame);
    below.wrapping_add(frame[(level % 8) as usize])
}

wasmtask_guest::task!(run);
