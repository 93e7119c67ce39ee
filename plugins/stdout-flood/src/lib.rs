//! Fixture task: write a lot to stdout.
//!
//! Input `{"mb": n}`. The task writes `n` MiB to stdout as 1 KiB lines
//! (`"flood line 000000 xxx…x\n"`, numbered from 0, each exactly 1024 bytes),
//! flushes, and returns `{"written": bytes}` (`n * 1048576`). The host must
//! cap or drain the output without running out of memory or stalling.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Result};

/// Length of one line, newline included.
const LINE: usize = 1024;
/// Lines per MiB.
const LINES_PER_MB: u64 = (1 << 20) / LINE as u64;

#[derive(Deserialize)]
struct Input {
    mb: u32,
}

#[derive(Serialize)]
struct Output {
    written: u64,
}

fn run(_ctx: &Context, input: Input) -> Result<Output> {
    let mut out = io::BufWriter::with_capacity(64 * LINE, io::stdout().lock());
    let mut line = Vec::with_capacity(LINE);
    let mut written: u64 = 0;
    for n in 0..u64::from(input.mb) * LINES_PER_MB {
        line.clear();
        write!(line, "flood line {n:06} ")?;
        line.resize(LINE - 1, b'x');
        line.push(b'\n');
        out.write_all(&line)?;
        written += LINE as u64;
    }
    out.flush()?;
    Ok(Output { written })
}

wasmtask_guest::task!(run);
