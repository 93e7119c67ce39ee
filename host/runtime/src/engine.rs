//! The engine: one wasmtime `Engine` for all tasks, the epoch ticker, and
//! plugins compiled once, cached by content digest and pre-linked.
//!
//! # Invariants
//! - One `Engine` with epoch interruption serves every task; a second one,
//!   identical but with fuel metering, is created lazily the first time a task
//!   asks for fuel (metering slows code 30–80%, so tasks without fuel must not
//!   pay for it). Both share the ticker.
//! - A single ticker thread advances the epoch every
//!   [`RuntimeConfig::epoch_tick`]; a cancel additionally bumps it at once.
//!   The ticker runs at real-time priority where the process may
//!   ([`Runtime::ticker_realtime`]): the tick ends the running guests'
//!   slices, so it must not wait for a CPU behind them.
//! - Components and core modules are compiled only from bytes given to
//!   [`Runtime::load`]; precompiled artifacts are produced by this process
//!   and read back from the cache directory only (never accepted from
//!   users). The cache key is the SHA-256 of the plugin and the engine's
//!   compatibility hash, so a wasmtime upgrade or a config change never
//!   loads a stale artifact.
//! - A plugin is pre-linked (`InstancePre`) once; instantiation per task then
//!   only allocates (pooling allocator where the machine allows it).
//! - A WASI preview-1 *core module* (what `wasm32-wasip1` toolchains emit) is
//!   a command too: it is compiled as a core `Module`, linked against
//!   `wasi_snapshot_preview1` only (the task interface is component-only),
//!   and run by calling its `_start`. It gets the same engine, store type,
//!   limiter, epoch callback, cancel race and sandbox as a component: the
//!   preview-1 functions are implemented over the same `WasiCtx`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::host::{GuestCaps, StoreData, TaskPre};
use crate::scheduler::{GuestPool, GuestPriority};

/// Every knob of the runtime, with its default.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How often the ticker advances the epoch. This is the time slice: a
    /// running guest yields its guest thread at least this often, and a timeout is
    /// noticed within it. Default 2 ms.
    pub epoch_tick: Duration,
    /// Guests that may execute wasm at the same time: the threads of the
    /// guest pool (see `scheduler.rs`). Default: the number of CPUs. More
    /// only adds contention; fewer leaves cores to the rest of the process.
    pub cpu_slots: Option<usize>,
    /// The OS priority of the guest threads (see [`GuestPriority`]).
    /// Default [`GuestPriority::Idle`].
    pub guest_priority: GuestPriority,
    /// Tasks that may be instantiated at once (running or parked). Further
    /// tasks wait for admission (still cancellable). Also sizes the pooling
    /// allocator. Default 1,000.
    pub max_concurrent: usize,
    /// Use the pooling allocator (faster instantiation; reserves address
    /// space per slot up front). Falls back to on-demand allocation, with a
    /// warning, when the machine refuses the reservation. Default `true`.
    pub pooling: bool,
    /// Memory cap of a task that names none, in bytes. Default 256 MiB.
    pub default_max_memory: u64,
    /// The largest memory cap a task may ask for, in bytes. Default 4 GiB
    /// (all of wasm32's address space).
    pub memory_ceiling: u64,
    /// Wasm stack per task, in bytes (engine-wide). Deeper recursion traps
    /// with `stack_overflow`. Default 1 MiB.
    pub max_wasm_stack: usize,
    /// Elements per table. Default 100,000.
    pub max_table_elements: u64,
    /// Core instances, tables and memories per task. Default 100 each.
    pub max_instances: usize,
    pub max_tables: usize,
    pub max_memories: usize,
    /// Where compiled components are cached across runs. Default: none
    /// (in-memory cache only).
    pub cache_dir: Option<PathBuf>,
    /// Let Cranelift inline small wasm functions into their callers, within
    /// a module and across a component's modules (`Inlining::Yes`). Code
    /// with many small calls runs faster (BENCHMARKS.md, part 3: formatting
    /// and sorting 9–16% faster; recursion and plain loops unchanged), but
    /// the first compile of a plugin takes about four times as long, and trap
    /// backtraces omit inlined frames. The cache key covers it. Default
    /// `false`, as wasmtime's.
    pub compiler_inlining: bool,
    /// Bytes of stdout and of stderr kept per task; more is counted and
    /// flagged as truncated. Default 1 MiB.
    pub capture_limit: usize,
    /// Caps on log/progress/checkpoint payloads.
    pub caps: GuestCaps,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            epoch_tick: Duration::from_millis(2),
            cpu_slots: None,
            guest_priority: GuestPriority::Idle,
            max_concurrent: 1000,
            pooling: true,
            default_max_memory: 256 << 20,
            memory_ceiling: 4 << 30,
            max_wasm_stack: 1 << 20,
            max_table_elements: 100_000,
            max_instances: 100,
            max_tables: 100,
            max_memories: 100,
            cache_dir: None,
            compiler_inlining: false,
            capture_limit: 1 << 20,
            caps: GuestCaps::default(),
        }
    }
}

