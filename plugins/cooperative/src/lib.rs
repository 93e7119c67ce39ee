//! Example task: CPU-bound work in steps that cooperates with the host.
//!
//! Input `{"steps": n, "work": iterations per step (default 200000),
//! "ignore_cancel": bool (default false)}`. After each step the task reports
//! progress, stores a checkpoint `{"done": steps done, "acc": accumulator}`
//! and, unless `ignore_cancel` is set, checks for a pending cancel: if there
//! is one it logs a warning and returns at once with
//! `{"done": i, "acc": acc, "partial": true}`. A full run returns
//! `{"done": steps, "acc": acc, "partial": false}`.
//!
//! With `ignore_cancel` the task only stops when the host forces it to, which
//! is how tests reach the end of the cancel grace period.

use std::hint::black_box;

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Result, json};

#[derive(Deserialize)]
struct Input {
    steps: u32,
    #[serde(default = "default_work")]
    work: u32,
    #[serde(default)]
    ignore_cancel: bool,
}

fn default_work() -> u32 {
    200_000
}

#[derive(Serialize)]
struct Output {
    done: u32,
    acc: u64,
    partial: bool,
}

/// Seed of the xorshift state; any non-zero value works.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

fn run(ctx: &Context, input: Input) -> Result<Output> {
    let mut state = SEED;
    let mut acc: u64 = 0;
    for i in 0..input.steps {
        for _ in 0..input.work {
            // `black_box` keeps the optimizer from computing the loop in
            // closed form or dropping it, so `work` really costs CPU time.
            state = black_box(xorshift(state));
            acc = acc.wrapping_mul(31).wrapping_add(state);
        }
        let done = i + 1;
        ctx.progress(
            done as f32 / input.steps as f32,
            format!("step {done}/{}", input.steps),
        );
        ctx.checkpoint(&json!({ "done": done, "acc": acc }))?;
        if !input.ignore_cancel
            && let Some(reason) = ctx.cancel_reason()
        {
            ctx.warn(format!(
                "cancel requested: {reason}, stopping after step {done}"
            ));
            return Ok(Output {
                done,
                acc,
                partial: true,
            });
        }
    }
    Ok(Output {
        done: input.steps,
        acc,
        partial: false,
    })
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

wasmtask_guest::task!(run);
