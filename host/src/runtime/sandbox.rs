//! What one instance can see and touch: its WASI context, its limits, and the host imports.
//!
//! Each attempt gets a fresh [`AttemptState`] inside a fresh `wasmtime::Store`, so nothing
//! leaks from one task to the next. WASI is there only because Rust's standard library on
//! `wasm32-wasip2` needs it (clocks, random numbers, stdio): the context has no preopened
//! directories, no arguments and every socket use denied, and only the environment
//! variables the plugin was granted. `wasi:http` refuses every request the plugin's grant
//! does not name ([`super::capabilities`]).
//!
//! The host imports count what the guest sends through them ([`BoundaryBudget`]); the call
//! that goes over a limit traps, ending the attempt as a host limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use tokio::sync::Notify;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::Level;
use super::bindings::rebound::plugin::{host, types};
use super::capabilities::{Grants, HttpGate};
use super::output::GuestOutput;
use super::{BoundaryLimits, HostLimitExceeded, SandboxLimits};

/// Why the host interrupted an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum InterruptCause {
    /// The host is shutting down and the grace period is over.
    Shutdown = 1,
    /// Another host took the task over after this host's lease ran out.
    LeaseLost = 2,
    /// Someone canceled the task.
    Canceled = 3,
}

/// Signals shared between a running attempt and the host that runs it.
#[derive(Debug, Clone, Default)]
pub struct AttemptSignals {
    inner: Arc<Signals>,
}

#[derive(Debug, Default)]
struct Signals {
    /// What the guest's `cancelled()` returns: the host would like the attempt to end.
    stop_requested: AtomicBool,
    /// 0, or the `InterruptCause` that ends the attempt now.
    interrupt: AtomicU8,
    /// Wakes the runtime when `interrupt` is set, for a guest blocked in a host call.
    interrupted: Notify,
    progress: AtomicU8,
    /// The last lines of the guest's stderr, once the call has returned.
    stderr_tail: std::sync::Mutex<Vec<String>>,
}

impl AttemptSignals {
    /// What a Rust guest's panic printed to stderr (the location and the message, on one
    /// line), once the call has returned; `None` when it printed no panic.
    pub fn panic_message(&self) -> Option<String> {
        let tail = self.inner.stderr_tail.lock().expect("poisoned");
        let start = tail
            .iter()
            .rposition(|line| line.contains(" panicked at "))?;
        let lines: Vec<&str> = tail[start..]
            .iter()
            .map(|line| line.trim())
            .filter(|line| !line.is_empty() && !line.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        Some(lines.join(" "))
    }

    /// Signals for an attempt of a task whose stored progress is `progress`.
    pub fn new(progress: u8) -> Self {
        let signals = AttemptSignals::default();
        signals
            .inner
            .progress
            .store(progress.min(100), Ordering::Relaxed);
        signals
    }

    /// Asks the attempt to end soon: the guest's `cancelled()` returns true from now on,
    /// but the instance is not stopped.
    pub fn request_stop(&self) {
        self.inner.stop_requested.store(true, Ordering::Relaxed);
    }

    /// Stops the attempt: the instance is trapped at its next epoch check, or dropped if it
    /// is blocked in a host call. The first cause given is the one that counts.
    pub fn interrupt(&self, cause: InterruptCause) {
        self.request_stop();
        let _ = self.inner.interrupt.compare_exchange(
            0,
            cause as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.inner.interrupted.notify_waiters();
    }

    /// Whether the guest was asked to end soon.
    pub fn is_stop_requested(&self) -> bool {
        self.inner.stop_requested.load(Ordering::Relaxed)
    }

    /// Why the attempt was interrupted, if it was.
    pub fn interrupt_cause(&self) -> Option<InterruptCause> {
        match self.inner.interrupt.load(Ordering::Relaxed) {
            1 => Some(InterruptCause::Shutdown),
            2 => Some(InterruptCause::LeaseLost),
            3 => Some(InterruptCause::Canceled),
            _ => None,
        }
    }

    /// Completes once the attempt is interrupted.
    pub async fn interrupted(&self) {
        let notified = self.inner.interrupted.notified();
        tokio::pin!(notified);
        // Registered before the check, so an interrupt between the two is not missed.
        notified.as_mut().enable();
        if self.interrupt_cause().is_some() {
            return;
        }
        notified.await;
    }

    /// The highest progress the guest has reported.
    pub fn progress(&self) -> u8 {
        self.inner.progress.load(Ordering::Relaxed)
    }

    /// Raises the progress to `percent`, ignoring values that would lower it or exceed 100.
    /// Returns whether the value was accepted.
    fn raise_progress(&self, percent: u8) -> bool {
        if percent > 100 {
            return false;
        }
        self.inner.progress.fetch_max(percent, Ordering::Relaxed);
        true
    }
}

/// The memory cap of one instance: all of its linear memories together (a component holds
/// several core modules, each may have its own). A grow that would cross the cap traps, so
/// it is reported as the memory limit rather than as whatever the guest's allocator makes
/// of a failed grow.
pub struct MemoryBudget {
    cap: usize,
    used: usize,
}

/// Core instances one store may create (a component's modules and its adapter shims).
const MAX_CORE_INSTANCES: usize = 16;
/// Tables and memories one store may create.
const MAX_TABLES: usize = 16;
const MAX_MEMORIES: usize = 4;
/// Elements one table may hold.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl MemoryBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        MemoryBudget { cap, used: 0 }
    }
}

