//! Per-task resource limits and the limiter that enforces them.
//!
//! Memory and table growth is checked by wasmtime through
//! [`wasmtime::ResourceLimiter`] on every `memory.grow`/`table.grow` and at
//! instantiation. A refused growth returns `-1` to the guest, as the wasm spec
//! says; most guests then abort (Rust's allocator traps with `unreachable`),
//! and the host reports the task as *limit exceeded: memory* because the
//! limiter recorded the refusal. A guest that copes with a refused growth and
//! finishes is not failed.
//!
//! The wasm stack is capped engine-wide ([`crate::RuntimeConfig::max_wasm_stack`]):
//! wasmtime sizes it per engine, not per store. Wall-clock time and fuel are
//! enforced by the driver and the epoch callback (see `cancel.rs`).

use std::time::Duration;

/// Limits for one task attempt. `None` means the runtime default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskLimits {
    /// Wall-clock limit from the start of instantiation. Default: none. At the
    /// limit the guest is stopped by force and the task ends `timed_out`.
    pub timeout: Option<Duration>,
    /// Total linear memory of all the task's memories, in bytes. Default:
    /// [`crate::RuntimeConfig::default_max_memory`]. Growth past it is refused.
    pub max_memory: Option<u64>,
    /// Fuel (roughly, wasm instructions) the task may burn. Default: unmetered.
    /// A task with fuel runs on a second engine compiled with fuel metering,
    /// which costs 30–80% speed; tasks without fuel pay nothing.
    pub fuel: Option<u64>,
}

/// Which limit a task ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Memory,
    TableElements,
    Instances,
    Tables,
    Memories,
    Fuel,
    Checkpoint,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::TableElements => "table_elements",
            LimitKind::Instances => "instances",
            LimitKind::Tables => "tables",
            LimitKind::Memories => "memories",
            LimitKind::Fuel => "fuel",
            LimitKind::Checkpoint => "checkpoint",
        }
    }
}

/// A refused request, with what was asked and what was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHit {
    pub kind: LimitKind,
    pub requested: u64,
    pub allowed: u64,
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            LimitKind::Memory | LimitKind::Checkpoint => write!(
                f,
                "{} limit exceeded: {} bytes requested, {} allowed",
                self.kind.as_str(),
                self.requested,
                self.allowed
            ),
            _ => write!(
                f,
                "{} limit exceeded: {} requested, {} allowed",
                self.kind.as_str(),
                self.requested,
                self.allowed
            ),
        }
    }
}

impl std::error::Error for LimitHit {}

/// The store's limiter: enforces [`TaskLimits`] and tracks peak memory.
#[derive(Debug)]
pub(crate) struct Limiter {
    pub max_memory: u64,
    pub max_table_elements: u64,
    pub max_instances: usize,
    pub max_tables: usize,
    pub max_memories: usize,
    /// Sum of the current sizes of all memories.
    pub memory_now: u64,
    pub peak_memory: u64,
    /// The first refusal, if any.
    pub hit: Option<LimitHit>,
}

impl Limiter {
    /// A fresh limiter for one store: `max_memory` bytes, the rest from the
    /// runtime's configuration.
    pub(crate) fn new(max_memory: u64, cfg: &crate::RuntimeConfig) -> Limiter {
        Limiter {
            max_memory,
            max_table_elements: cfg.max_table_elements,
            max_instances: cfg.max_instances,
            max_tables: cfg.max_tables,
            max_memories: cfg.max_memories,
            memory_now: 0,
            peak_memory: 0,
            hit: None,
        }
    }

    fn refuse(&mut self, kind: LimitKind, requested: u64, allowed: u64) {
        self.hit.get_or_insert(LimitHit {
            kind,
            requested,
            allowed,
        });
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = (desired as u64).saturating_sub(current as u64);
        let total = self.memory_now.saturating_add(grow);
        if total > self.max_memory {
            self.refuse(LimitKind::Memory, total, self.max_memory);
            return Ok(false);
        }
        self.memory_now = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_table_elements {
            self.refuse(
                LimitKind::TableElements,
                desired as u64,
                self.max_table_elements,
            );
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_tables
    }

    fn memories(&self) -> usize {
        self.max_memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    fn limiter(max: u64) -> Limiter {
        Limiter {
            max_memory: max,
            max_table_elements: 10,
            max_instances: 1,
            max_tables: 1,
            max_memories: 1,
            memory_now: 0,
            peak_memory: 0,
            hit: None,
        }
    }

    #[test]
    fn memory_growth_is_refused_past_the_cap_and_recorded() {
        let mut l = limiter(1 << 20);
        assert!(l.memory_growing(0, 65536, None).unwrap());
        assert!(l.memory_growing(65536, 1 << 20, None).unwrap());
        assert!(!l.memory_growing(1 << 20, (1 << 20) + 65536, None).unwrap());
        assert_eq!(l.peak_memory, 1 << 20);
        let hit = l.hit.clone().unwrap();
        assert_eq!(hit.kind, LimitKind::Memory);
        assert_eq!(hit.allowed, 1 << 20);
        assert!(hit.to_string().contains("memory limit exceeded"));
    }

    #[test]
    fn table_growth_is_refused_past_the_cap() {
        let mut l = limiter(1 << 20);
        assert!(l.table_growing(0, 10, None).unwrap());
        assert!(!l.table_growing(10, 11, None).unwrap());
        assert_eq!(l.hit.unwrap().kind, LimitKind::TableElements);
    }
}
