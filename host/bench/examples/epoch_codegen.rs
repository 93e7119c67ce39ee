//! Writes the machine code wasmtime makes of `cpu-burn` with and without
//! epoch interruption, for reading what the checks cost (BENCHMARKS.md,
//! part 3):
//!
//! ```sh
//! cargo run --release -p wasmtask-bench --example epoch_codegen -- /tmp/codegen
//! objdump -d --no-show-raw-insn /tmp/codegen/epochs.elf | less   # and plain.elf
//! ```
//!
//! The engines have the benchmark's settings (`overhead::Own`) but for the
//! interruption knob.

use anyhow::{Context, anyhow};

#[path = "../src/overhead.rs"]
#[allow(dead_code)]
mod overhead;

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: epoch_codegen <output directory>")?,
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = wasmtask::builtin::find("cpu-burn")
        .context("no cpu-burn plugin")?
        .bytes;
    for (epochs, name) in [(false, "plain.elf"), (true, "epochs.elf")] {
        let config = overhead::config(epochs, false);
        let engine = wasmtime::Engine::new(&config).map_err(|e| anyhow!("{e:?}"))?;
        let elf = engine
            .precompile_component(bytes)
            .map_err(|e| anyhow!("{e:?}"))?;
        let path = dir.join(name);
        std::fs::write(&path, elf).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    println!("fib is the function whose symbol contains `work3fib`");
    Ok(())
}