impl ResourceLimiter for MemoryBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            // Past the memory's own declared maximum: the guest sees a failed grow, as the
            // WebAssembly specification says.
            return Ok(false);
        }
        let total = self.used.saturating_sub(current) + desired;
        if total > self.cap {
            wasmtime::bail!(
                "growing a memory from {current} to {desired} bytes would take the \
                 instance's memories to {total} bytes, over the cap of {} bytes",
                self.cap
            );
        }
        self.used = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("the host could not grow the memory"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A sustained rate with bursts: `per_s` events a second on average, up to ten seconds'
/// worth at once.
#[derive(Debug)]
struct RateLimit {
    per_s: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// Bursts of this many seconds' worth pass.
    const BURST_S: f64 = 10.0;

    fn new(per_s: u32) -> Self {
        let per_s = f64::from(per_s);
        RateLimit {
            per_s,
            tokens: per_s * Self::BURST_S,
            last: Instant::now(),
        }
    }

    /// Takes one event; false when the rate is used up.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.per_s;
        self.tokens = (self.tokens + earned).min(self.per_s * Self::BURST_S);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// What one attempt has sent through the host imports, against its [`BoundaryLimits`].
#[derive(Debug)]
pub struct BoundaryBudget {
    limits: BoundaryLimits,
    log_bytes: usize,
    log_rate: RateLimit,
    progress_rate: RateLimit,
}

impl BoundaryBudget {
    /// A fresh budget under `limits`.
    pub fn new(limits: &BoundaryLimits) -> Self {
        BoundaryBudget {
            limits: limits.clone(),
            log_bytes: 0,
            log_rate: RateLimit::new(limits.log_lines_per_s),
            progress_rate: RateLimit::new(limits.progress_per_s),
        }
    }

    /// Counts a log line of `bytes`.
    pub fn log_line(&mut self, bytes: usize) -> Result<(), HostLimitExceeded> {
        self.log_bytes = self.log_bytes.saturating_add(bytes);
        if self.log_bytes > self.limits.log_bytes {
            return Err(HostLimitExceeded(format!(
                "logged over {} bytes (limits.max_log_kb)",
                self.limits.log_bytes
            )));
        }
        if !self.log_rate.take() {
            return Err(HostLimitExceeded(format!(
                "logged faster than {} lines per second (limits.max_log_lines_per_s)",
                self.limits.log_lines_per_s
            )));
        }
        Ok(())
    }

    /// Counts a progress update.
    pub fn progress_update(&mut self) -> Result<(), HostLimitExceeded> {
        if !self.progress_rate.take() {
            return Err(HostLimitExceeded(format!(
                "reported progress faster than {} times per second (limits.max_progress_per_s)",
                self.limits.progress_per_s
            )));
        }
        Ok(())
    }
}

/// The data of one instance's `wasmtime::Store`.
pub struct AttemptState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_gate: HttpGate,
    table: ResourceTable,
    pub(super) limits: MemoryBudget,
    budget: BoundaryBudget,
    signals: AttemptSignals,
    stdout: GuestOutput,
    stderr: GuestOutput,
}

impl AttemptState {
    /// A sandbox under `limits` that can reach what `grants` lists.
    pub fn new(signals: AttemptSignals, limits: &SandboxLimits, grants: &Grants) -> Self {
        let stdout = GuestOutput::new("stdout");
        let stderr = GuestOutput::new("stderr");
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        for (name, value) in grants.env.iter() {
            wasi.env(name, value);
        }
        AttemptState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            http_gate: HttpGate::new(grants.http.clone()),
            table: ResourceTable::new(),
            limits: MemoryBudget::new(limits.memory_bytes),
            budget: BoundaryBudget::new(&limits.boundary),
            signals,
            stdout,
            stderr,
        }
    }

    /// The attempt's signals.
    pub fn signals(&self) -> &AttemptSignals {
        &self.signals
    }

    /// Logs the end of what the guest printed: an unfinished last line, and how much went
    /// over the limit. Complete lines were logged as they were written.
    pub fn flush_output(&self) {
        self.stdout.finish();
        self.stderr.finish();
        *self.signals.inner.stderr_tail.lock().expect("poisoned") = self.stderr.tail();
    }
}

impl WasiView for AttemptState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for AttemptState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_gate,
        }
    }
}

impl types::Host for AttemptState {}

