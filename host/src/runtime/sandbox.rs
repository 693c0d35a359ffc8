//! What one instance can see and touch: its WASI context, its limits, and the host imports.
//!
//! Each attempt gets a fresh [`AttemptState`] inside a fresh `wasmtime::Store`, so nothing
//! leaks from one task to the next. WASI is there only because Rust's standard library on
//! `wasm32-wasip2` needs it (clocks, random numbers, stdio): the context has no preopened
//! directories, no environment variables, no arguments and every socket use denied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::sync::Notify;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::Level;
use super::bindings::rebound::plugin::{host, types};
use super::output::GuestOutput;

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
}

impl AttemptSignals {
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
                "growing a memory to {desired} bytes would take the instance's memories to \
                 {total} bytes, over the cap of {} bytes",
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

/// The data of one instance's `wasmtime::Store`.
pub struct AttemptState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: MemoryBudget,
    signals: AttemptSignals,
    stdout: GuestOutput,
    stderr: GuestOutput,
}

impl AttemptState {
    /// A sandbox with `memory_limit` bytes for all of the instance's linear memories.
    pub fn new(signals: AttemptSignals, memory_limit: usize) -> Self {
        let stdout = GuestOutput::new("stdout");
        let stderr = GuestOutput::new("stderr");
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let limits = MemoryBudget::new(memory_limit);
        AttemptState {
            wasi,
            table: ResourceTable::new(),
            limits,
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

impl types::Host for AttemptState {}

impl host::Host for AttemptState {
    fn log(&mut self, level: Level, message: String) {
        // Events need a level known at compile time, hence one arm per level. The caller's
        // span tags them with the task id, queue and attempt.
        match level {
            Level::Trace => tracing::trace!(target: "rebound::guest", "{message}"),
            Level::Debug => tracing::debug!(target: "rebound::guest", "{message}"),
            Level::Info => tracing::info!(target: "rebound::guest", "{message}"),
            Level::Warn => tracing::warn!(target: "rebound::guest", "{message}"),
            Level::Error => tracing::error!(target: "rebound::guest", "{message}"),
        }
    }

    fn set_progress(&mut self, percent: u8) {
        if !self.signals.raise_progress(percent) {
            tracing::debug!(percent, "ignored progress over 100");
        }
    }

    fn cancelled(&mut self) -> bool {
        self.signals.is_stop_requested()
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
