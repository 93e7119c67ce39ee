//! Measurement hooks for the benchmark (`host/bench`): pieces of a task's
//! start-up timed on their own, through exactly the code and configuration
//! a real task uses. Not part of the product's API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::CancelState;
use crate::engine::{Plugin, Prepared, Runtime};
use crate::host::{Shared, StoreData};
use crate::limits::Limiter;
use crate::sandbox::{self, Capture, WasiSpec};

impl Runtime {
    /// Builds a task's store (sandbox, limiter, cancel state) as
    /// [`Runtime::spawn`] does and instantiates `plugin` in it from its
    /// pre-linked form, without calling it. Returns the time from creating
    /// the store to the instance being ready; the store is then dropped.
    #[doc(hidden)]
    pub async fn probe_instantiate(&self, plugin: &Plugin) -> Result<Duration, String> {
        let cfg = &self.inner.config;
        let engine = self.inner.engines.plain.clone();
        let stdout = Capture::new(cfg.capture_limit, None);
        let stderr = Capture::new(cfg.capture_limit, None);
        let wasi = sandbox::build(WasiSpec::default(), "probe", &stdout, &stderr)
            .map_err(|e| e.to_string())?;
        let limiter = Limiter::new(cfg.default_max_memory, cfg);
        let data = StoreData::new(
            wasi,
            limiter,
            Arc::new(CancelState::new(engine.clone())),
            Arc::new(Shared::default()),
            None,
            cfg.caps,
        );
        let t0 = Instant::now();
        let mut store = wasmtime::Store::new(&engine, data);
        store.limiter(|d| &mut d.limiter);
        // Nothing runs, so no epoch callback is needed; a far deadline keeps
        // a tick during instantiation from trapping.
        store.set_epoch_deadline(1 << 40);
        match &plugin.inner.plain {
            Prepared::Task(pre) => {
                pre.instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
            }
            Prepared::Command(pre) => {
                pre.instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
            }
            Prepared::Core(pre) => {
                pre.instantiate_async(&mut store)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
            }
        }
        let took = t0.elapsed();
        drop(store);
        Ok(took)
    }
}
