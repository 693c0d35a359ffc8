//! `flaky`: fails until a given attempt, then succeeds; exercises retries and backoff.
//!
//! Parameters (all optional):
//! - `succeed_at` (default 1): the first attempt that succeeds. Earlier attempts ask for a
//!   retry with the task's backoff policy.
//! - `retry_after_ms`: when set, earlier attempts ask for a retry after exactly this delay
//!   instead of the policy's.
//! - `fatal`: when `true`, the first attempt fails fatally with this message instead.
//!
//! When the task runs out of retries, the `on_exhausted` hook logs one warning, which the
//! host records as a hook run on the task.

use rebound_sdk::serde_json::{Value, json};
use rebound_sdk::{Failure, Handler, Task, export_handler};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
struct Params {
    #[serde(default = "first_attempt")]
    succeed_at: u32,
    retry_after_ms: Option<u64>,
    #[serde(default)]
    fatal: bool,
}

fn first_attempt() -> u32 {
    1
}

struct Flaky;

impl Handler for Flaky {
    fn handle(task: Task) -> Result<Value, Failure> {
        let params: Params = task.params()?;
        if params.fatal {
            return Err(Failure::fatal("asked to fail fatally"));
        }
        if task.attempt < params.succeed_at {
            let message = format!(
                "attempt {} of {} fails on purpose; success comes at attempt {}",
                task.attempt, task.max_attempts, params.succeed_at
            );
            return Err(match params.retry_after_ms {
                Some(ms) => Failure::retry_after(Duration::from_millis(ms), message),
                None => Failure::retry(message),
            });
        }
        Ok(json!({ "succeeded_at": task.attempt }))
    }

    fn on_exhausted(task: Task, error: String) {
        rebound_sdk::log::warn(&format!(
            "task {} gave up after {} attempts: {error}",
            task.id, task.attempt
        ));
    }
}

export_handler!(Flaky);
