//! What one instance can see and touch: its WASI context, its limits, and the host imports.
//!
//! Each attempt gets a fresh [`AttemptState`] inside a fresh `wasmtime::Store`, so nothing
//! leaks from one task to the next. WASI is there only because Rust's standard library on
//! `wasm32-wasip2` needs it (clocks, random numbers, stdio): the context has no preopened
//! directories, no environment variables, no arguments and every socket use denied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::Level;
use super::bindings::rebound::plugin::{host, types};

/// How much of the guest's stdout and of its stderr the host keeps per attempt, in bytes.
/// A guest that writes more gets a write error (a Rust guest's `println!` then panics).
pub const OUTPUT_CAPTURE_BYTES: usize = 64 * 1024;

/// Signals shared between a running attempt and the host that runs it.
#[derive(Debug, Clone, Default)]
pub struct AttemptSignals {
    cancelled: Arc<AtomicBool>,
    progress: Arc<AtomicU8>,
}

impl AttemptSignals {
    /// Signals for an attempt of a task whose stored progress is `progress`.
    pub fn new(progress: u8) -> Self {
        AttemptSignals {
            cancelled: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(AtomicU8::new(progress.min(100))),
        }
    }

    /// Asks the attempt to stop: the guest's `cancelled()` returns true from now on, and the
    /// instance is interrupted at its next epoch check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether the attempt was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The highest progress the guest has reported.
    pub fn progress(&self) -> u8 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Raises the progress to `percent`, ignoring values that would lower it or exceed 100.
    /// Returns whether the value was accepted.
    fn raise_progress(&self, percent: u8) -> bool {
        if percent > 100 {
            return false;
        }
        self.progress.fetch_max(percent, Ordering::Relaxed);
        true
    }
}

/// The data of one instance's `wasmtime::Store`.
pub struct AttemptState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
    signals: AttemptSignals,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl AttemptState {
    /// A sandbox with `memory_limit` bytes for all of the instance's linear memories.
    pub fn new(signals: AttemptSignals, memory_limit: usize) -> Self {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPTURE_BYTES);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPTURE_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_limit)
            // A failed grow traps instead of returning -1 to the guest, so that going over
            // the cap is reported as "memory limit" rather than as whatever the guest's
            // allocator makes of it.
            .trap_on_grow_failure(true)
            .instances(4)
            .build();
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

    /// Writes what the guest printed to the host log, line by line. The caller's span (one
    /// per attempt) tags each line with the task id, queue and attempt.
    pub fn flush_output(&self) {
        let streams = [("stdout", &self.stdout), ("stderr", &self.stderr)];
        for (stream, pipe) in streams {
            let bytes = pipe.contents();
            for line in String::from_utf8_lossy(&bytes).lines() {
                tracing::info!(target: "rebound::guest", stream, "{line}");
            }
        }
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
        self.signals.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
