//! Part 3: what interruption costs CPU-bound guest code.
//!
//! The `cpu-burn` command runs a loop-heavy, a call-heavy and a mixed
//! workload (formatting, sorting, a map: code as plugins have it); the
//! native row runs the very same source (`plugins/cpu-burn/src/work.rs`,
//! included below) in this process. "wasm, no interruption" and "wasm,
//! epochs" use an engine built here with the product's settings except the
//! interruption knob; the wasmtask rows go through `Runtime::spawn` as
//! every task does (epochs plus the guest pool, and with fuel on the metered
//! engine). Each figure is the median of a few runs; every run's checksum
//! is compared with the native one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use wasmtask_runtime::{Runtime, TaskEnd, TaskLimits, TaskRequest, WasiSpec};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, UpdateDeadline};
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

#[path = "../../../plugins/cpu-burn/src/work.rs"]
mod work;

pub const WORKLOADS: [&str; 3] = ["loops", "calls", "mixed"];

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

/// An engine with the product's settings, interruption and the compiler's
/// inlining as asked.
pub struct Own {
    engine: Engine,
    linker: Linker<Host>,
    component: Component,
    epochs: bool,
    stop: Arc<AtomicBool>,
}

/// The product's engine settings (`wasmtask_runtime`'s `engine_config`) but
/// for the interruption knob and the compiler's inlining, as asked.
pub fn config(epochs: bool, inlining: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(epochs);
    c.max_wasm_stack(1 << 20);
    c.async_stack_size(2 << 20);
    c.concurrency_support(false);
    if inlining {
        c.compiler_inlining(wasmtime::Inlining::Yes);
    }
    c
}

impl Own {
    pub fn new(bytes: &[u8], epochs: bool, inlining: bool) -> anyhow::Result<Own> {
        Own::with_config(bytes, &config(epochs, inlining), epochs)
    }

    /// An engine of `c`, whose epoch interruption is `epochs` (with the
    /// product's 2 ms ticker when on).
    pub fn with_config(bytes: &[u8], c: &Config, epochs: bool) -> anyhow::Result<Own> {
        let engine = Engine::new(c).map_err(wt)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wt)?;
        let component = Component::new(&engine, bytes).map_err(wt)?;
        let stop = Arc::new(AtomicBool::new(false));
        if epochs {
            // The product's ticker: one thread, every 2 ms.
            let (engine, stop) = (engine.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(2));
                    engine.increment_epoch();
                }
            });
        }
        Ok(Own {
            engine,
            linker,
            component,
            epochs,
            stop,
        })
    }

    /// Runs `cpu-burn what n`; returns the time and what it printed.
    pub async fn run(&self, what: &str, n: u64) -> anyhow::Result<(Duration, String)> {
        let out = MemoryOutputPipe::new(4096);
        let ctx = WasiCtxBuilder::new()
            .args(&["cpu-burn", what, &n.to_string()])
            .stdout(out.clone())
            .build();
        let mut store = Store::new(
            &self.engine,
            Host {
                ctx,
                table: ResourceTable::new(),
            },
        );
        if self.epochs {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        }
        let t0 = Instant::now();
        let cmd = Command::instantiate_async(&mut store, &self.component, &self.linker)
            .await
            .map_err(wt)?;
        let ok = cmd.wasi_cli_run().call_run(&mut store).await.map_err(wt)?;
        let took = t0.elapsed();
        if ok.is_err() {
            bail!("cpu-burn failed");
        }
        Ok((
            took,
            String::from_utf8_lossy(&out.contents()).trim().to_owned(),
        ))
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `cpu-burn what n` as a wasmtask task.
pub async fn shipped(
    rt: &Runtime,
    plugin: &wasmtask_runtime::Plugin,
    what: &str,
    n: u64,
    fuel: bool,
) -> anyhow::Result<(Duration, String)> {
    let t0 = Instant::now();
    let task = rt.spawn(TaskRequest {
        plugin: plugin.clone(),
        name: "cpu-burn".into(),
        input: Vec::new(),
        wasi: WasiSpec {
            args: vec![what.to_owned(), n.to_string()],
            ..WasiSpec::default()
        },
        limits: TaskLimits {
            fuel: fuel.then_some(u64::MAX >> 2),
            ..TaskLimits::default()
        },
        events: None,
    })?;
    let report = task.wait().await;
    let took = t0.elapsed();
    if report.end != TaskEnd::Exited(0) {
        bail!("cpu-burn ended {:?}", report.end);
    }
    Ok((
        took,
        String::from_utf8_lossy(&report.stdout.data)
            .trim()
            .to_owned(),
    ))
}

/// The native run of the same source.
pub fn native(what: &str, n: u64) -> anyhow::Result<(Duration, String)> {
    let t0 = Instant::now();
    let sum = work::run(std::hint::black_box(what), std::hint::black_box(n))
        .ok_or_else(|| anyhow!("unknown workload {what}"))?;
    Ok((t0.elapsed(), sum.to_string()))
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
