//! Where tasks live, and every change of a task's state.
//!
//! [`Store`] is the one interface the rest of the host uses. Each method is one state
//! transition, applied atomically by the backend: a Lua script on Redis
//! ([`redis::RedisStore`]), a transaction on the embedded SQLite file
//! ([`embedded::EmbeddedStore`]). Both pass the same conformance tests (`tests/`).
//!
//! The store decides nothing about retries: the host computes whether a failed attempt is
//! retried, and after how long, from the task's retry policy ([`crate::backoff`]), and the
//! store applies that decision, provided the host still holds the task's lease.
//!
//! Times are read where the transition is applied (Redis's clock for Redis, the local clock
//! for the embedded store), so hosts with skewed clocks agree on when a task is due.

pub mod embedded;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::gpu::GateSnapshot;
use crate::task::{NewTask, StateCounts, Task, TaskState};

/// A shared handle to a store.
pub type SharedStore = Arc<dyn Store>;

/// A store transition that failed, with what was asked and why.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `create` with an id that another task already has.
    #[error("task `{id}` already exists (in queue `{queue}`)")]
    DuplicateId {
        /// The id asked for.
        id: String,
        /// The queue of the task that has it.
        queue: String,
    },
    /// No task has this id.
    #[error("task `{id}` not found")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// A report from a host whose lease on the task is gone; nothing was applied.
    #[error(
        "{transition} of task `{id}` rejected: the lease with token {token} is no longer held \
         (the task is {state})"
    )]
    LeaseLost {
        /// The task.
        id: String,
        /// What the host tried to do.
        transition: &'static str,
        /// The fencing token the host presented.
        token: u64,
        /// The task's state now (or `missing`).
        state: String,
    },
    /// A request that the task's state does not allow, such as canceling a finished task.
    #[error("cannot {action} task `{id}`: it is {state}, and only {allowed} tasks can be")]
    WrongState {
        /// The task.
        id: String,
        /// What was asked, as a verb: "cancel", "retry".
        action: &'static str,
        /// The task's state.
        state: TaskState,
        /// The states that allow it, in words.
        allowed: &'static str,
    },
    /// A listing cursor that no listing of this store handed out.
    #[error("cursor `{cursor}` is not one a listing gave; start without --cursor")]
    InvalidCursor {
        /// The cursor given.
        cursor: String,
    },
    /// Input the store refuses, with what is wrong with it.
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The backend failed; the transition may or may not have been applied.
    ///
    /// The message includes the whole cause chain, so `cause` is deliberately not reported
    /// as the error's `source()`: printers that walk the chain would repeat it.
    #[error("store failed to {transition}: {cause:#}")]
    Backend {
        /// The transition that failed.
        transition: &'static str,
        /// The backend's error, with its context.
        cause: anyhow::Error,
    },
}

impl StoreError {
    /// Wraps a backend error for `transition`.
    pub fn backend(transition: &'static str, cause: impl Into<anyhow::Error>) -> Self {
        StoreError::Backend {
            transition,
            cause: cause.into(),
        }
    }
}

/// Identifies one attempt of a task: the task and the fencing token its claim returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRef {
    /// The task's id.
    pub id: String,
    /// The task's queue.
    pub queue: String,
    /// The lease's fencing token.
    pub token: u64,
}

impl AttemptRef {
    /// The attempt that a claim just started.
    ///
    /// # Panics
    /// If `task` carries no lease, which a claimed task always does.
    pub fn of(task: &Task) -> Self {
        let lease = task
            .lease
            .as_ref()
            .expect("a claimed task always carries a lease");
        AttemptRef {
            id: task.id.clone(),
            queue: task.queue.clone(),
            token: lease.token,
        }
    }
}

/// What happens to a task after a failed attempt, as the host decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Retry once this delay has passed (the task becomes `retrying`).
    RetryIn(Duration),
    /// No retry: the task becomes `failed`.
    Fail,
}

