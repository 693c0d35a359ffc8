//! The WebAssembly side of the host: one engine, the loaded plugins, and the sandbox in which
//! each attempt runs.
//!
//! Every attempt gets a fresh `wasmtime::Store` and instance. Its wall-clock deadline is
//! enforced with epoch interruption: a dedicated OS thread ticks the engine's epoch every
//! [`EPOCH_TICK`], and at each tick a running guest yields to the async runtime (so a guest
//! that never returns cannot starve other tasks) and is trapped once its deadline has passed
//! or the host asked it to stop. An optional fuel budget bounds the CPU work of an attempt,
//! and a memory cap bounds its linear memories. What crosses the boundary is bounded too
//! ([`BoundaryLimits`]): the result's size, the log volume and rate, the progress-update
//! rate and the size of the parameters; going over one ends the attempt as
//! [`TrapReason::HostLimit`], never the host.
//!
//! Each plugin runs under its own limits and grants: its manifest's over the host's
//! ([`manifest`]).
//!
//! This module does not decide what happens after an attempt; it reports an
//! [`AttemptOutcome`] and the scheduler takes it from there.

pub mod bindings;
pub mod capabilities;
pub mod manifest;
pub mod output;
pub mod plugin;
pub mod sandbox;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use crate::task::Task;
use bindings::{Failure, Handler};
pub use capabilities::{Capabilities, Grants};
pub use plugin::{Plugin, PluginSet};
use sandbox::{AttemptSignals, AttemptState};

/// How often the epoch advances: the precision of deadlines, and how often a running guest
/// yields to other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The limits every instance runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Wall-clock time one attempt may take.
    pub exec_timeout: Duration,
    /// Fuel (roughly, WebAssembly instructions) one attempt may burn; `None` for no budget.
    pub fuel: Option<u64>,
    /// Bytes of linear memory one instance may have, all its memories together.
    pub memory_bytes: usize,
    /// Instances the pooling allocator keeps slots for (memories, tables, stacks reserved
    /// once and reused), or `None` to allocate every instance's memory on demand. An
    /// attempt waits for a free slot rather than fail, so size it for every attempt that
    /// can run at once: the sum of the plugins' concurrencies. Host-wide: a plugin's
    /// manifest cannot change it.
    pub pool: Option<u32>,
    /// Limits on what crosses the boundary between the host and the guest.
    pub boundary: BoundaryLimits,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            exec_timeout: Duration::from_secs(60),
            fuel: None,
            memory_bytes: 256 * 1024 * 1024,
            pool: None,
            boundary: BoundaryLimits::default(),
        }
    }
}

/// Limits on what one attempt hands the host. Going over one ends the attempt as
/// [`TrapReason::HostLimit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundaryLimits {
    /// Bytes of the handler's result. Default 1 MiB.
    pub output_bytes: usize,
    /// Bytes one attempt may write through the host's `log`. Default 1 MiB. (Its stdout and
    /// stderr are separate: kept up to 64 KiB each, the rest dropped.)
    pub log_bytes: usize,
    /// Log lines per second, sustained; bursts of ten seconds' worth pass. Default 100.
    pub log_lines_per_s: u32,
    /// Progress updates per second, sustained; bursts of ten seconds' worth pass. Default 20.
    pub progress_per_s: u32,
}

impl Default for BoundaryLimits {
    fn default() -> Self {
        BoundaryLimits {
            output_bytes: 1024 * 1024,
            log_bytes: 1024 * 1024,
            log_lines_per_s: 100,
            progress_per_s: 20,
        }
    }
}

/// An attempt went over one of its [`BoundaryLimits`] (or its task's parameters are over
/// [`crate::task::MAX_PARAMS_BYTES`]); the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimitExceeded(pub String);

impl fmt::Display for HostLimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostLimitExceeded {}

