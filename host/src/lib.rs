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

/// The tokio runtime every wasmtask process uses.
///
/// Guests share the workers with everything else (see the runtime's
/// `scheduler.rs`), so the workers must notice I/O (a cancel request, an API
/// call) quickly even while guests keep them busy: busy workers poll the I/O
/// driver every `event_interval` polls (tokio's default, 61, measured 40–150 ms
/// of HTTP latency under guest load here) and the global queue every
/// `global_queue_interval` polls. A time-sliced guest's poll lasts up to one
/// epoch tick and a yielding guest is not polled again until it has a CPU
/// slot, so under load nearly every poll is a guest's slice: both are checked
/// after every poll, which costs a non-blocking `epoll_wait` per poll.
///
/// There is one worker more than there are CPUs, and guests get only as many
/// CPU slots as there are CPUs (`RuntimeConfig::cpu_slots`): however many
/// guests are busy, one worker is never inside a guest, so it is there to
/// take API requests, cancels and database replies off the busy workers'
/// queues (work stealing) instead of them waiting behind guest time slices.
///
/// `WASMTASK_WORKER_THREADS` overrides the worker count (default: CPUs + 1).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = std::env::var("WASMTASK_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(cpus + 1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .event_interval(1)
        .global_queue_interval(2)
        .thread_name("wasmtask-worker")
        .build()
}