/// A failed attempt, as reported by the host that ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAttempt {
    /// Why the attempt failed; becomes the task's last error.
    pub error: String,
    /// Retry, or fail for good.
    pub next: NextStep,
    /// Whether the plugin's `on-exhausted` hook ran for this failure.
    pub exhausted_hook_ran: bool,
    /// The progress the attempt reached.
    pub progress: u8,
}

/// One page of [`Store::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    /// The tasks of this page.
    pub tasks: Vec<Task>,
    /// The cursor of the next page; `None` when this was the last.
    pub next: Option<String>,
}

/// What [`Store::requeue_expired`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Tasks made claimable again.
    pub requeued: u64,
    /// Tasks failed for losing their lease too often.
    pub failed: u64,
    /// Tasks canceled, because their cancellation had been asked for.
    pub canceled: u64,
}

/// What a running host last said about itself, for `rebound stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host's id, as in its leases.
    pub host: String,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// When it started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// When it sent this report, in ms since the Unix epoch.
    pub reported_ms: u64,
    /// Its GPU gate: readings and reservations.
    pub gate: GateSnapshot,
    /// Tasks its GPU gate is holding back, by queue (queues with none are left out).
    pub held_at_gate: BTreeMap<String, usize>,
}

/// Tells a host, as long as it is kept, that tasks were submitted; see
/// [`Store::watch_submissions`]. Dropping it stops the watch, which then closes what it
/// opened.
pub struct SubmissionWatch {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SubmissionWatch {
    /// A watch, and the signal its task stops on (the sender's drop).
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        (SubmissionWatch { stop: Some(stop) }, stopped)
    }

    /// A watch that never fires (the host relies on polling alone).
    pub fn none() -> Self {
        SubmissionWatch { stop: None }
    }
}

impl Drop for SubmissionWatch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a [`SubmissionWatch`] calls with the queue of a task that was just submitted.
pub type WakeFn = Arc<dyn Fn(&str) + Send + Sync>;