/// What one instance of a plugin may hold in a pooled runtime. A component needing more
/// memories or tables is refused when it loads ([`Runtime::check_fits`]); one needing more
/// core instances fails to instantiate, naming the limit.
///
/// The pool holds this much for every one of its instances, so that any mix of plugins
/// can fill every slot: an attempt waits for a free instance slot, never for one of
/// these.
pub mod pool_limits {
    /// Core instances in one component (Rust components have three to five; a Python
    /// component, CPython's libraries and their shims, about a dozen).
    pub const CORE_INSTANCES: u32 = 16;
    /// Linear memories in one component (Rust and Python components have one).
    pub const MEMORIES: u32 = 2;
    /// Tables in one component (Rust and Python components have two).
    pub const TABLES: u32 = 8;
}

/// Bytes of each pooled memory kept resident between instances (echo's memory fits).
const KEEP_RESIDENT: usize = 2 * 1024 * 1024;

/// The pooling allocator's configuration for `instances` instances under `limits`.
fn pooling_config(instances: u32, limits: &SandboxLimits) -> wasmtime::PoolingAllocationConfig {
    use pool_limits::{CORE_INSTANCES, MEMORIES, TABLES};
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES))
        .total_memories(instances.saturating_mul(MEMORIES))
        .total_tables(instances.saturating_mul(TABLES))
        .total_stacks(instances)
        .max_core_instances_per_component(CORE_INSTANCES)
        .max_memories_per_component(MEMORIES)
        .max_tables_per_component(TABLES)
        .max_memories_per_module(MEMORIES)
        .max_tables_per_module(TABLES)
        // A memory may grow to the whole cap; the store's limiter holds all of an
        // instance's memories together to it.
        .max_memory_size(limits.memory_bytes);
    // A freed slot's first pages are zeroed and kept instead of being returned to the
    // kernel: each `madvise` costs a TLB shootdown on every core, the largest single cost
    // per task (echo on Redis: 11.8k tasks/s without this, 14.7k with it; BENCHMARKS.md).
    // That holds at most KEEP_RESIDENT per slot; pages past it are given back at once.
    // (Batching the decommits did as well, but holds a whole slot's memory until a batch
    // fills, which a plugin that used a gigabyte makes expensive.)
    pool.linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT / 16);
    pool
}

/// Why the host stopped an instance from the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupt {
    /// The attempt ran past its deadline.
    Timeout(Duration),
    /// The host asked the attempt to stop.
    Cancelled,
}

impl fmt::Display for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interrupt::Timeout(limit) => {
                write!(f, "timed out after {limit:?} (limits.exec_timeout_ms)")
            }
            Interrupt::Cancelled => f.write_str("canceled while running"),
        }
    }
}

impl std::error::Error for Interrupt {}

/// Why an attempt ended without a result because of the sandbox; each is a stable name used
/// in task errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapReason {
    /// Past `exec_timeout`.
    Timeout,
    /// Used up its fuel budget.
    OutOfFuel,
    /// Tried to grow its memory past the cap.
    MemoryLimit,
    /// Exhausted the WebAssembly stack.
    StackOverflow,
    /// The guest panicked or aborted (`unreachable`).
    GuestPanic,
    /// The host stopped it on request.
    Canceled,
    /// It went over a limit on what crosses the boundary ([`BoundaryLimits`]).
    HostLimit,
    /// Any other trap or instantiation error.
    Trap,
}

impl TrapReason {
    /// The reason's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            TrapReason::Timeout => "timeout",
            TrapReason::OutOfFuel => "out_of_fuel",
            TrapReason::MemoryLimit => "memory_limit",
            TrapReason::StackOverflow => "stack_overflow",
            TrapReason::GuestPanic => "guest_panic",
            TrapReason::Canceled => "canceled",
            TrapReason::HostLimit => "host_limit",
            TrapReason::Trap => "trap",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// The handler returned a result (JSON text).
    Completed(String),
    /// The handler returned a failure.
    Failed(Failure),
    /// The sandbox stopped the instance, or it could not be started.
    Trapped {
        /// Why, as a stable name.
        reason: TrapReason,
        /// What happened, for the task's error.
        message: String,
    },
}

