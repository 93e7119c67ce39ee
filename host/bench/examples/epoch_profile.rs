//! Runs `cpu-burn WORKLOAD N` once, with or without epoch interruption,
//! with wasmtime's perf map on, so that `perf record` can say which guest
//! functions the checks slow down (BENCHMARKS.md, part 3):
//!
//! ```sh
//! E=target/release/examples/epoch_profile
//! perf record -e cpu-clock -F 4000 -o plain.data  $E plain  mixed 3000
//! perf record -e cpu-clock -F 4000 -o epochs.data $E epochs mixed 3000
//! perf report -i epochs.data --no-children --sort sym -F sample,sym --stdio
//! ```
//!
//! A fourth argument `inline` turns the compiler's inlining on. The engine
//! is the benchmark's own (`overhead::Own`), with its 2 ms ticker.

use anyhow::{Context, bail};

#[path = "../src/overhead.rs"]
#[allow(dead_code)]
mod overhead;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    const USAGE: &str = "usage: epoch_profile plain|epochs WORKLOAD N [inline]";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(what), Some(n)) = (args.first(), args.get(1), args.get(2)) else {
        bail!(USAGE);
    };
    let epochs = match mode.as_str() {
        "plain" => false,
        "epochs" => true,
        _ => bail!(USAGE),
    };
    let n: u64 = n.parse().context(USAGE)?;
    let inlining = args.get(3).is_some_and(|a| a == "inline");
    let bytes = wasmtask::builtin::find("cpu-burn")
        .context("no cpu-burn plugin")?
        .bytes;
    let mut config = overhead::config(epochs, inlining);
    config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    let own = overhead::Own::with_config(bytes, &config, epochs)?;
    let (took, printed) = own.run(what, n).await?;
    println!("{printed}");
    eprintln!("ran in {took:?}");
    Ok(())
}
