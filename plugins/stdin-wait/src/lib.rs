//! Fixture task: block reading stdin until end of file.
//!
//! Returns `{"bytes": n}`, the number of bytes read. The input is ignored.
//! A host that gives the task a stdin that never ends must still be able to
//! stop it while it waits in this read.

use std::io;

use serde::{Serialize, de::IgnoredAny};
use wasmtask_guest::{Context, Result};

#[derive(Serialize)]
struct Output {
    bytes: u64,
}

fn run(_ctx: &Context, _input: IgnoredAny) -> Result<Output> {
    let bytes = io::copy(&mut io::stdin().lock(), &mut io::sink())?;
    Ok(Output { bytes })
}

wasmtask_guest::task!(run);
