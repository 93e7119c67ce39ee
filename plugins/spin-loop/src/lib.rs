//! Fixture task: an infinite loop that never calls the host.
//!
//! It never returns, never yields and never asks whether a cancel is pending,
//! so only the host's forced stop (epoch interruption or fuel) can end it.
//! The input is ignored (any JSON, or nothing).

use std::hint::black_box;

use wasmtask_guest::{Context, Result, serde::de::IgnoredAny};

fn run(_ctx: &Context, _input: IgnoredAny) -> Result<()> {
    let mut counter: u64 = 0;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

wasmtask_guest::task!(run);