/// Advances the engine's epoch on its own OS thread until dropped.
///
/// A thread, not an async task: a guest that never yields would hold an async worker, and a
/// ticker on the same runtime could then never fire.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rebound-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("cannot start the epoch ticker thread")?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The engine, the linker with the host imports, and the limits; shared by all plugins.
pub struct Runtime {
    engine: Engine,
    linker: Linker<AttemptState>,
    limits: SandboxLimits,
    /// One permit per pooled instance slot, held while an instance lives, so an attempt
    /// beyond the pool waits for a slot instead of failing; `None` without a pool.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    _ticker: EpochTicker,
}

impl Runtime {
    /// Builds the engine and starts its epoch ticker. Plugins are compiled at every load.
    pub fn new(limits: SandboxLimits) -> anyhow::Result<Self> {
        Runtime::with_cache(limits, None)
    }

    /// Like [`Runtime::new`], with compiled plugins cached in `cache_dir`: a component
    /// already compiled by this version of the engine, with these settings, loads from
    /// there instead of being compiled again. The key is a hash of the component's bytes
    /// and of the engine's version and settings, so a changed file or a new Rebound
    /// compiles afresh; an unreadable or corrupt entry is compiled again and replaced.
    pub fn with_cache(limits: SandboxLimits, cache_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Always metered, so that a plugin's manifest can set a budget on a host that has
        // none; an attempt without a budget gets all the fuel there is.
        config.consume_fuel(true);
        if let Some(instances) = limits.pool {
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(
                pooling_config(instances, &limits),
            ));
        }
        if let Some(dir) = cache_dir {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the compiled-plugin cache {}", dir.display())
            })?;
            let dir = std::path::absolute(dir)
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(&dir);
            let cache = wasmtime::Cache::new(cache)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot use {} as the plugin cache", dir.display()))?;
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .with_context(|| match limits.pool {
                // Reserving the pool's address space is what fails; say what was asked.
                Some(instances) => format!(
                    "cannot create the WebAssembly engine with a pool of {instances} instances \
                     of up to {} MiB each (concurrency × plugins); lower the concurrency or the \
                     memory cap, or set limits.pooling = false",
                    limits.memory_bytes / (1024 * 1024)
                ),
                None => "cannot create the WebAssembly engine".to_owned(),
            })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI into the sandbox")?;
        // Every plugin may import wasi:http; only granted requests get through.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link wasi:http into the sandbox")?;
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("cannot link the host imports")?;

        let ticker = EpochTicker::start(engine.clone())?;
        let slots = limits
            .pool
            .map(|instances| Arc::new(tokio::sync::Semaphore::new(instances as usize)));
        Ok(Runtime {
            engine,
            linker,
            limits,
            slots,
            _ticker: ticker,
        })
    }

    /// The engine plugins are compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker that holds WASI and the host imports.
    pub fn linker(&self) -> &Linker<AttemptState> {
        &self.linker
    }

    /// The host's limits: those of every plugin whose manifest sets none of its own.
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Refuses a component that could never be instantiated under these limits: more
    /// memories or tables than a pooled instance may hold, or a memory that starts larger
    /// than the memory cap.
    pub fn check_fits(
        &self,
        component: &wasmtime::component::Component,
        limits: &SandboxLimits,
    ) -> anyhow::Result<()> {
        // `None`: the component imports core modules, which plugins cannot do.
        let Some(needs) = component.resources_required() else {
            return Ok(());
        };
        let initial_bytes = needs
            .max_initial_memory_size
            .unwrap_or(0)
            .saturating_mul(64 * 1024);
        if initial_bytes > limits.memory_bytes as u64 {
            anyhow::bail!(
                "a memory starts at {} MiB, over the memory cap of {} MiB",
                initial_bytes / (1024 * 1024),
                limits.memory_bytes / (1024 * 1024)
            );
        }
        if self.limits.pool.is_some() {
            if needs.num_memories > pool_limits::MEMORIES {
                anyhow::bail!(
                    "it has {} memories; a pooled instance holds at most {}",
                    needs.num_memories,
                    pool_limits::MEMORIES
                );
            }
            if needs.num_tables > pool_limits::TABLES {
                anyhow::bail!(
                    "it has {} tables; a pooled instance holds at most {}",
                    needs.num_tables,
                    pool_limits::TABLES
                );
            }
        }
        Ok(())
    }

    /// Runs `handle` for one attempt of `task` in a fresh instance of `plugin`.
    pub async fn run_attempt(
        &self,
        plugin: &Plugin,
        task: &Task,
        gpu: Option<u32>,
        signals: &AttemptSignals,
    ) -> AttemptOutcome {
        let limits = plugin.limits();
        if task.params.len() > crate::task::MAX_PARAMS_BYTES {
            return AttemptOutcome::Trapped {
                reason: TrapReason::HostLimit,
                message: format!(
                    "params of {} bytes are over the limit of {} bytes",
                    task.params.len(),
                    crate::task::MAX_PARAMS_BYTES
                ),
            };
        }
        let wit_task = wit_task(task, plugin.max_attempts(task), gpu);
        let started = Instant::now();
        let fuel = limits.fuel;
        let result = self
            .call(plugin, signals, |mut store| async move {
                let instantiating = Instant::now();
                let handler = plugin.pre().instantiate_async(&mut store).await?;
                crate::metrics::instantiated(plugin.queue(), instantiating.elapsed());
                let outcome = handler.call_handle(&mut store, &wit_task).await;
                store.data().flush_output();
                if let Some(budget) = fuel {
                    let left = store.get_fuel().unwrap_or(0);
                    crate::metrics::fuel_consumed(plugin.queue(), budget.saturating_sub(left));
                }
                outcome
            })
            .await;

        match result {
            Ok(Ok(output)) if output.len() > limits.boundary.output_bytes => {
                AttemptOutcome::Trapped {
                    reason: TrapReason::HostLimit,
                    message: format!(
                        "returned {} bytes of output, over the limit of {} bytes \
                         (limits.max_output_kb)",
                        output.len(),
                        limits.boundary.output_bytes
                    ),
                }
            }
            Ok(Ok(output)) => match serde_json::from_str::<serde::de::IgnoredAny>(&output) {
                Ok(_) => AttemptOutcome::Completed(output),
                Err(err) => AttemptOutcome::Failed(Failure::Fatal(format!(
                    "plugin `{}` returned output that is not JSON: {err}",
                    plugin.name()
                ))),
            },
            Ok(Err(failure)) => AttemptOutcome::Failed(failure),
            Err(err) => {
                let (reason, mut message) = classify_trap(&err, started.elapsed());
                if reason == TrapReason::GuestPanic
                    && let Some(panic) = signals.panic_message()
                {
                    message = format!("{message}: {panic}");
                }
                AttemptOutcome::Trapped { reason, message }
            }
        }
    }

    /// Runs the plugin's `on-exhausted` hook for `task`, whose last error was `error`, in a
    /// fresh instance under the same limits as an attempt.
    pub async fn run_exhausted_hook(
        &self,
        plugin: &Plugin,
        task: &Task,
        gpu: Option<u32>,
        error: &str,
    ) -> Result<(), String> {
        let signals = AttemptSignals::new(task.progress);
        let wit_task = wit_task(task, plugin.max_attempts(task), gpu);
        let started = Instant::now();
        let result = self
            .call(plugin, &signals, |mut store| async move {
                let handler = plugin.pre().instantiate_async(&mut store).await?;
                let outcome = handler
                    .call_on_exhausted(&mut store, &wit_task, error)
                    .await;
                store.data().flush_output();
                outcome
            })
            .await;
        result.map_err(|err| classify_trap(&err, started.elapsed()).1)
    }

    /// Runs `work` on a fresh store under the attempt's deadline and interrupts.
    ///
    /// A guest that computes is trapped by the epoch callback (see `new_store`). A guest
    /// blocked in a host call (a WASI sleep, say) runs no code that could notice the epoch, so
    /// the call is also raced against the deadline and the interrupt signal, a few ticks
    /// late so that the trap, which has the better message, wins whenever it can; losing
    /// the race drops the instance where it stands.
    async fn call<T, F, Fut>(
        &self,
        plugin: &Plugin,
        signals: &AttemptSignals,
        work: F,
    ) -> wasmtime::Result<T>
    where
        F: FnOnce(Store<AttemptState>) -> Fut,
        Fut: Future<Output = wasmtime::Result<T>>,
    {
        // A pooled instance needs a slot; the deadline counts from when it has one.
        let _slot = match &self.slots {
            Some(slots) => Some(slots.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        let limits = plugin.limits();
        let timeout = limits.exec_timeout;
        let deadline = Instant::now() + timeout;
        let store = self.new_store(plugin, signals.clone(), deadline);
        let backstop = async {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = signals.interrupted() => {}
            }
            tokio::time::sleep(EPOCH_TICK * 3).await;
        };
        tokio::select! {
            result = work(store) => result,
            _ = backstop => Err(wasmtime::Error::new(match signals.interrupt_cause() {
                Some(_) => Interrupt::Cancelled,
                None => Interrupt::Timeout(timeout),
            })),
        }
    }

    /// A store for one instance: limits, fuel, and the epoch callback that enforces the
    /// deadline and interrupts while yielding at every tick.
    fn new_store(
        &self,
        plugin: &Plugin,
        signals: AttemptSignals,
        deadline: Instant,
    ) -> Store<AttemptState> {
        let limits = plugin.limits();
        let state = AttemptState::new(signals, limits, plugin.grants());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(limits.fuel.unwrap_or(u64::MAX))
            .expect("the engine meters fuel");

        let timeout = limits.exec_timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |ctx| {
            if ctx.data().signals().interrupt_cause().is_some() {
                return Err(wasmtime::Error::new(Interrupt::Cancelled));
            }
            if Instant::now() >= deadline {
                return Err(wasmtime::Error::new(Interrupt::Timeout(timeout)));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }
}

/// The task as the plugin sees it; `gpu` is the index of the GPU the gate admitted it to.
fn wit_task(task: &Task, max_attempts: u32, gpu: Option<u32>) -> bindings::Task {
    bindings::Task {
        id: task.id.clone(),
        queue: task.queue.clone(),
        params: task.params.clone(),
        attempt: task.attempt,
        max_attempts,
        gpu,
        progress: task.progress,
    }
}

/// Names why an instance stopped, from the error wasmtime returned.
fn classify_trap(err: &wasmtime::Error, elapsed: Duration) -> (TrapReason, String) {
    if let Some(exceeded) = err.downcast_ref::<HostLimitExceeded>() {
        return (TrapReason::HostLimit, exceeded.to_string());
    }
    if let Some(interrupt) = err.downcast_ref::<Interrupt>() {
        let reason = match interrupt {
            Interrupt::Timeout(_) => TrapReason::Timeout,
            Interrupt::Cancelled => TrapReason::Canceled,
        };
        return (reason, interrupt.to_string());
    }
    if let Some(trap) = err.downcast_ref::<Trap>() {
        let reason = match trap {
            Trap::OutOfFuel => TrapReason::OutOfFuel,
            Trap::StackOverflow => TrapReason::StackOverflow,
            Trap::UnreachableCodeReached => TrapReason::GuestPanic,
            _ => TrapReason::Trap,
        };
        let what = match reason {
            TrapReason::OutOfFuel => "ran out of fuel (limits.fuel)".to_owned(),
            TrapReason::StackOverflow => "overflowed its stack".to_owned(),
            TrapReason::GuestPanic => "panicked (wasm `unreachable`)".to_owned(),
            _ => format!("trapped: {trap}"),
        };
        return (reason, format!("{what} after {elapsed:?}"));
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return (
            TrapReason::Trap,
            format!(
                "the plugin exited with status {} instead of returning",
                exit.0
            ),
        );
    }
    // The root cause says what happened; the rest of the chain is a wasm backtrace, too
    // long for a task's error.
    let cause = err.root_cause().to_string();
    // With trap-on-grow-failure, a memory cap violation is an error whose root cause names
    // the failed grow rather than a `Trap` variant.
    if cause.contains("memory") && (cause.contains("grow") || cause.contains("limit")) {
        return (
            TrapReason::MemoryLimit,
            format!("went over its memory limit (limits.memory_mb): {cause}"),
        );
    }
    (TrapReason::Trap, format!("failed: {cause}"))
}
