//! The wasmtime layer of wasmtask: engine, stores, cancellation, limits and
//! the WASI sandbox.
//!
//! This crate knows nothing of HTTP or SQLite; the host crate (`wasmtask`)
//! translates its [`TaskReport`]s into records. Start with `cancel.rs` for how
//! a cancel travels, `scheduler.rs` for why a cancelled guest never waits for
//! its turn, and `task.rs` for the life of one attempt.
//!
//! ```no_run
//! # async fn demo(bytes: Vec<u8>) -> anyhow::Result<()> {
//! use wasmtask_runtime::{Runtime, RuntimeConfig, TaskRequest, TaskLimits, WasiSpec};
//! let rt = Runtime::new(RuntimeConfig::default())?;
//! let plugin = rt.load_async(bytes).await?;
//! let task = rt.spawn(TaskRequest {
//!     plugin, name: "hello".into(), input: br#"{"text":"hi"}"#.to_vec(),
//!     wasi: WasiSpec::default(), limits: TaskLimits::default(), events: None,
//! })?;
//! let cancel = task.cancel_handle();
//! # let _ = cancel;
//! let report = task.wait().await;
//! println!("{:?}", report.end);
//! # Ok(()) }
//! ```

mod cancel;
mod engine;
mod host;
mod limits;
mod probe;
mod sandbox;
mod scheduler;
mod stdin;
mod task;
pub mod wake;

pub use cancel::{CancelAck, CancelHandle, CancelRequest};
pub use engine::{
    LoadError, Plugin, PluginKind, Runtime, RuntimeConfig, concurrency_cap, max_map_count,
};
pub use host::{GuestCaps, GuestEvent};
pub use limits::{LimitHit, LimitKind, TaskLimits};
pub use sandbox::{Captured, Preopen, SandboxError, Stdin, Tee, WasiSpec, is_absolute_guest_path};
pub use scheduler::GuestPriority;
pub use task::{
    CancelOutcome, GuestErrorKind, RunningTask, StartError, TaskEnd, TaskReport, TaskRequest,
};