/// What kind of component a plugin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Exports `run` of the `wasmtask:task` world.
    Task,
    /// Exports `wasi:cli/run` (a program with `main`).
    Command,
}

/// Why bytes could not become a plugin. Every variant is the submitter's
/// problem and says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly file (it does not start with the `\\0asm` magic)")]
    NotWasm,
    #[error(
        "this core WebAssembly module is not a WASI preview-1 command: it exports no `_start` function (build a binary with `main`, or a component for wasm32-wasip2)"
    )]
    CoreModule,
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error(
        "unsupported world: the component exports neither `run` (wasmtask:task) nor `wasi:cli/run` (a command); it exports [{0}]"
    )]
    UnknownExports(String),
    #[error("the component needs imports this host does not provide: {0}")]
    Imports(String),
    #[error("the fuel engine could not be created: {0}")]
    FuelEngine(String),
}

pub(crate) enum Prepared {
    Task(TaskPre<StoreData>),
    Command(CommandPre<StoreData>),
    /// A WASI preview-1 core module, run through its `_start`.
    Core(wasmtime::InstancePre<StoreData>),
}

pub(crate) struct PluginInner {
    pub digest: String,
    pub kind: PluginKind,
    pub core: bool,
    pub size: usize,
    pub plain: Prepared,
    pub fuel: OnceLock<Prepared>,
    bytes: Arc<[u8]>,
}

/// A compiled, pre-linked component. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("digest", &self.inner.digest)
            .field("kind", &self.inner.kind)
            .field("size", &self.inner.size)
            .finish()
    }
}

impl Plugin {
    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn kind(&self) -> PluginKind {
        self.inner.kind
    }

    /// A WASI preview-1 core module (always a [`PluginKind::Command`]) rather
    /// than a component.
    pub fn is_core_module(&self) -> bool {
        self.inner.core
    }

    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.inner.size
    }
}

/// An engine's linkers: components, and preview-1 core modules.
pub(crate) struct Linkers {
    pub component: Linker<StoreData>,
    pub core: wasmtime::Linker<StoreData>,
}

pub(crate) struct EngineSet {
    pub plain: Engine,
    pub plain_linker: Linkers,
    fuel: OnceLock<Result<(Engine, Linkers), String>>,
    config: RuntimeConfig,
    pooling_used: bool,
}

pub(crate) struct RuntimeInner {
    pub engines: EngineSet,
    pub config: RuntimeConfig,
    pub pool: GuestPool,
    pub admission: Arc<Semaphore>,
    /// Digest → its compiled plugin, behind a per-digest lock so that a
    /// burst of first uses compiles once (the others wait for it) instead of
    /// once per caller.
    cache: Mutex<HashMap<String, Arc<Mutex<Option<Plugin>>>>>,
    stop_ticker: Arc<AtomicBool>,
    ticker_realtime: AtomicBool,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Release);
    }
}

/// The wasm runtime: engines, ticker, plugin cache, guest pool. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

/// Bytes of a pool slot's linear memory (and of its tables) kept resident
/// when a task ends; see `engine_config`.
const KEEP_RESIDENT: usize = 1 << 20;

