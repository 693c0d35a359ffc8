//! The task model: what a task is, the states it moves through, and what a producer submits.
//!
//! This module only describes tasks; moving them between states is the store's job
//! ([`crate::store`]), and running them is the runtime's ([`crate::runtime`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;

/// The lowest priority a task may have.
pub const MIN_PRIORITY: i32 = -1000;
/// The highest priority a task may have. Higher priorities are claimed first.
pub const MAX_PRIORITY: i32 = 1000;
/// How many recent attempt errors a task keeps, oldest dropped first.
pub const ERROR_HISTORY_LEN: usize = 5;
/// The longest task id accepted, in bytes.
pub const MAX_ID_LEN: usize = 200;
/// The longest delay before a task runs or is retried: 366 days, in milliseconds. Longer
/// delays given at submission are refused; longer backoffs are cut to it.
pub const MAX_DELAY_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// The largest `params` a task may have, in bytes (of JSON text): 1 MiB. Larger inputs
/// belong in object storage, with their address in the parameters.
pub const MAX_PARAMS_BYTES: usize = 1024 * 1024;
/// The longest error text a task keeps, in bytes; the rest is cut off.
pub const MAX_ERROR_LEN: usize = 4096;

/// Where a task is in its life.
///
/// ```text
/// pending ──claim──▶ running ──complete──▶ completed
///                      │  ▲
///              fail    │  │ claim, once the backoff has elapsed
///                      ▼  │
///                    retrying
///                      │
///   running ──fatal failure or no retries left──▶ failed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting to be claimed, possibly until a delay has passed.
    Pending,
    /// Claimed by a host, which runs it in a sandboxed instance.
    Running,
    /// An attempt failed; waiting out the backoff before the next one.
    Retrying,
    /// Finished with a result.
    Completed,
    /// Finished without a result: a fatal failure, or no retries left.
    Failed,
    /// Stopped on request before it finished.
    Canceled,
}

impl TaskState {
    /// Every state, in the order the CLI prints them.
    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Canceled,
    ];

    /// The state's name as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Canceled => "canceled",
        }
    }

    /// Whether the task will never run again on its own.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Canceled
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("unknown task state `{s}`, expected one of pending, running, retrying, completed, failed, canceled")
            })
    }
}

/// The lease a host holds on a running task.
///
/// Completion and failure are accepted only with the token of the current lease, so a host
/// that lost its lease (it stalled, and another host took the task over) cannot overwrite
/// the newer attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The host that claimed the task.
    pub owner: String,
    /// When the lease runs out, in milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    /// Fencing token: grows by one with every claim of the task.
    pub token: u64,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Unique among all tasks of a store; given by the producer or generated (UUIDv7).
    pub id: String,
    /// The queue the task belongs to; the plugin of the same name runs it.
    pub queue: String,
    /// The producer's parameters, as JSON text.
    pub params: String,
    /// Where the task is in its life.
    pub state: TaskState,
    /// Higher runs first; between `MIN_PRIORITY` and `MAX_PRIORITY`, 0 by default.
    pub priority: i32,
    /// How many attempts have started (0 before the first claim).
    pub attempt: u32,
    /// The retry policy given at submission; `None` means the executing host's policy for
    /// the queue applies.
    pub retry: Option<RetryPolicy>,
    /// What the task needs of a GPU, given at submission; fields it leaves open come from
    /// its plugin's manifest. `None` (and no plugin requirement) means it needs no GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequirement>,
    /// When a pending or retrying task becomes claimable, in ms since the Unix epoch.
    pub run_at_ms: u64,
    /// The last progress reported, 0–100; it never goes down.
    pub progress: u8,
    /// The handler's output (JSON text) once completed.
    pub result: Option<String>,
    /// The most recent attempt's error.
    pub last_error: Option<String>,
    /// Errors of the most recent attempts, oldest first, at most `ERROR_HISTORY_LEN`.
    pub errors: Vec<String>,
    /// How many times the plugin's `on-exhausted` hook ran for this task.
    pub exhausted_hook_runs: u32,
    /// How many times a host lost the task's lease (died or stalled) while running it.
    /// Such attempts are not charged to the retry budget.
    pub lease_losses: u32,
    /// Whether cancellation was asked for while the task ran; its host stops it.
    #[serde(default)]
    pub cancel_requested: bool,
    /// When the task was created, in ms since the Unix epoch.
    pub created_ms: u64,
    /// When the task last changed state, in ms since the Unix epoch.
    pub updated_ms: u64,
    /// When its current or last attempt started, in ms since the Unix epoch.
    pub started_ms: Option<u64>,
    /// When it reached a final state, in ms since the Unix epoch.
    pub finished_ms: Option<u64>,
    /// The lease of the host running it, while running.
    pub lease: Option<Lease>,
}

impl Task {
    /// The task that submission `new` becomes, with id `id`, created at `now` (ms since the
    /// Unix epoch): pending, and claimable once its delay has passed.
    pub fn submitted(id: String, new: NewTask, now: u64) -> Task {
        Task {
            id,
            queue: new.queue,
            params: new.params,
            state: TaskState::Pending,
            priority: new.priority,
            attempt: 0,
            retry: new.retry,
            gpu: new.gpu,
            run_at_ms: now.saturating_add(new.delay_ms),
            progress: 0,
            result: None,
            last_error: None,
            errors: Vec::new(),
            exhausted_hook_runs: 0,
            lease_losses: 0,
            cancel_requested: false,
            created_ms: now,
            updated_ms: now,
            started_ms: None,
            finished_ms: None,
            lease: None,
        }
    }
}

