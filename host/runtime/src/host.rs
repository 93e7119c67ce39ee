//! The `wasmtask:task/host` interface and the data every store carries.
//!
//! Host functions here never block and never trust the guest: strings are
//! capped, floods are coalesced by a bounded channel (events that do not fit
//! are counted and reported as dropped, never queued without bound), progress
//! is clamped, and an oversized checkpoint traps the guest as a limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtxView, WasiView};

use crate::cancel::CancelState;
use crate::limits::{LimitHit, LimitKind, Limiter};

wasmtime::component::bindgen!({
    world: "task",
    path: "../../wit",
    imports: {
        "wasmtask:task/host.checkpoint": trappable,
    },
    exports: { default: async },
});

pub use wasmtask::task::types::{LogLevel, TaskError as GuestTaskError};

/// Caps on what a guest may hand the host in one call.
#[derive(Debug, Clone, Copy)]
pub struct GuestCaps {
    /// Longest log or progress message kept, in bytes (longer ones are cut
    /// at a char boundary and marked with `…`). Default 8 KiB.
    pub max_message_bytes: usize,
    /// Most fields kept per log record. Default 32.
    pub max_log_fields: usize,
    /// Largest checkpoint accepted, in bytes. Default 1 MiB. A larger one
    /// traps the guest with *limit exceeded: checkpoint*.
    pub max_checkpoint_bytes: usize,
}

impl Default for GuestCaps {
    fn default() -> GuestCaps {
        GuestCaps {
            max_message_bytes: 8 * 1024,
            max_log_fields: 32,
            max_checkpoint_bytes: 1024 * 1024,
        }
    }
}

/// Something a guest reported while it ran, delivered in order.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestEvent {
    Log {
        level: &'static str,
        message: String,
        fields: Vec<(String, String)>,
    },
    Progress {
        fraction: f32,
        message: String,
    },
    /// A checkpoint was taken (its bytes are in [`Shared::checkpoint`]).
    Checkpoint {
        bytes: usize,
    },
    /// The guest saw the pending cancel for the first time.
    CancelObserved {
        reason: String,
    },
    /// A line the guest wrote to stdout or stderr (without its `\n`),
    /// streamed while it runs. Only the first `capture_limit` bytes of each
    /// stream are streamed (the rest is truncated in the capture too), and a
    /// line longer than the message cap is cut.
    Output {
        stream: &'static str,
        line: String,
    },
    /// This many events did not fit in the channel and were dropped.
    Dropped {
        count: u64,
    },
}

/// State shared between the store and the outside world; it outlives the
/// store so a forced stop keeps the last checkpoint and progress.
#[derive(Debug)]
pub struct Shared {
    pub checkpoint: Mutex<Option<Vec<u8>>>,
    pub progress: Mutex<Option<(f32, String)>>,
    pub limit_hit: Mutex<Option<LimitHit>>,
    dropped: AtomicU64,
    /// Set once the guest is instantiated and its entry point called.
    pub(crate) started: tokio::sync::watch::Sender<bool>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            checkpoint: Mutex::new(None),
            progress: Mutex::new(None),
            limit_hit: Mutex::new(None),
            dropped: AtomicU64::new(0),
            started: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Shared {
    pub fn checkpoint(&self) -> Option<Vec<u8>> {
        self.checkpoint.lock().ok().and_then(|c| c.clone())
    }

    pub fn progress(&self) -> Option<(f32, String)> {
        self.progress.lock().ok().and_then(|p| p.clone())
    }

    pub(crate) fn record_limit(&self, hit: LimitHit) {
        if let Ok(mut slot) = self.limit_hit.lock() {
            slot.get_or_insert(hit);
        }
    }

    pub fn limit_hit(&self) -> Option<LimitHit> {
        self.limit_hit.lock().ok().and_then(|h| h.clone())
    }
}

/// The `T` of every task's `Store<T>`.
///
/// The WASI state is a preview-1 context for every guest: it wraps the same
/// locked-down `WasiCtx` and resource table a component uses (through
/// [`WasiView`]) and adds the small preview-1 adapter a core module needs,
/// so one store type, one limiter and one epoch callback serve both.
pub struct StoreData {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: Limiter,
    pub(crate) cancel: Arc<CancelState>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: Option<mpsc::Sender<GuestEvent>>,
    pub(crate) caps: GuestCaps,
    pub(crate) deadline: Option<std::time::Instant>,
    observed_reported: bool,
}

impl StoreData {
    pub(crate) fn new(
        wasi: WasiP1Ctx,
        limiter: Limiter,
        cancel: Arc<CancelState>,
        shared: Arc<Shared>,
        events: Option<mpsc::Sender<GuestEvent>>,
        caps: GuestCaps,
    ) -> StoreData {
        StoreData {
            wasi,
            limiter,
            cancel,
            shared,
            events,
            caps,
            // Set by the driver when the attempt starts.
            deadline: None,
            observed_reported: false,
        }
    }