fn engine_config(cfg: &RuntimeConfig, fuel: bool, pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    c.consume_fuel(fuel);
    c.max_wasm_stack(cfg.max_wasm_stack);
    // The async (fiber) stack holds the wasm stack plus host frames.
    c.async_stack_size(cfg.max_wasm_stack + (1 << 20));
    // WASI 0.2 guests do not use the component-model async ABI; turning it
    // off removes per-store bookkeeping (measured: +10% tasks/s).
    c.concurrency_support(false);
    if cfg.compiler_inlining {
        c.compiler_inlining(wasmtime::Inlining::Yes);
    }
    if pooling {
        let n = u32::try_from(cfg.max_concurrent.max(1)).unwrap_or(u32::MAX);
        let mut p = PoolingAllocationConfig::new();
        p.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(2))
            .total_stacks(n)
            .max_memory_size(usize::try_from(cfg.memory_ceiling).unwrap_or(usize::MAX))
            .table_elements(usize::try_from(cfg.max_table_elements).unwrap_or(usize::MAX))
            // A finished task's pool slot is reset in place instead of being
            // handed back to the kernel: up to this much of its memory and
            // tables is zeroed (or restored from the image) with memset, and
            // with PAGEMAP_SCAN (Linux 6.7+) only the pages it dirtied. The
            // alternative, madvise(DONTNEED) per task, sends a TLB-shootdown
            // IPI to every worker thread: it was the largest cost of a short
            // task (profiled in BENCHMARKS.md). Resident memory after a burst
            // is bounded by what the tasks dirtied, at most this per slot.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

fn linker(engine: &Engine) -> wasmtime::Result<Linkers> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    crate::host::Task::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    let mut core = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut core, |s: &mut StoreData| &mut s.wasi)?;
    Ok(Linkers {
        component: linker,
        core,
    })
}

impl EngineSet {
    fn new(cfg: &RuntimeConfig) -> anyhow::Result<EngineSet> {
        let (plain, pooling_used) = if cfg.pooling {
            match Engine::new(&engine_config(cfg, false, true)) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                    (
                        Engine::new(&engine_config(cfg, false, false)).map_err(wt)?,
                        false,
                    )
                }
            }
        } else {
            (
                Engine::new(&engine_config(cfg, false, false)).map_err(wt)?,
                false,
            )
        };
        let plain_linker = linker(&plain).map_err(wt)?;
        Ok(EngineSet {
            plain,
            plain_linker,
            fuel: OnceLock::new(),
            config: cfg.clone(),
            pooling_used,
        })
    }

    pub fn fuel(&self) -> Result<&(Engine, Linkers), LoadError> {
        self.fuel
            .get_or_init(|| {
                let engine = Engine::new(&engine_config(&self.config, true, self.pooling_used))
                    .map_err(|e| e.to_string())?;
                let linker = linker(&engine).map_err(|e| e.to_string())?;
                Ok((engine, linker))
            })
            .as_ref()
            .map_err(|e| LoadError::FuelEngine(e.clone()))
    }
}

/// wasmtime's error type into anyhow, keeping the whole chain as text.
pub(crate) fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

fn classify(component: &Component, engine: &Engine) -> Result<PluginKind, LoadError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, item) in ty.exports(engine) {
        if name == "run"
            && matches!(
                item.ty,
                wasmtime::component::types::ComponentItem::ComponentFunc(_)
            )
        {
            return Ok(PluginKind::Task);
        }
        if name.starts_with("wasi:cli/run@0.2") {
            return Ok(PluginKind::Command);
        }
        names.push(name.to_owned());
    }
    Err(LoadError::UnknownExports(names.join(", ")))
}

/// Pre-links a preview-1 core module; it must export `_start`.
fn prepare_core(
    module: &wasmtime::Module,
    linker: &wasmtime::Linker<StoreData>,
) -> Result<Prepared, LoadError> {
    let has_start = module
        .exports()
        .any(|e| e.name() == "_start" && matches!(e.ty(), wasmtime::ExternType::Func(_)));
    if !has_start {
        return Err(LoadError::CoreModule);
    }
    let pre = linker
        .instantiate_pre(module)
        .map_err(|e| LoadError::Imports(format!("{e:#}")))?;
    Ok(Prepared::Core(pre))
}

fn prepare(
    component: &Component,
    kind: PluginKind,
    linker: &Linker<StoreData>,
) -> Result<Prepared, LoadError> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| LoadError::Imports(format!("{e:#}")))?;
    Ok(match kind {
        PluginKind::Task => Prepared::Task(
            TaskPre::new(pre).map_err(|e| LoadError::UnknownExports(format!("{e:#}")))?,
        ),
        PluginKind::Command => Prepared::Command(
            CommandPre::new(pre).map_err(|e| LoadError::UnknownExports(format!("{e:#}")))?,
        ),
    })
}

