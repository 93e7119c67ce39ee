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
//! has the benchmark's settings (`overhead::Own`), the ticker its 2 ms.

use anyhow::{Context, anyhow, bail};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, UpdateDeadline};
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct Host {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("{e:?}")
}

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
    let bytes = wasmtask::builtin::find("cpu-burn")
        .context("no cpu-burn plugin")?
        .bytes;
    let mut c = Config::new();
    c.epoch_interruption(epochs);
    c.max_wasm_stack(1 << 20);
    c.concurrency_support(false);
    c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    if args.get(3).is_some_and(|a| a == "inline") {
        c.compiler_inlining(wasmtime::Inlining::Yes);
    }
    let engine = Engine::new(&c).map_err(wt)?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wt)?;
    let component = Component::new(&engine, bytes).map_err(wt)?;
    if epochs {
        let engine = engine.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(2));
                engine.increment_epoch();
            }
        });
    }
    let ctx = WasiCtxBuilder::new()
        .args(&["cpu-burn", what, n])
        .inherit_stdout()
        .build();
    let mut store = Store::new(
        &engine,
        Host {
            ctx,
            table: ResourceTable::new(),
        },
    );
    if epochs {
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    }
    let t0 = std::time::Instant::now();
    let cmd = Command::instantiate_async(&mut store, &component, &linker)
        .await
        .map_err(wt)?;
    if cmd
        .wasi_cli_run()
        .call_run(&mut store)
        .await
        .map_err(wt)?
        .is_err()
    {
        bail!("cpu-burn failed");
    }
    eprintln!("ran in {:?}", t0.elapsed());
    Ok(())
}
