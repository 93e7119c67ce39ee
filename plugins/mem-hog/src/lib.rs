//! Fixture task: allocate memory and keep it.
//!
//! Input `{"mb": n}`. The task allocates `n` MiB in 1 MiB chunks, writes a
//! non-zero byte to every one of them (so every page is really touched) and
//! keeps all chunks alive until it answers `{"allocated_mb": n}`.
//!
//! Allocation is fallible: when linear memory cannot grow (the host's memory
//! limit), the task returns `failed` with
//! `"allocation failed after <k> MiB of <n> MiB"` instead of aborting. A host
//! whose limiter traps on a refused `memory.grow` sees the trap first.

use std::hint::black_box;

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Error, Result};

/// Size of one allocation.
const CHUNK: usize = 1 << 20;

#[derive(Deserialize)]
struct Input {
    mb: u32,
}

#[derive(Serialize)]
struct Output {
    allocated_mb: u32,
}

fn run(_ctx: &Context, input: Input) -> Result<Output> {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    chunks
        .try_reserve_exact(input.mb as usize)
        .map_err(|_| out_of_memory(0, input.mb))?;
    for allocated in 0..input.mb {
        let mut chunk = Vec::new();
        chunk
            .try_reserve_exact(CHUNK)
            .map_err(|_| out_of_memory(allocated, input.mb))?;
        chunk.resize(CHUNK, 0xA5);
        chunks.push(black_box(chunk));
    }
    black_box(&chunks);
    Ok(Output {
        allocated_mb: input.mb,
    })
}

fn out_of_memory(allocated: u32, wanted: u32) -> Error {
    Error::failed(format!(
        "allocation failed after {allocated} MiB of {wanted} MiB"
    ))
}

wasmtask_guest::task!(run);