/// Memory mappings the process needs per task slot, as measured with the
/// pooling allocator (BENCHMARKS.md, part 6): 2 per slot even unused (its
/// fiber stack and guard page), 4 more per instantiated task with one
/// memory and one table; room is left for guests with more.
const MAPPINGS_PER_SLOT: usize = 2;
const MAPPINGS_PER_TASK: usize = 6;
/// Mappings left for the rest of the process (thread stacks, libraries,
/// the heap, SQLite).
const MAPPINGS_RESERVED: usize = 8192;

/// The most tasks that fit at once under a per-process cap of
/// `max_map_count` memory mappings.
pub fn concurrency_cap(max_map_count: usize) -> usize {
    (max_map_count.saturating_sub(MAPPINGS_RESERVED) / (MAPPINGS_PER_SLOT + MAPPINGS_PER_TASK))
        .max(1)
}

/// This kernel's cap on a process's memory mappings (`vm.max_map_count`),
/// when it can be read.
pub fn max_map_count() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// `max_concurrent`, lowered (with a warning) to what the kernel lets one
/// process map. Past the cap an `mmap` fails: an instantiation then fails
/// cleanly, but a heap allocation anywhere in the process aborts it (seen
/// with 10,000 parked tasks under the default cap of 65,530).
fn fit_to_map_limit(mut config: RuntimeConfig, limit: Option<usize>) -> RuntimeConfig {
    if let Some(limit) = limit {
        let cap = concurrency_cap(limit);
        if config.max_concurrent > cap {
            tracing::warn!(
                max_concurrent = config.max_concurrent,
                allowed = cap,
                vm_max_map_count = limit,
                "max_concurrent lowered: each task needs memory mappings and the kernel caps \
                 them per process; raise vm.max_map_count to run more tasks at once"
            );
            config.max_concurrent = cap;
        }
    }
    config
}

impl Runtime {
    /// Creates the engine(s) and starts the epoch ticker. `max_concurrent`
    /// is lowered to what `vm.max_map_count` allows (see
    /// [`concurrency_cap`]); [`Runtime::config`] tells the value in force.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        let config = fit_to_map_limit(config, max_map_count());
        let engines = EngineSet::new(&config)?;
        let slots = config.cpu_slots.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let pool = GuestPool::new(slots, config.guest_priority)?;
        let inner = Arc::new(RuntimeInner {
            pool,
            admission: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            engines,
            cache: Mutex::new(HashMap::new()),
            stop_ticker: Arc::clone(&stop_ticker),
            ticker_realtime: AtomicBool::new(false),
            config,
        });
        let realtime = spawn_ticker(Arc::downgrade(&inner), stop_ticker)?;
        inner.ticker_realtime.store(realtime, Ordering::Release);
        Ok(Runtime { inner })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Whether the epoch ticker runs in the real-time class (`SCHED_FIFO`),
    /// which needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least 1.
    /// Without it the ticker is an ordinary thread, and a guest the kernel
    /// lets run on can delay its tick, and so the end of its own time slice,
    /// up to a scheduler tick (see "Slice ends are scheduling points" in
    /// `scheduler.rs`).
    pub fn ticker_realtime(&self) -> bool {
        self.inner.ticker_realtime.load(Ordering::Acquire)
    }

    /// Threads that execute guests (see `scheduler.rs`).
    pub fn cpu_slots(&self) -> usize {
        self.inner.pool.threads()
    }

    /// Guests ready to run and waiting for a guest thread right now.
    pub fn waiting_for_cpu(&self) -> usize {
        self.inner.pool.waiting()
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.inner.engines.pooling_used
    }