impl host::Host for AttemptState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.budget.log_line(message.len())?;
        // Events need a level known at compile time, hence one arm per level. The caller's
        // span tags them with the task id, queue and attempt.
        match level {
            Level::Trace => tracing::trace!(target: "rebound::guest", "{message}"),
            Level::Debug => tracing::debug!(target: "rebound::guest", "{message}"),
            Level::Info => tracing::info!(target: "rebound::guest", "{message}"),
            Level::Warn => tracing::warn!(target: "rebound::guest", "{message}"),
            Level::Error => tracing::error!(target: "rebound::guest", "{message}"),
        }
        Ok(())
    }

    fn set_progress(&mut self, percent: u8) -> wasmtime::Result<()> {
        self.budget.progress_update()?;
        if !self.signals.raise_progress(percent) {
            tracing::debug!(percent, "ignored progress over 100");
        }
        Ok(())
    }

    fn cancelled(&mut self) -> wasmtime::Result<bool> {
        Ok(self.signals.is_stop_requested())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interrupt_wakes_a_waiter_and_the_first_cause_counts() {
        let signals = AttemptSignals::new(0);
        signals.request_stop();
        assert!(signals.is_stop_requested());
        assert_eq!(signals.interrupt_cause(), None);

        let waiter = tokio::spawn({
            let signals = signals.clone();
            async move { signals.interrupted().await }
        });
        signals.interrupt(InterruptCause::Canceled);
        signals.interrupt(InterruptCause::Shutdown);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
        assert_eq!(signals.interrupt_cause(), Some(InterruptCause::Canceled));
        // Interrupted already: waiting returns at once.
        signals.interrupted().await;
    }

    #[test]
    fn the_boundary_budget_allows_bursts_and_refuses_floods() {
        let limits = BoundaryLimits {
            log_bytes: 10_000,
            log_lines_per_s: 5,
            progress_per_s: 3,
            ..BoundaryLimits::default()
        };
        let mut budget = BoundaryBudget::new(&limits);
        // Ten seconds' worth at once passes; the next one does not.
        for _ in 0..50 {
            budget.log_line(10).unwrap();
        }
        let err = budget.log_line(10).unwrap_err();
        assert!(err.0.contains("max_log_lines_per_s"), "{err}");
        for _ in 0..30 {
            budget.progress_update().unwrap();
        }
        let err = budget.progress_update().unwrap_err();
        assert!(err.0.contains("max_progress_per_s"), "{err}");

        // Bytes are a total, whatever the rate.
        let mut budget = BoundaryBudget::new(&limits);
        budget.log_line(9_000).unwrap();
        let err = budget.log_line(1_001).unwrap_err();
        assert!(err.0.contains("max_log_kb"), "{err}");
    }

    /// A module with two memories, and a function growing each by a number of pages.
    const TWO_MEMORIES: &str = r#"
        (module
          (memory $a 1)
          (memory $b 1)
          (func (export "grow_a") (param i32) (result i32) (memory.grow $a (local.get 0)))
          (func (export "grow_b") (param i32) (result i32) (memory.grow $b (local.get 0))))
    "#;

    /// Pages of 64 KiB in `mib` MiB.
    fn pages(mib: i32) -> i32 {
        mib * 16
    }

    /// The cap holds two memories together, on the pool and off it: each may grow while the
    /// sum fits (the twin), and the grow that takes the sum past the cap traps.
    #[test]
    fn the_memory_cap_counts_all_memories_together() {
        use wasmtime::{Instance, Module, Store};
        const MIB: usize = 1024 * 1024;
        for pool in [None, Some(4)] {
            let limits = super::super::SandboxLimits {
                memory_bytes: 96 * MIB,
                pool,
                ..Default::default()
            };
            let runtime = super::super::Runtime::new(limits).unwrap();
            let module =
                Module::new(runtime.engine(), wat::parse_str(TWO_MEMORIES).unwrap()).unwrap();
            let run = |a: i32, b: i32| -> wasmtime::Result<()> {
                let mut store = Store::new(runtime.engine(), MemoryBudget::new(96 * MIB));
                store.limiter(|budget| budget);
                // The engine meters fuel and checks epochs; neither is under test here.
                store.set_fuel(u64::MAX)?;
                store.set_epoch_deadline(1_000_000);
                let instance = Instance::new(&mut store, &module, &[])?;
                let grow_a = instance.get_typed_func::<i32, i32>(&mut store, "grow_a")?;
                let grow_b = instance.get_typed_func::<i32, i32>(&mut store, "grow_b")?;
                assert_eq!(grow_a.call(&mut store, pages(a))?, 1, "{pool:?}: grew a");
                assert_eq!(grow_b.call(&mut store, pages(b))?, 1, "{pool:?}: grew b");
                Ok(())
            };
            // 1 + 40 and 1 + 40 MiB: 82 MiB together, under 96.
            run(40, 40).unwrap();
            // 1 + 60 and 1 + 60 MiB: each under the cap alone, 122 MiB together.
            let err = format!("{:?}", run(60, 60).unwrap_err());
            assert!(err.contains("over the cap of"), "{pool:?}: {err}");
        }
    }

    #[test]
    fn progress_only_goes_up_and_stays_within_100() {
        let signals = AttemptSignals::new(30);
        assert!(signals.raise_progress(50));
        assert!(signals.raise_progress(40));
        assert_eq!(signals.progress(), 50);
        assert!(!signals.raise_progress(101));
        assert_eq!(signals.progress(), 50);
        assert!(signals.raise_progress(100));
        assert_eq!(signals.progress(), 100);
    }
}
