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
pub mod db;
pub mod exec;
pub mod metrics;
pub mod model;
pub mod pipeline;
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
/// `global_queue_interval` polls.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(2)
        .global_queue_interval(4)
        .thread_name("wasmtask-worker")
        .build()
}