/// How tasks are stored and moved between states. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a task, `pending` (claimable once `delay_ms` has passed). Fails with
    /// [`StoreError::DuplicateId`] when a task with the same id exists, in any queue.
    async fn create(&self, task: NewTask) -> Result<Task, StoreError>;

    /// Claims up to `max` claimable tasks of `queue` for `owner`, highest priority first and,
    /// within a priority, in the order they became claimable. Each claimed task is `running`,
    /// its attempt count one higher, and it carries a lease of `lease` with a fresh token.
    /// Atomic: two concurrent claims never return the same task.
    async fn claim(
        &self,
        queue: &str,
        owner: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError>;

    /// Claims the task `id` for `owner` now, whatever its place in the queue or its delay,
    /// provided it is waiting (`pending` or `retrying`): it becomes `running` under a lease
    /// of `lease`, one attempt further, as a claim would make it. This is the old framework's
    /// "mark processing", for work done outside a plugin; any other state is
    /// [`StoreError::WrongState`].
    async fn claim_task(&self, id: &str, owner: &str, lease: Duration) -> Result<Task, StoreError>;

    /// Records a successful attempt: the task becomes `completed` with `result`.
    async fn complete(
        &self,
        attempt: &AttemptRef,
        result: &str,
        progress: u8,
    ) -> Result<(), StoreError>;

    /// Records a failed attempt and returns the task's new state: `retrying` or `failed`, or
    /// `canceled` when the task's cancellation was asked for while it ran.
    async fn fail(
        &self,
        attempt: &AttemptRef,
        failure: &FailedAttempt,
    ) -> Result<TaskState, StoreError>;

    /// Extends the lease of a running attempt to `lease` from now. A host renews its leases
    /// while the attempts run; [`StoreError::LeaseLost`] tells it another host took over.
    async fn heartbeat(&self, attempt: &AttemptRef, lease: Duration) -> Result<(), StoreError>;

    /// Hands a running task back without charging it the attempt: the task becomes
    /// `pending`, claimable once `delay` has passed, with its attempt count as before the
    /// claim (`canceled` instead if its cancellation was asked for). For a host that is
    /// shutting down (no delay), and for a task the GPU gate holds back (a delay of one
    /// gate interval, so the tasks behind it in the queue get their turn).
    async fn release(
        &self,
        attempt: &AttemptRef,
        progress: u8,
        delay: Duration,
    ) -> Result<(), StoreError>;

    /// Takes back up to `max` running tasks of `queue` whose lease has run out, because their
    /// host died or stalled. Each becomes `pending` without being charged the attempt, and
    /// its `lease_losses` grows by one; a task with more than `max_lease_losses` becomes
    /// `failed` instead, with an error that says so, and one whose cancellation was asked for
    /// becomes `canceled`.
    async fn requeue_expired(
        &self,
        queue: &str,
        max: usize,
        max_lease_losses: u32,
    ) -> Result<Requeued, StoreError>;

    /// Cancels a task. A pending, delayed or retrying task becomes `canceled` at once, and
    /// `Canceled` is returned. For a running task the request is recorded and `Running` is
    /// returned: the host running it interrupts the attempt (see
    /// [`Store::cancel_requests`]), and its outcome is then recorded as `canceled`. A finished
    /// task is [`StoreError::WrongState`].
    async fn cancel(&self, id: &str) -> Result<TaskState, StoreError>;

    /// Ids of the running tasks of `queue` whose cancellation was asked for.
    async fn cancel_requests(&self, queue: &str) -> Result<Vec<String>, StoreError>;

    /// Re-queues a `failed` or `canceled` task, claimable at once with a fresh retry budget
    /// (attempts and lease losses from zero; the error history stays). Any other state is
    /// [`StoreError::WrongState`].
    async fn retry(&self, id: &str) -> Result<Task, StoreError>;

    /// One page of at most `limit` tasks of `queue` in `state`, starting at `cursor` (`None`
    /// for the first page; then the `next` of the page before). The cost of a call is
    /// bounded whatever the queue's size, so a page may hold fewer than `limit` tasks and
    /// still not be the last. Tasks that change state between pages may be missed or shown
    /// twice. A cursor this store did not hand out is [`StoreError::InvalidCursor`].
    async fn list(
        &self,
        queue: &str,
        state: TaskState,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TaskPage, StoreError>;

    /// Deletes up to `max` tasks of `queue` that finished (completed, failed or canceled)
    /// more than `retention` ago, and returns how many it deleted. Their counts go down
    /// with them.
    async fn trim_finished(
        &self,
        queue: &str,
        retention: Duration,
        max: usize,
    ) -> Result<u64, StoreError>;

    /// Raises the stored progress of a running task; a lower value leaves it unchanged.
    async fn set_progress(&self, attempt: &AttemptRef, percent: u8) -> Result<(), StoreError>;

    /// The task with this id, if any.
    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError>;

    /// How many tasks of `queue` are in each state; O(1), whatever the queue's size.
    async fn counts(&self, queue: &str) -> Result<StateCounts, StoreError>;

    /// Every queue that has ever had a task, sorted by name.
    async fn queues(&self) -> Result<Vec<String>, StoreError>;

    /// Publishes `report`, replacing the host's previous one; it is dropped after `ttl`
    /// unless published again, so a host that died disappears on its own.
    async fn report_host(&self, report: &HostReport, ttl: Duration) -> Result<(), StoreError>;

    /// The reports of the hosts that published one within its ttl, sorted by host id.
    async fn hosts(&self) -> Result<Vec<HostReport>, StoreError>;

    /// Deletes host `host`'s report, when it stops.
    async fn forget_host(&self, host: &str) -> Result<(), StoreError>;

    /// Calls `wake` with the queue soon after a task of one of `queues` is submitted ready
    /// to run, for as long as the returned watch is kept, so an idle host starts it at once
    /// instead of at its next poll. Best effort: a missed wake-up costs one poll interval,
    /// never a task.
    async fn watch_submissions(
        &self,
        queues: &[String],
        wake: WakeFn,
    ) -> Result<SubmissionWatch, StoreError>;
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}