/// What a producer submits.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NewTask {
    /// The queue, which is also the name of the plugin that runs the task.
    pub queue: String,
    /// The task's id; generated (a UUIDv7, so ids sort by creation time) when `None`.
    pub id: Option<String>,
    /// Parameters as JSON text; must parse as JSON.
    pub params: String,
    /// Higher is claimed first; 0 by default.
    pub priority: i32,
    /// Wait this long, in milliseconds, before the task becomes claimable; 0 means at once.
    pub delay_ms: u64,
    /// The retry policy for this task; `None` leaves it to the executing host.
    pub retry: Option<RetryPolicy>,
    /// What the task needs of a GPU, over its plugin's requirement; `None` adds nothing.
    pub gpu: Option<GpuRequirement>,
}

impl NewTask {
    /// A task for `queue` with `params` and every other field at its default.
    pub fn new(queue: impl Into<String>, params: impl Into<String>) -> Self {
        NewTask {
            queue: queue.into(),
            params: params.into(),
            ..NewTask::default()
        }
    }

    /// Checks what a store cannot accept, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        validate_queue_name(&self.queue)?;
        if let Some(id) = &self.id {
            validate_task_id(id)?;
        }
        if self.params.len() > MAX_PARAMS_BYTES {
            return Err(format!(
                "params is {} bytes, over the limit of {MAX_PARAMS_BYTES} bytes (1 MiB)",
                self.params.len()
            ));
        }
        if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(&self.params) {
            return Err(format!("params is not valid JSON: {err}"));
        }
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(format!(
                "priority {} is out of range, expected {MIN_PRIORITY} to {MAX_PRIORITY}",
                self.priority
            ));
        }
        if self.delay_ms > MAX_DELAY_MS {
            return Err(format!(
                "delay_ms {} is too long: at most {MAX_DELAY_MS} (366 days)",
                self.delay_ms
            ));
        }
        if let Some(policy) = &self.retry {
            policy.validate()?;
        }
        Ok(())
    }
}

/// `error` cut to at most [`MAX_ERROR_LEN`] bytes (on a character boundary), saying how much
/// was cut, so that a handler's huge message cannot bloat the store or the log.
pub fn bounded_error(error: String) -> String {
    if error.len() <= MAX_ERROR_LEN {
        return error;
    }
    let mut end = MAX_ERROR_LEN;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes cut)", &error[..end], error.len() - end)
}

/// A queue name is also a plugin file name and part of every Redis key of the queue, so it is
/// kept to characters that are safe in all three places.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid_char) {
        return Err(format!(
            "queue name `{name}` is invalid: use 1 to 64 ASCII letters, digits, `-` or `_`"
        ));
    }
    Ok(())
}

/// Task ids are free-form but bounded, and may not contain whitespace or control characters,
/// which would make them hard to pass on a command line.
pub fn validate_task_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "task id `{id}` is invalid: it must be 1 to {MAX_ID_LEN} bytes long"
        ));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "task id `{id}` is invalid: it may not contain whitespace or control characters"
        ));
    }
    Ok(())
}

/// How many tasks of one queue are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    /// Waiting to be claimed, including delayed tasks.
    pub pending: u64,
    /// Claimed and running.
    pub running: u64,
    /// Waiting out a backoff.
    pub retrying: u64,
    /// Finished with a result.
    pub completed: u64,
    /// Finished without one.
    pub failed: u64,
    /// Stopped on request.
    pub canceled: u64,
}

impl StateCounts {
    /// The count for `state`.
    pub fn get(&self, state: TaskState) -> u64 {
        match state {
            TaskState::Pending => self.pending,
            TaskState::Running => self.running,
            TaskState::Retrying => self.retrying,
            TaskState::Completed => self.completed,
            TaskState::Failed => self.failed,
            TaskState::Canceled => self.canceled,
        }
    }

    /// A mutable reference to the count for `state`.
    pub fn get_mut(&mut self, state: TaskState) -> &mut u64 {
        match state {
            TaskState::Pending => &mut self.pending,
            TaskState::Running => &mut self.running,
            TaskState::Retrying => &mut self.retrying,
            TaskState::Completed => &mut self.completed,
            TaskState::Failed => &mut self.failed,
            TaskState::Canceled => &mut self.canceled,
        }
    }

    /// Tasks that have not reached a final state.
    pub fn unfinished(&self) -> u64 {
        self.pending + self.running + self.retrying
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>(), Ok(state));
        }
        assert!("done".parse::<TaskState>().unwrap_err().contains("`done`"));
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        assert_eq!(bounded_error("short".into()), "short");
        let long = "é".repeat(MAX_ERROR_LEN);
        let cut = bounded_error(long.clone());
        assert!(cut.len() < MAX_ERROR_LEN + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!("({} more bytes cut)", long.len() - MAX_ERROR_LEN)));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let cases = [
            (NewTask::new("", "{}"), "queue name"),
            (NewTask::new("a:b", "{}"), "queue name"),
            (NewTask::new("echo", "{not json"), "params"),
            (
                NewTask::new("echo", format!("\"{}\"", "x".repeat(MAX_PARAMS_BYTES))),
                "over the limit",
            ),
            (
                NewTask {
                    id: Some("has space".into()),
                    ..NewTask::new("echo", "{}")
                },
                "task id",
            ),
            (
                NewTask {
                    priority: 5000,
                    ..NewTask::new("echo", "{}")
                },
                "priority",
            ),
            (
                NewTask {
                    delay_ms: MAX_DELAY_MS + 1,
                    ..NewTask::new("echo", "{}")
                },
                "delay_ms",
            ),
        ];
        for (task, expected) in cases {
            let err = task.validate().unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
        assert_eq!(NewTask::new("echo", r#"{"a":1}"#).validate(), Ok(()));
    }
}