    /// Compiles (or fetches from cache) and pre-links a component. CPU-heavy
    /// on a cache miss (tens of ms): call it from a blocking context, or use
    /// [`Runtime::load_async`].
    pub fn load(&self, bytes: &[u8]) -> Result<Plugin, LoadError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        let digest = format!("sha256:{:x}", Sha256::digest(bytes));
        let slot = Arc::clone(relock(&self.inner.cache).entry(digest.clone()).or_default());
        let mut compiled = relock(&slot);
        if let Some(p) = compiled.as_ref() {
            return Ok(p.clone());
        }
        let result = self.compile_and_link(bytes, &digest);
        match &result {
            Ok(plugin) => *compiled = Some(plugin.clone()),
            // Bytes that do not compile leave nothing behind: a stream of
            // bad uploads must not grow the map.
            Err(_) => {
                drop(compiled);
                relock(&self.inner.cache).remove(&digest);
            }
        }
        result
    }

    fn compile_and_link(&self, bytes: &[u8], digest: &str) -> Result<Plugin, LoadError> {
        let engine = &self.inner.engines.plain;
        let core = is_core_module(bytes);
        let (kind, plain) = if core {
            let module = self.compile_core(engine, bytes, digest, false)?;
            (
                PluginKind::Command,
                prepare_core(&module, &self.inner.engines.plain_linker.core)?,
            )
        } else {
            let component = self.compile(engine, bytes, digest, false)?;
            let kind = classify(&component, engine)?;
            (
                kind,
                prepare(&component, kind, &self.inner.engines.plain_linker.component)?,
            )
        };
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                digest: digest.to_owned(),
                kind,
                core,
                size: bytes.len(),
                plain,
                fuel: OnceLock::new(),
                bytes: Arc::from(bytes),
            }),
        })
    }

    /// [`Runtime::load`] on a blocking thread, keeping the async runtime free.
    pub async fn load_async(&self, bytes: Vec<u8>) -> Result<Plugin, LoadError> {
        let rt = self.clone();
        tokio::task::spawn_blocking(move || rt.load(&bytes))
            .await
            .map_err(|e| LoadError::Invalid(format!("compilation aborted: {e}")))?
    }

    /// The fuel-metered variant of a plugin, compiled on first use.
    pub(crate) fn fuel_variant<'p>(&self, plugin: &'p Plugin) -> Result<&'p Prepared, LoadError> {
        if let Some(p) = plugin.inner.fuel.get() {
            return Ok(p);
        }
        let (engine, linkers) = self.inner.engines.fuel()?;
        let prepared = if plugin.inner.core {
            let module =
                self.compile_core(engine, &plugin.inner.bytes, &plugin.inner.digest, true)?;
            prepare_core(&module, &linkers.core)?
        } else {
            let component =
                self.compile(engine, &plugin.inner.bytes, &plugin.inner.digest, true)?;
            prepare(&component, plugin.inner.kind, &linkers.component)?
        };
        // A racing thread may have set it first; either value is equivalent.
        let _ = plugin.inner.fuel.set(prepared);
        plugin
            .inner
            .fuel
            .get()
            .ok_or_else(|| LoadError::Invalid("fuel variant vanished".into()))
    }

    /// Where the compiled form of `digest` for `engine` is cached, if a
    /// cache directory is configured.
    fn cache_path(&self, engine: &Engine, digest: &str, fuel: bool) -> Option<PathBuf> {
        self.inner.config.cache_dir.as_ref().map(|dir| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            let hex = digest.trim_start_matches("sha256:");
            dir.join(format!(
                "{hex}-{:016x}{}.cwasm",
                h.finish(),
                if fuel { "-fuel" } else { "" }
            ))
        })
    }

    /// Compiles a component, through the on-disk cache.
    fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &str,
        fuel: bool,
    ) -> Result<Component, LoadError> {
        cached(
            self.cache_path(engine, digest, fuel),
            // SAFETY: see `cached`.
            |path| unsafe { Component::deserialize_file(engine, path) },
            || Component::from_binary(engine, bytes),
            Component::serialize,
        )
    }

    /// Compiles a core (preview-1) module, through the on-disk cache.
    fn compile_core(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &str,
        fuel: bool,
    ) -> Result<wasmtime::Module, LoadError> {
        cached(
            self.cache_path(engine, digest, fuel),
            // SAFETY: see `cached`.
            |path| unsafe { wasmtime::Module::deserialize_file(engine, path) },
            || wasmtime::Module::from_binary(engine, bytes),
            wasmtime::Module::serialize,
        )
    }
}

/// Loads the compiled artifact at `path` if there is one, or else compiles
/// it and writes it there.
///
/// Safety of `deserialize`: files in the cache directory are written only by
/// `serialize` of this process family (here), keyed by the content digest
/// and the engine's compatibility hash; user bytes are never deserialized.
/// A corrupt file fails to load and is recompiled.
fn cached<T>(
    path: Option<PathBuf>,
    deserialize: impl FnOnce(&std::path::Path) -> wasmtime::Result<T>,
    compile: impl FnOnce() -> wasmtime::Result<T>,
    serialize: impl FnOnce(&T) -> wasmtime::Result<Vec<u8>>,
) -> Result<T, LoadError> {
    if let Some(path) = &path
        && path.exists()
    {
        match deserialize(path) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable cached artifact");
            }
        }
    }
    let compiled = compile().map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    if let Some(path) = &path {
        let written = serialize(&compiled)
            .map_err(wt)
            .and_then(|bytes| write_cache(path, &bytes));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the compile cache");
        }
    }
    Ok(compiled)
}

