//! Write Rebound handler plugins in Rust.
//!
//! A plugin is a WebAssembly component that Rebound runs once per attempt of a task, in a
//! fresh sandboxed instance. This crate hides the component plumbing: implement [`Handler`]
//! for a type, name that type in [`export_handler!`], and build the crate as a `cdylib` with
//! `cargo build --target wasm32-wasip2 --release`. The resulting `.wasm` file goes into the
//! host's plugin directory; its file name is the queue it serves.
//!
//! ```
//! use rebound_sdk::{export_handler, Failure, Handler, Task};
//! use serde_json::{json, Value};
//!
//! struct Resize;
//!
//! impl Handler for Resize {
//!     fn handle(task: Task) -> Result<Value, Failure> {
//!         // Bad parameters will not get better with a retry: `params` fails fatally.
//!         let width: u32 = task.params_field("width")?;
//!         if width > 10_000 {
//!             return Err(Failure::fatal(format!("width {width} is over the limit of 10000")));
//!         }
//!         rebound_sdk::log::info(&format!("resizing to {width} px"));
//!         rebound_sdk::set_progress(100);
//!         Ok(json!({ "width": width }))
//!     }
//! }
//!
//! export_handler!(Resize);
//! # fn main() {}
//! ```
//!
//! What a plugin can reach is only what the host grants: the functions in [`log`],
//! [`set_progress`] and [`cancelled`], and WASI with no files, no environment and no network.
//! The plugin's manifest (`NAME.toml` beside `NAME.wasm`) may grant named environment
//! variables and outbound HTTP to listed `host:port` pairs, which [`http`] reaches.
//! Anything written to stdout or stderr ends up in the host's log, tagged with the task id.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Bindings generated from `wit/`; plugin authors never use them directly.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "rebound:plugin/handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "rebound_sdk::bindings",
    });
}

#[cfg(target_arch = "wasm32")]
pub mod http;

pub use serde_json;

use bindings::rebound::plugin::host as wit_host;
use bindings::rebound::plugin::types as wit;

/// One attempt of one task, as handed to [`Handler::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The task's id, unique among all of Rebound's tasks.
    pub id: String,
    /// The queue the task was submitted to.
    pub queue: String,
    /// The producer's parameters, as JSON text; see [`Task::params`] to decode them.
    pub params: String,
    /// Which attempt this is, counting from 1.
    pub attempt: u32,
    /// The most attempts this task may get; on the last one a retry request fails the task.
    pub max_attempts: u32,
    /// The GPU the host's gate reserved for this attempt, if the task asked for one.
    pub gpu: Option<u32>,
    /// The progress last reported for this task (0–100), carried over from earlier attempts.
    pub progress: u8,
}

impl Task {
    /// Decodes the parameters into `T`. A decoding error becomes a fatal [`Failure`], since
    /// the same parameters would fail the same way on every retry.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_str(&self.params)
            .map_err(|err| Failure::fatal(format!("task {} has unusable params: {err}", self.id)))
    }

    /// Decodes one top-level field of the parameters (which must be a JSON object) into `T`.
    /// A missing or mistyped field is a fatal [`Failure`] that names the field.
    pub fn params_field<T: DeserializeOwned>(&self, name: &str) -> Result<T, Failure> {
        let params: Value = self.params()?;
        let field = params
            .get(name)
            .ok_or_else(|| Failure::fatal(format!("params has no field `{name}`")))?;
        T::deserialize(field)
            .map_err(|err| Failure::fatal(format!("params field `{name}` is unusable: {err}")))
    }

    /// Whether this is the task's last attempt: a retry requested now fails the task.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// Why an attempt did not succeed, and what the host is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Retry after the delay the task's retry policy gives.
    Retry {
        /// What went wrong; recorded as the task's last error.
        message: String,
    },
    /// Retry after a delay the handler chose (it still uses up one retry).
    RetryAfter {
        /// How long the host waits before the next attempt.
        delay: Duration,
        /// What went wrong; recorded as the task's last error.
        message: String,
    },
    /// Fail the task now, never to be retried.
    Fatal {
        /// What went wrong; recorded as the task's error.
        message: String,
    },
}

impl Failure {
    /// A failure to be retried with the task's retry policy.
    pub fn retry(message: impl Into<String>) -> Self {
        Failure::Retry {
            message: message.into(),
        }
    }

    /// A failure to be retried after `delay` (millisecond precision).
    pub fn retry_after(delay: Duration, message: impl Into<String>) -> Self {
        Failure::RetryAfter {
            delay,
            message: message.into(),
        }
    }

    /// A failure that ends the task as `failed` at once.
    pub fn fatal(message: impl Into<String>) -> Self {
        Failure::Fatal {
            message: message.into(),
        }
    }

