//! wasmtask: run untrusted WebAssembly components as tasks, stop any one of
//! them promptly, and record every outcome durably in SQLite.
//!
//! Layers (see ARCHITECTURE.md): `wasmtask_runtime` owns wasmtime and knows
//! nothing of SQLite or HTTP; [`db`] owns SQLite and knows nothing of
//! wasmtime; [`exec`] translates between them; [`cli`] is the command line.

pub mod api;
pub mod builtin;
pub mod cli;
pub mod client;
pub mod dashboard;
pub mod db;
pub mod exec;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod server;
pub mod service;
pub mod workspace;

/// The tokio runtime every wasmtask process uses: the API, the task service,
/// timers and I/O. It never executes wasm: guests run on the runtime's guest
/// pool, threads of their own at a lower OS priority (see the runtime's
/// `scheduler.rs`), so these workers are free whenever there is API work,
/// and the kernel gives them a CPU ahead of the guests.
///
/// Its workers check for I/O and for wakes from other threads (the database
/// writer's replies, guest threads' reports) after every poll rather than
/// every 61 or 31 polls: polls here are short, and a reply should not wait
/// behind a batch of them.
///
/// `WASMTASK_WORKER_THREADS` overrides the worker count (default: one per CPU).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = std::env::var("WASMTASK_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(cpus);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .event_interval(1)
        .global_queue_interval(2)
        .thread_name("wasmtask-worker")
        .build()
}