/// A core module has version `1` and layer `0` after the magic; a component
/// has version `0x0d` and layer `1`.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(&[1, 0, 0, 0])
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain
/// maps and slots, each update a single assignment).
fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_cache(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Write then rename, so a reader never sees a half-written artifact. The
    // temporary name is unique per process and call, so two writers (two
    // processes sharing a cache, or the plain and fuel variants) never
    // share one.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Starts the ticker thread and returns whether it runs at real-time
/// priority (see [`Runtime::ticker_realtime`]).
fn spawn_ticker(rt: std::sync::Weak<RuntimeInner>, stop: Arc<AtomicBool>) -> anyhow::Result<bool> {
    let tick = rt
        .upgrade()
        .map(|r| r.config.epoch_tick)
        .unwrap_or(Duration::from_millis(2));
    let (told, priority) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("wasmtask-epoch".into())
        .spawn(move || {
            let _ = told.send(crate::scheduler::make_realtime());
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(tick);
                let Some(rt) = rt.upgrade() else { break };
                rt.engines.plain.increment_epoch();
                if let Some(Ok((fuel, _))) = rt.engines.fuel.get() {
                    fuel.increment_epoch();
                }
            }
        })?;
    match priority.recv()? {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::info!(
                error = %e,
                "the epoch ticker runs at normal priority (real-time priority not permitted): \
                 under load a guest's time slice can end up to a scheduler tick late"
            );
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_cap_lowers_max_concurrent_only_past_it() {
        // The default cap of Linux: about 7,000 tasks at once.
        assert_eq!(concurrency_cap(65_530), 7_167);
        let asked = |n| RuntimeConfig {
            max_concurrent: n,
            ..RuntimeConfig::default()
        };
        assert_eq!(
            fit_to_map_limit(asked(10_016), Some(65_530)).max_concurrent,
            7_167
        );
        assert_eq!(
            fit_to_map_limit(asked(1_000), Some(65_530)).max_concurrent,
            1_000
        );
        assert_eq!(
            fit_to_map_limit(asked(10_016), Some(262_144)).max_concurrent,
            10_016
        );
        // Unknown cap (not Linux, /proc unreadable): as asked.
        assert_eq!(fit_to_map_limit(asked(10_016), None).max_concurrent, 10_016);
        // A tiny cap still leaves one task.
        assert_eq!(concurrency_cap(100), 1);
    }

    #[test]
    fn the_ticker_is_real_time_where_the_process_may_use_it() {
        // Whether this process may use the real-time class, asked on a
        // thread of its own (the answer depends on the machine, the test
        // checks that the runtime acts on it and says so).
        let permitted = std::thread::spawn(|| crate::scheduler::make_realtime().is_ok())
            .join()
            .unwrap();
        let rt = Runtime::new(RuntimeConfig {
            pooling: false,
            ..RuntimeConfig::default()
        })
        .unwrap();
        assert_eq!(rt.ticker_realtime(), permitted);
        #[cfg(target_os = "linux")]
        {
            // The ticker threads of this test process (other tests' runtimes
            // included, made the same way) are in that class.
            let mut policies = Vec::new();
            for entry in std::fs::read_dir("/proc/self/task").unwrap() {
                let dir = entry.unwrap().path();
                let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                if comm.trim_end() != "wasmtask-epoch" {
                    continue;
                }
                let tid: libc::pid_t = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
                // SAFETY: a plain query of another thread's policy.
                let policy = unsafe { libc::sched_getscheduler(tid) };
                if policy >= 0 {
                    policies.push(policy);
                }
            }
            assert!(!policies.is_empty(), "no ticker thread found");
            let want = if permitted {
                libc::SCHED_FIFO
            } else {
                libc::SCHED_OTHER
            };
            assert!(
                policies.iter().all(|&p| p == want),
                "{policies:?}, want {want}"
            );
        }
    }

    #[test]
    fn a_runtime_reports_the_max_concurrent_in_force() {
        let rt = Runtime::new(RuntimeConfig {
            max_concurrent: 1 << 20,
            pooling: false,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let want = max_map_count().map_or(1 << 20, concurrency_cap);
        assert_eq!(rt.config().max_concurrent, want);
    }
}