    fn emit(&self, event: GuestEvent) {
        if let Some(tx) = &self.events {
            emit_to(tx, &self.shared, event);
        }
    }
}

/// Sends one event without waiting: a full channel counts the event as
/// dropped, and the count is sent (as [`GuestEvent::Dropped`]) before the
/// next event that fits.
pub(crate) fn emit_to(tx: &mpsc::Sender<GuestEvent>, shared: &Shared, event: GuestEvent) {
    let pending = shared.dropped.load(Ordering::Relaxed);
    if pending > 0 {
        match tx.try_send(GuestEvent::Dropped { count: pending }) {
            Ok(()) => {
                shared.dropped.fetch_sub(pending, Ordering::Relaxed);
            }
            Err(_) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    if tx.try_send(event).is_err() {
        shared.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

/// Cuts `s` to at most `max` bytes at a char boundary, marking the cut.
pub(crate) fn cap_string(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl wasmtask::task::types::Host for StoreData {}

impl wasmtask::task::host::Host for StoreData {
    fn log(&mut self, level: LogLevel, message: String, fields: Vec<(String, String)>) {
        let max = self.caps.max_message_bytes;
        let fields = fields
            .into_iter()
            .take(self.caps.max_log_fields)
            .map(|(k, v)| (cap_string(k, 128), cap_string(v, 1024)))
            .collect();
        self.emit(GuestEvent::Log {
            level: level_name(level),
            message: cap_string(message, max),
            fields,
        });
    }

    fn progress(&mut self, fraction: f32, message: String) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let message = cap_string(message, self.caps.max_message_bytes);
        if let Ok(mut p) = self.shared.progress.lock() {
            *p = Some((fraction, message.clone()));
        }
        self.emit(GuestEvent::Progress { fraction, message });
    }

    fn checkpoint(&mut self, data: Vec<u8>) -> wasmtime::Result<()> {
        let max = self.caps.max_checkpoint_bytes;
        if data.len() > max {
            let hit = LimitHit {
                kind: LimitKind::Checkpoint,
                requested: data.len() as u64,
                allowed: max as u64,
            };
            self.shared.record_limit(hit.clone());
            return Err(wasmtime::Error::new(hit));
        }
        let bytes = data.len();
        if let Ok(mut c) = self.shared.checkpoint.lock() {
            *c = Some(data);
        }
        self.emit(GuestEvent::Checkpoint { bytes });
        Ok(())
    }

    fn cancel_requested(&mut self) -> Option<String> {
        let reason = self.cancel.observe();
        if let Some(r) = &reason
            && !self.observed_reported
        {
            self.observed_reported = true;
            self.emit(GuestEvent::CancelObserved { reason: r.clone() });
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::cap_string;

    #[test]
    fn cap_string_cuts_at_char_boundaries() {
        assert_eq!(cap_string("hello".into(), 10), "hello");
        let cut = cap_string("ééééé".into(), 6);
        assert!(cut.len() <= 6, "{cut:?}");
        assert!(cut.ends_with('…'));
    }
}
