//! The library API for programs that produce tasks, inspect them, or do a task's work
//! themselves, in the words the replaced framework's users know.
//!
//! A [`Client`] wraps a store. Besides submitting and inspecting, it offers "mark
//! processing", "update progress", "mark completed" and "mark failed" for a task that a
//! program works on outside any plugin. Those go through the same lease as a host's attempt:
//! [`Client::mark_processing`] hands back an [`Attempt`], and only that attempt can report
//! progress or an outcome, so a stale worker can never overwrite a newer one.

use std::time::Duration;

use crate::store::{AttemptRef, FailedAttempt, NextStep, SharedStore, StoreError};
use crate::task::{NewTask, Task, TaskState};

/// How long a lease from [`Client::mark_processing`] lasts by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// A task that this client is working on: the task as claimed, and its lease.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The task, as it was when marked processing.
    pub task: Task,
    reference: AttemptRef,
}

/// Submits, inspects and works on tasks in a store.
#[derive(Clone)]
pub struct Client {
    store: SharedStore,
    owner: String,
    lease: Duration,
}

impl Client {
    /// A client on `store`, naming itself `owner` in the leases it takes.
    pub fn new(store: SharedStore, owner: impl Into<String>) -> Self {
        Client {
            store,
            owner: owner.into(),
            lease: DEFAULT_LEASE,
        }
    }

    /// The same client with leases of `lease`. The holder must call
    /// [`Client::heartbeat`] before a lease runs out, or any host may take the task back.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Submits a task.
    pub async fn submit(&self, task: NewTask) -> Result<Task, StoreError> {
        let task = self.store.create(task).await?;
        crate::metrics::task_created(&task.queue);
        Ok(task)
    }

    /// The task with this id, if any.
    pub async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.store.get(id).await
    }

    /// Cancels a task; see [`crate::store::Store::cancel`].
    pub async fn cancel(&self, id: &str) -> Result<TaskState, StoreError> {
        self.store.cancel(id).await
    }

    /// Runs a failed or canceled task again.
    pub async fn retry(&self, id: &str) -> Result<Task, StoreError> {
        self.store.retry(id).await
    }

    /// Starts working on the waiting task `id` now ("mark processing"): it becomes
    /// `running` under this client's lease.
    pub async fn mark_processing(&self, id: &str) -> Result<Attempt, StoreError> {
        let task = self.store.claim_task(id, &self.owner, self.lease).await?;
        let reference = AttemptRef::of(&task);
        Ok(Attempt { task, reference })
    }

    /// Renews the attempt's lease for another lease period.
    pub async fn heartbeat(&self, attempt: &Attempt) -> Result<(), StoreError> {
        self.store.heartbeat(&attempt.reference, self.lease).await
    }

    /// Reports progress in percent. It never goes down: a lower value than the stored one
    /// changes nothing. Above 100 is an error.
    pub async fn update_progress(&self, attempt: &Attempt, percent: u8) -> Result<(), StoreError> {
        if percent > 100 {
            return Err(StoreError::Invalid(format!(
                "progress {percent} of task `{}` is out of range: it must be 0 to 100",
                attempt.task.id
            )));
        }
        self.store.set_progress(&attempt.reference, percent).await
    }

    /// Finishes the attempt with `result` (JSON text): the task becomes `completed`.
    pub async fn mark_completed(&self, attempt: &Attempt, result: &str) -> Result<(), StoreError> {
        if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(result) {
            return Err(StoreError::Invalid(format!(
                "result of task `{}` is not valid JSON: {err}",
                attempt.task.id
            )));
        }
        self.store.complete(&attempt.reference, result, 0).await
    }

    /// Finishes the attempt as failed for good, with `error`: the task becomes `failed`
    /// (or `canceled`, if its cancellation was asked for meanwhile).
    pub async fn mark_failed(
        &self,
        attempt: &Attempt,
        error: &str,
    ) -> Result<TaskState, StoreError> {
        self.finish_failed(attempt, error, NextStep::Fail).await
    }

    /// Finishes the attempt as failed, to be tried again after `delay`: the task becomes
    /// `retrying`. Retry budgets are the business of hosts; this retries unconditionally.
    pub async fn mark_retry(
        &self,
        attempt: &Attempt,
        error: &str,
        delay: Duration,
    ) -> Result<TaskState, StoreError> {
        let delay = delay.min(Duration::from_millis(crate::task::MAX_DELAY_MS));
        self.finish_failed(attempt, error, NextStep::RetryIn(delay))
            .await
    }

    async fn finish_failed(
        &self,
        attempt: &Attempt,
        error: &str,
        next: NextStep,
    ) -> Result<TaskState, StoreError> {
        let failure = FailedAttempt {
            error: crate::task::bounded_error(error.to_owned()),
            next,
            exhausted_hook_ran: false,
            progress: 0,
        };
        self.store.fail(&attempt.reference, &failure).await
    }
}