    /// The failure's message.
    pub fn message(&self) -> &str {
        match self {
            Failure::Retry { message }
            | Failure::RetryAfter { message, .. }
            | Failure::Fatal { message } => message,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Failure {}

/// A task handler. Rebound calls it in a fresh instance for every attempt, so a handler
/// keeps no state between calls: whatever must survive an attempt goes into the output,
/// the progress, or a system the handler was granted access to.
pub trait Handler {
    /// Runs one attempt. `Ok` carries the task's result; `Err` says whether and when to retry.
    fn handle(task: Task) -> Result<Value, Failure>;

    /// Called once, in a fresh instance, when the task failed and has no retries left.
    /// `error` is the last attempt's error. The default does nothing.
    fn on_exhausted(task: Task, error: String) {
        let _ = (task, error);
    }
}

/// Log lines that the host writes to its own log, tagged with the task id, queue and attempt.
pub mod log {
    use super::{wit, wit_host};

    /// Logs detail useful only while writing the plugin.
    pub fn trace(message: &str) {
        wit_host::log(wit::Level::Trace, message);
    }

    /// Logs detail useful when looking into one task.
    pub fn debug(message: &str) {
        wit_host::log(wit::Level::Debug, message);
    }

    /// Logs something an operator may want to see.
    pub fn info(message: &str) {
        wit_host::log(wit::Level::Info, message);
    }

    /// Logs a problem the attempt recovers from.
    pub fn warn(message: &str) {
        wit_host::log(wit::Level::Warn, message);
    }

    /// Logs a problem that fails this attempt.
    pub fn error(message: &str) {
        wit_host::log(wit::Level::Error, message);
    }
}

/// Reports the task's progress in percent (0–100). Progress only rises: a value not above the
/// last one reported, or one over 100, is ignored and costs nothing, so a loop may report on
/// every pass. (Only a rise reaches the host, which counts every call it gets against
/// `limits.max_progress_per_s`.)
pub fn set_progress(percent: u8) {
    if percent <= 100 && percent > REPORTED.load(Ordering::Relaxed) {
        REPORTED.store(percent, Ordering::Relaxed);
        wit_host::set_progress(percent);
    }
}

/// The highest progress this attempt has sent to the host, starting from the task's own.
/// (Each attempt runs in a fresh instance, with one thread.)
static REPORTED: AtomicU8 = AtomicU8::new(0);

/// Whether the host asks this attempt to stop early (the task was canceled or the host is
/// shutting down). Cheap enough to call inside a loop.
pub fn cancelled() -> bool {
    wit_host::cancelled()
}

/// The glue between the generated bindings and a [`Handler`]; used by [`export_handler!`].
#[doc(hidden)]
pub mod __private {
    use super::{Failure, Handler, Task, wit};

    pub use crate::bindings::Guest;

    fn task_from_wit(task: wit::Task) -> Task {
        Task {
            id: task.id,
            queue: task.queue,
            params: task.params,
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            gpu: task.gpu,
            progress: task.progress,
        }
    }

    fn failure_to_wit(failure: Failure) -> wit::Failure {
        match failure {
            Failure::Retry { message } => wit::Failure::Retry(message),
            Failure::RetryAfter { delay, message } => wit::Failure::RetryAfter(wit::RetryAfter {
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                message,
            }),
            Failure::Fatal { message } => wit::Failure::Fatal(message),
        }
    }

    /// Runs `H::handle` and encodes its outcome for the host.
    pub fn handle<H: Handler>(task: wit::Task) -> Result<String, wit::Failure> {
        super::REPORTED.store(task.progress, super::Ordering::Relaxed);
        match H::handle(task_from_wit(task)) {
            Ok(output) => Ok(output.to_string()),
            Err(failure) => Err(failure_to_wit(failure)),
        }
    }

    /// Runs `H::on_exhausted`.
    pub fn on_exhausted<H: Handler>(task: wit::Task, error: String) {
        H::on_exhausted(task_from_wit(task), error);
    }
}

/// Exports a [`Handler`] implementation as the plugin's entry points. Use it once per plugin
/// crate, at the crate root.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        #[doc(hidden)]
        struct __ReboundExport;

        impl $crate::__private::Guest for __ReboundExport {
            fn handle(
                task: $crate::bindings::rebound::plugin::types::Task,
            ) -> ::core::result::Result<
                ::std::string::String,
                $crate::bindings::rebound::plugin::types::Failure,
            > {
                $crate::__private::handle::<$handler>(task)
            }

            fn on_exhausted(
                task: $crate::bindings::rebound::plugin::types::Task,
                error: ::std::string::String,
            ) {
                $crate::__private::on_exhausted::<$handler>(task, error)
            }
        }

        $crate::bindings::__export_handler_world!(__ReboundExport with_types_in $crate::bindings);
    };
}
