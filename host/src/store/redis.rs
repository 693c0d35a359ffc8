//! The Redis store: tasks shared by any number of hosts through one Redis server.
//!
//! Every key of a queue carries the hash tag `{rebound:QUEUE}`, so a queue lives in one Redis
//! Cluster slot and each transition can be a single Lua script over the queue's keys (the
//! scripts are in `lua/`, one per transition, each opening with its KEYS and ARGV). Two keys
//! sit outside any queue: the set of queue names, and one small string per task id that
//! points at the task's queue, so that a task can be found by its id alone and ids stay
//! unique across queues.
//!
//! Every key, its type and the transitions that write it are listed in `docs/redis-layout.md`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::{
    AttemptRef, FailedAttempt, HostReport, NextStep, Requeued, Store, StoreError, SubmissionWatch,
    TaskPage, WakeFn, now_ms,
};
use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::task::{
    ERROR_HISTORY_LEN, Lease, MAX_DELAY_MS, MAX_PRIORITY, NewTask, StateCounts, Task, TaskState,
};

/// Names every Redis key the store uses; nothing else builds key strings.
mod keys {
    /// The hash-tagged prefix shared by all keys of `queue`.
    pub fn queue_prefix(queue: &str) -> String {
        format!("{{rebound:{queue}}}")
    }

    /// The prefix that, followed by an id, names a task hash of `queue`.
    pub fn task_prefix(queue: &str) -> String {
        format!("{}:task:", queue_prefix(queue))
    }

    /// The hash of one task.
    pub fn task(queue: &str, id: &str) -> String {
        format!("{}{id}", task_prefix(queue))
    }

    /// One of the queue's sorted sets or its counts hash, by suffix.
    pub fn queue_key(queue: &str, suffix: &str) -> String {
        format!("{}:{suffix}", queue_prefix(queue))
    }

    /// The set of all queue names.
    pub const QUEUES: &str = "rebound:queues";

    /// The sorted set of host ids, scored by when their report expires (ms).
    pub const HOSTS: &str = "rebound:hosts";

    /// The string holding host `id`'s latest report (JSON), with a TTL.
    pub fn host(id: &str) -> String {
        format!("rebound:host:{id}")
    }

    /// The start of the channel on which submissions to a queue are announced.
    pub const WAKE_PREFIX: &str = "rebound:wake:";

    /// The channel on which submissions to `queue` are announced.
    pub fn wake_channel(queue: &str) -> String {
        format!("{WAKE_PREFIX}{queue}")
    }

    /// The string that records which queue holds task `id`.
    pub fn id_index(id: &str) -> String {
        format!("rebound:id:{id}")
    }
}

/// A transition script from `lua/`, with the helpers of `lua/common.lua` in front of it.
macro_rules! script {
    ($name:literal) => {
        Script::from_lua(concat!(
            include_str!("lua/common.lua"),
            "\n",
            include_str!(concat!("lua/", $name, ".lua"))
        ))
    };
}

/// The transition scripts, loaded once and run by their SHA-1.
struct Scripts {
    create: Script,
    claim: Script,
    complete: Script,
    fail: Script,
    progress: Script,
    heartbeat: Script,
    release: Script,
    requeue: Script,
    cancel: Script,
    retry: Script,
    trim: Script,
    list: Script,
    claim_task: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            create: script!("create"),
            claim: script!("claim"),
            complete: script!("complete"),
            fail: script!("fail"),
            progress: script!("progress"),
            heartbeat: script!("heartbeat"),
            release: script!("release"),
            requeue: script!("requeue"),
            cancel: script!("cancel"),
            retry: script!("retry"),
            trim: script!("trim"),
            list: script!("list"),
            claim_task: script!("claim_task"),
        }
    }
}

/// Tasks in Redis. Cheap to share: one multiplexed connection that reconnects by itself.
pub struct RedisStore {
    client: Client,
    /// How `client` was built, for the subscriber of [`Store::watch_submissions`].
    builder: Builder,
    scripts: Scripts,
    /// Queues this process already added to `rebound:queues`, to skip the write next time.
    known_queues: Mutex<HashSet<String>>,
}

/// The Redis URL `url` with every password in it replaced by `********`: the one in the
/// authority (`redis://user:secret@host`), those of cluster nodes (`?node=user:secret@host`)
/// and any query parameter whose name contains "password" (`?sentinelPassword=secret`).
/// Used wherever a URL is printed or logged.
pub fn mask_url_password(url: &str) -> String {
    const MASK: &str = "********";
    fn mask_userinfo(authority: &str) -> String {
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{MASK}@{host}"),
                None => authority.to_owned(),
            },
            None => authority.to_owned(),
        }
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    // The authority ends at the first `/` after its last `@` (a path, the database number).
    let authority_end = match before_query.rfind('@') {
        Some(at) => before_query[at..]
            .find('/')
            .map_or(before_query.len(), |i| at + i),
        None => before_query.find('/').unwrap_or(before_query.len()),
    };
    let mut masked = format!(
        "{scheme}://{}{}",
        mask_userinfo(&before_query[..authority_end]),
        &before_query[authority_end..]
    );
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                    format!("{name}={MASK}")
                }
                Some(("node", node)) => format!("node={}", mask_userinfo(node)),
                _ => param.to_owned(),
            })
            .collect();
        masked.push('?');
        masked.push_str(&params.join("&"));
    }
    masked
}

impl RedisStore {
    /// Connects to the Redis server at `url`: `redis://[user:password@]host:port[/db]`,
    /// `rediss://…` for TLS (server certificates checked against the system's roots), or
    /// `redis-cluster://host:port?node=host:port&…` for a cluster. Fails when the URL is
    /// malformed or the server cannot be reached within a few seconds; after that, lost
    /// connections are re-established in the background.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_ca(url, None).await
    }

    /// Like [`RedisStore::connect`], with TLS server certificates checked against the
    /// certificate authorities in the PEM file `ca_file` instead of the system's roots.
    pub async fn connect_with_ca(url: &str, ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let mut config = Config::from_url(url)
            .with_context(|| format!("invalid Redis URL `{}`", mask_url_password(url)))
            .map_err(|err| StoreError::backend("connect", err))?;
        if let Some(ca_file) = ca_file {
            if config.tls.is_none() {
                return Err(StoreError::Invalid(format!(
                    "a CA file ({}) is only for TLS connections, and `{}` is not a rediss:// URL",
                    ca_file.display(),
                    mask_url_password(url)
                )));
            }
            let tls = tls_with_ca(ca_file).map_err(|err| StoreError::backend("connect", err))?;
            config.tls = Some(tls.into());
        }
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_secs(5);
                conn.internal_command_timeout = Duration::from_secs(10);
            })
            .with_performance_config(|perf| {
                perf.default_command_timeout = Duration::from_secs(10);
            })
            // Reconnect forever, backing off from 100 ms to 5 s, so a Redis restart only
            // pauses the host.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let client = builder
            .build()
            .map_err(|err| StoreError::backend("connect", err))?;
        client
            .init()
            .await
            .with_context(|| format!("cannot reach Redis at `{}`", mask_url_password(url)))
            .map_err(|err| StoreError::backend("connect", err))?;
        Ok(RedisStore {
            client,
            builder,
            scripts: Scripts::new(),
            known_queues: Mutex::new(HashSet::new()),
        })
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.client.quit().await;
    }

    /// Reserves `id` for `queue` in the id index; fails if another task has it.
    async fn reserve_id(&self, id: &str, queue: &str) -> Result<(), StoreError> {
        let index = keys::id_index(id);
        let set: Option<String> = self
            .client
            .set(&index, queue, None, Some(SetOptions::NX), false)
            .await
            .map_err(|err| StoreError::backend("create", err))?;
        if set.is_some() {
            return Ok(());
        }

        // The id is taken, unless the reservation is left over from a create that never
        // finished (its task hash does not exist): then it is ours to reuse.
        let holder: Option<String> = self
            .client
            .get(&index)
            .await
            .map_err(|err| StoreError::backend("create", err))?;
        let holder = holder.unwrap_or_else(|| queue.to_owned());
        let exists: bool = self
            .client
            .exists(keys::task(&holder, id))
            .await
            .map_err(|err| StoreError::backend("create", err))?;
        if exists {
            return Err(StoreError::DuplicateId {
                id: id.to_owned(),
                queue: holder,
            });
        }
        self.client
            .set::<(), _, _>(&index, queue, None, None, false)
            .await
            .map_err(|err| StoreError::backend("create", err))
    }

    /// The queue that holds task `id`, from the id index.
    async fn queue_of(&self, id: &str, transition: &'static str) -> Result<String, StoreError> {
        let queue: Option<String> = self
            .client
            .get(keys::id_index(id))
            .await
            .map_err(|err| StoreError::backend(transition, err))?;
        queue.ok_or_else(|| StoreError::NotFound { id: id.to_owned() })
    }

    /// Adds `queue` to the set of queues, once per process.
    async fn register_queue(&self, queue: &str) -> Result<(), StoreError> {
        if self.known_queues.lock().expect("poisoned").contains(queue) {
            return Ok(());
        }
        self.client
            .sadd::<(), _, _>(keys::QUEUES, queue)
            .await
            .map_err(|err| StoreError::backend("create", err))?;
        self.known_queues
            .lock()
            .expect("poisoned")
            .insert(queue.to_owned());
        Ok(())
    }

    /// Turns a script's answer into `Ok` for "ok" and the lease error for "lost:STATE".
    fn accepted(
        attempt: &AttemptRef,
        transition: &'static str,
        answer: &str,
    ) -> Result<(), StoreError> {
        if answer == "ok" {
            return Ok(());
        }
        Err(Self::lease_lost(attempt, transition, answer))
    }

    /// Turns a script's "lost:STATE" answer into the error that says so.
    fn lease_lost(attempt: &AttemptRef, transition: &'static str, answer: &str) -> StoreError {
        StoreError::LeaseLost {
            id: attempt.id.clone(),
            transition,
            token: attempt.token,
            state: answer.trim_start_matches("lost:").to_owned(),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, task: NewTask) -> Result<Task, StoreError> {
        task.validate().map_err(StoreError::Invalid)?;
        let id = match &task.id {
            Some(id) => {
                self.reserve_id(id, &task.queue).await?;
                id.clone()
            }
            None => {
                // A fresh UUIDv7 cannot collide: record it without the check.
                let id = uuid::Uuid::now_v7().to_string();
                self.client
                    .set::<(), _, _>(keys::id_index(&id), &task.queue, None, None, false)
                    .await
                    .map_err(|err| StoreError::backend("create", err))?;
                id
            }
        };
        self.register_queue(&task.queue).await?;

        let retry = match &task.retry {
            Some(policy) => serde_json::to_string(policy).expect("a policy always serializes"),
            None => String::new(),
        };
        let gpu = match &task.gpu {
            Some(needs) => serde_json::to_string(needs).expect("a requirement always serializes"),
            None => String::new(),
        };
        let queue = &task.queue;
        let keys = vec![
            keys::task(queue, &id),
            keys::queue_key(queue, "ready"),
            keys::queue_key(queue, "scheduled"),
            keys::queue_key(queue, "counts"),
        ];
        let args: Vec<String> = vec![
            id.clone(),
            queue.clone(),
            task.params.clone(),
            task.priority.to_string(),
            task.delay_ms.to_string(),
            retry,
            MAX_PRIORITY.to_string(),
            gpu,
        ];
        let answer: Vec<String> = self
            .scripts
            .create
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("create", err))?;
        if answer.first().map(String::as_str) != Some("ok") {
            return Err(StoreError::DuplicateId {
                id,
                queue: queue.clone(),
            });
        }
        let now: u64 = answer.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);

        Ok(Task::submitted(id, task, now))
    }

    async fn claim(
        &self,
        queue: &str,
        owner: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError> {
        let keys = vec![
            keys::queue_key(queue, "ready"),
            keys::queue_key(queue, "scheduled"),
            keys::queue_key(queue, "running"),
            keys::queue_key(queue, "counts"),
        ];
        let args: Vec<String> = vec![
            max.to_string(),
            owner.to_owned(),
            lease.as_millis().to_string(),
            keys::task_prefix(queue),
            MAX_PRIORITY.to_string(),
        ];
        let claimed: Value = self
            .scripts
            .claim
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("claim", err))?;
        claimed
            .into_array()
            .into_iter()
            .map(|fields| task_from_fields(fields.into_array()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| StoreError::backend("claim", err))
    }

    async fn claim_task(&self, id: &str, owner: &str, lease: Duration) -> Result<Task, StoreError> {
        let queue = self.queue_of(id, "claim").await?;
        let keys = vec![
            keys::task(&queue, id),
            keys::queue_key(&queue, "ready"),
            keys::queue_key(&queue, "scheduled"),
            keys::queue_key(&queue, "running"),
            keys::queue_key(&queue, "counts"),
        ];
        let args = vec![
            id.to_owned(),
            owner.to_owned(),
            lease.as_millis().to_string(),
        ];
        let reply: Value = self
            .scripts
            .claim_task
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("claim", err))?;
        let fields = reply.into_array();
        match fields.first().and_then(Value::as_str).as_deref() {
            Some("missing") => Err(StoreError::NotFound { id: id.to_owned() }),
            Some("state") => {
                let state = fields.get(1).and_then(Value::as_str).unwrap_or_default();
                Err(wrong_state(
                    id,
                    "claim",
                    &state,
                    "pending (delayed or not) or retrying",
                ))
            }
            _ => task_from_fields(fields).map_err(|err| StoreError::backend("claim", err)),
        }
    }

    async fn complete(
        &self,
        attempt: &AttemptRef,
        result: &str,
        progress: u8,
    ) -> Result<(), StoreError> {
        let queue = &attempt.queue;
        let keys = vec![
            keys::task(queue, &attempt.id),
            keys::queue_key(queue, "running"),
            keys::queue_key(queue, "completed"),
            keys::queue_key(queue, "counts"),
            keys::queue_key(queue, "cancels"),
        ];
        let args: Vec<String> = vec![
            attempt.id.clone(),
            attempt.token.to_string(),
            result.to_owned(),
            progress.min(100).to_string(),
        ];
        let answer: String = self
            .scripts
            .complete
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("complete", err))?;
        Self::accepted(attempt, "complete", &answer)
    }

    async fn fail(
        &self,
        attempt: &AttemptRef,
        failure: &FailedAttempt,
    ) -> Result<TaskState, StoreError> {
        let queue = &attempt.queue;
        let keys = vec![
            keys::task(queue, &attempt.id),
            keys::queue_key(queue, "running"),
            keys::queue_key(queue, "scheduled"),
            keys::queue_key(queue, "failed"),
            keys::queue_key(queue, "counts"),
            keys::queue_key(queue, "canceled"),
            keys::queue_key(queue, "cancels"),
        ];
        let delay = match failure.next {
            // Lua numbers are doubles: keep delays within their exact integer range.
            NextStep::RetryIn(delay) => delay.as_millis().min(1 << 52).to_string(),
            NextStep::Fail => "-1".to_owned(),
        };
        let args: Vec<String> = vec![
            attempt.id.clone(),
            attempt.token.to_string(),
            failure.error.clone(),
            delay,
            u8::from(failure.exhausted_hook_ran).to_string(),
            failure.progress.min(100).to_string(),
            ERROR_HISTORY_LEN.to_string(),
        ];
        let answer: String = self
            .scripts
            .fail
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("fail", err))?;
        answer
            .parse::<TaskState>()
            .map_err(|_| Self::lease_lost(attempt, "fail", &answer))
    }

    async fn heartbeat(&self, attempt: &AttemptRef, lease: Duration) -> Result<(), StoreError> {
        let keys = vec![
            keys::task(&attempt.queue, &attempt.id),
            keys::queue_key(&attempt.queue, "running"),
        ];
        let args: Vec<String> = vec![
            attempt.id.clone(),
            attempt.token.to_string(),
            lease.as_millis().to_string(),
        ];
        let answer: String = self
            .scripts
            .heartbeat
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("heartbeat", err))?;
        Self::accepted(attempt, "heartbeat", &answer)
    }

    async fn release(
        &self,
        attempt: &AttemptRef,
        progress: u8,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let queue = &attempt.queue;
        let keys = vec![
            keys::task(queue, &attempt.id),
            keys::queue_key(queue, "ready"),
            keys::queue_key(queue, "running"),
            keys::queue_key(queue, "counts"),
            keys::queue_key(queue, "canceled"),
            keys::queue_key(queue, "cancels"),
            keys::queue_key(queue, "scheduled"),
        ];
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(MAX_DELAY_MS);
        let args: Vec<String> = vec![
            attempt.id.clone(),
            attempt.token.to_string(),
            MAX_PRIORITY.to_string(),
            progress.min(100).to_string(),
            delay_ms.min(MAX_DELAY_MS).to_string(),
        ];
        let answer: String = self
            .scripts
            .release
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("release", err))?;
        // "canceled": handed back, and ended there, as its cancellation was asked for.
        let answer = if answer == "canceled" {
            "ok"
        } else {
            answer.as_str()
        };
        Self::accepted(attempt, "release", answer)
    }

    async fn requeue_expired(
        &self,
        queue: &str,
        max: usize,
        max_lease_losses: u32,
    ) -> Result<Requeued, StoreError> {
        let keys = vec![
            keys::queue_key(queue, "ready"),
            keys::queue_key(queue, "running"),
            keys::queue_key(queue, "failed"),
            keys::queue_key(queue, "counts"),
            keys::queue_key(queue, "canceled"),
            keys::queue_key(queue, "cancels"),
        ];
        let args: Vec<String> = vec![
            max.to_string(),
            keys::task_prefix(queue),
            MAX_PRIORITY.to_string(),
            max_lease_losses.to_string(),
            ERROR_HISTORY_LEN.to_string(),
        ];
        let (requeued, failed, canceled): (u64, u64, u64) = self
            .scripts
            .requeue
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("requeue expired leases", err))?;
        Ok(Requeued {
            requeued,
            failed,
            canceled,
        })
    }

    async fn cancel(&self, id: &str) -> Result<TaskState, StoreError> {
        let queue = self.queue_of(id, "cancel").await?;
        let keys = vec![
            keys::task(&queue, id),
            keys::queue_key(&queue, "ready"),
            keys::queue_key(&queue, "scheduled"),
            keys::queue_key(&queue, "canceled"),
            keys::queue_key(&queue, "counts"),
            keys::queue_key(&queue, "cancels"),
        ];
        let answer: String = self
            .scripts
            .cancel
            .evalsha_with_reload(&self.client, keys, vec![id.to_owned()])
            .await
            .map_err(|err| StoreError::backend("cancel", err))?;
        match answer.as_str() {
            "canceled" => Ok(TaskState::Canceled),
            "running" => Ok(TaskState::Running),
            "missing" => Err(StoreError::NotFound { id: id.to_owned() }),
            other => Err(wrong_state(
                id,
                "cancel",
                other,
                "pending (delayed or not), retrying or running",
            )),
        }
    }

    async fn cancel_requests(&self, queue: &str) -> Result<Vec<String>, StoreError> {
        self.client
            .smembers(keys::queue_key(queue, "cancels"))
            .await
            .map_err(|err| StoreError::backend("read cancel requests", err))
    }

    async fn retry(&self, id: &str) -> Result<Task, StoreError> {
        let queue = self.queue_of(id, "retry").await?;
        let keys = vec![
            keys::task(&queue, id),
            keys::queue_key(&queue, "ready"),
            keys::queue_key(&queue, "failed"),
            keys::queue_key(&queue, "canceled"),
            keys::queue_key(&queue, "counts"),
        ];
        let args = vec![id.to_owned(), MAX_PRIORITY.to_string()];
        let answer: String = self
            .scripts
            .retry
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("retry", err))?;
        match answer.as_str() {
            "ok" => self
                .get(id)
                .await?
                .ok_or_else(|| StoreError::NotFound { id: id.to_owned() }),
            "missing" => Err(StoreError::NotFound { id: id.to_owned() }),
            other => Err(wrong_state(id, "retry", other, "failed or canceled")),
        }
    }

    async fn list(
        &self,
        queue: &str,
        state: TaskState,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TaskPage, StoreError> {
        // The sorted sets that can hold a task in `state`.
        let sets: &[&str] = match state {
            TaskState::Pending | TaskState::Retrying => &["ready", "scheduled"],
            TaskState::Running => &["running"],
            TaskState::Completed => &["completed"],
            TaskState::Failed => &["failed"],
            TaskState::Canceled => &["canceled"],
        };
        let (set, rank) = match cursor {
            None => (1, 0),
            Some(cursor) => parse_cursor(cursor, sets.len())?,
        };
        let keys: Vec<String> = sets.iter().map(|set| keys::queue_key(queue, set)).collect();
        let limit = limit.clamp(1, MAX_PAGE);
        let args: Vec<String> = vec![
            state.as_str().to_owned(),
            set.to_string(),
            rank.to_string(),
            limit.to_string(),
            (limit * 10).to_string(),
            keys::task_prefix(queue),
        ];
        let reply: Value = self
            .scripts
            .list
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("list", err))?;

        let mut reply = reply.into_array().into_iter();
        let next_set = reply.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let next_rank = reply.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let tasks = reply
            .map(|fields| task_from_fields(fields.into_array()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| StoreError::backend("list", err))?;
        let next = (next_set != 0).then(|| format!("{next_set}:{next_rank}"));
        Ok(TaskPage { tasks, next })
    }

    async fn trim_finished(
        &self,
        queue: &str,
        retention: Duration,
        max: usize,
    ) -> Result<u64, StoreError> {
        let keys = vec![
            keys::queue_key(queue, "completed"),
            keys::queue_key(queue, "failed"),
            keys::queue_key(queue, "canceled"),
            keys::queue_key(queue, "counts"),
        ];
        let args = vec![
            keys::task_prefix(queue),
            retention.as_millis().min(1 << 52).to_string(),
            max.to_string(),
        ];
        let deleted: Vec<String> = self
            .scripts
            .trim
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("trim finished tasks", err))?;
        // The id index entries live in other slots, so they go in a command of their own; an
        // entry left behind (a crash in between) points at nothing and reads as not found.
        // One DEL per key: in a Redis Cluster they are in different slots.
        for id in &deleted {
            self.client
                .del::<(), _>(keys::id_index(id))
                .await
                .map_err(|err| StoreError::backend("trim finished tasks", err))?;
        }
        Ok(deleted.len() as u64)
    }

    async fn set_progress(&self, attempt: &AttemptRef, percent: u8) -> Result<(), StoreError> {
        let keys = vec![keys::task(&attempt.queue, &attempt.id)];
        let args: Vec<String> = vec![attempt.token.to_string(), percent.min(100).to_string()];
        let answer: String = self
            .scripts
            .progress
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|err| StoreError::backend("set progress", err))?;
        Self::accepted(attempt, "set progress", &answer)
    }

    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let queue = match self.queue_of(id, "get").await {
            Ok(queue) => queue,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(err),
        };
        let fields: HashMap<String, String> = self
            .client
            .hgetall(keys::task(&queue, id))
            .await
            .map_err(|err| StoreError::backend("get", err))?;
        if fields.is_empty() {
            return Ok(None);
        }
        task_from_map(&fields)
            .map(Some)
            .map_err(|err| StoreError::backend("get", err))
    }

    async fn counts(&self, queue: &str) -> Result<StateCounts, StoreError> {
        let stored: HashMap<String, i64> = self
            .client
            .hgetall(keys::queue_key(queue, "counts"))
            .await
            .map_err(|err| StoreError::backend("count", err))?;
        let mut counts = StateCounts::default();
        for (state, n) in stored {
            if let Ok(state) = state.parse::<TaskState>() {
                *counts.get_mut(state) = u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(counts)
    }

    async fn queues(&self) -> Result<Vec<String>, StoreError> {
        let mut queues: Vec<String> = self
            .client
            .smembers(keys::QUEUES)
            .await
            .map_err(|err| StoreError::backend("list queues", err))?;
        queues.sort();
        Ok(queues)
    }

    async fn report_host(&self, report: &HostReport, ttl: Duration) -> Result<(), StoreError> {
        let json = serde_json::to_string(report).expect("a report always serializes");
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let expires = now_ms().saturating_add(u64::try_from(ttl_ms).unwrap_or(u64::MAX));
        // Two keys in different slots (a cluster may hold them apart), so two commands: a
        // report whose index entry was not written is invisible, and expires anyway.
        self.client
            .set::<(), _, _>(
                keys::host(&report.host),
                json,
                Some(Expiration::PX(ttl_ms)),
                None,
                false,
            )
            .await
            .map_err(|err| StoreError::backend("report host", err))?;
        self.client
            .zadd::<(), _, _>(
                keys::HOSTS,
                None,
                None,
                false,
                false,
                (expires as f64, report.host.as_str()),
            )
            .await
            .map_err(|err| StoreError::backend("report host", err))
    }

    async fn watch_submissions(
        &self,
        queues: &[String],
        wake: WakeFn,
    ) -> Result<SubmissionWatch, StoreError> {
        let backend = |err| StoreError::backend("watch submissions", err);
        let subscriber = self.builder.build_subscriber_client().map_err(backend)?;
        subscriber.init().await.map_err(backend)?;
        // Subscribes again after every reconnection.
        let resubscriber = subscriber.manage_subscriptions();
        let channels: Vec<String> = queues.iter().map(|q| keys::wake_channel(q)).collect();
        subscriber.subscribe(channels).await.map_err(backend)?;
        let mut messages = subscriber.message_rx();
        let (watch, mut stopped) = SubmissionWatch::new();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = messages.recv() => message,
                    _ = &mut stopped => break,
                };
                match message {
                    Ok(message) => {
                        if let Some(queue) = message.channel.strip_prefix(keys::WAKE_PREFIX) {
                            wake(queue);
                        }
                    }
                    // Fell behind: some wake-ups were lost; polling covers them.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
            resubscriber.abort();
            let _ = subscriber.quit().await;
        });
        Ok(watch)
    }

    async fn forget_host(&self, host: &str) -> Result<(), StoreError> {
        let backend = |err| StoreError::backend("forget host", err);
        self.client
            .del::<(), _>(keys::host(host))
            .await
            .map_err(backend)?;
        self.client
            .zrem::<(), _, _>(keys::HOSTS, host)
            .await
            .map_err(backend)
    }

    async fn hosts(&self) -> Result<Vec<HostReport>, StoreError> {
        let backend = |err| StoreError::backend("list hosts", err);
        let now = now_ms() as f64;
        self.client
            .zremrangebyscore::<(), _, _, _>(keys::HOSTS, f64::NEG_INFINITY, now)
            .await
            .map_err(backend)?;
        let mut ids: Vec<String> = self
            .client
            .zrange(keys::HOSTS, 0, -1, None, false, None, false)
            .await
            .map_err(backend)?;
        ids.sort();
        let mut reports = Vec::with_capacity(ids.len());
        for id in ids {
            let json: Option<String> = self.client.get(keys::host(&id)).await.map_err(backend)?;
            // Gone between the two reads: it expired. Unreadable: a newer host's format.
            if let Some(report) = json.and_then(|json| serde_json::from_str(&json).ok()) {
                reports.push(report);
            }
        }
        Ok(reports)
    }
}

/// A TLS client configuration that trusts the certificate authorities in `ca_file` (PEM).
fn tls_with_ca(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read the CA file {}", ca_file.display()))?;
    for certificate in certificates {
        let certificate = certificate
            .with_context(|| format!("the CA file {} is not valid PEM", ca_file.display()))?;
        roots.add(certificate).with_context(|| {
            format!(
                "the CA file {} holds an unusable certificate",
                ca_file.display()
            )
        })?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "the CA file {} holds no certificate",
        ca_file.display()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS library refused its own default protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The most tasks one page of a listing holds.
const MAX_PAGE: usize = 1000;

/// Reads a listing cursor `SET:RANK`, checking it against the number of sets walked.
fn parse_cursor(cursor: &str, sets: usize) -> Result<(usize, u64), StoreError> {
    let invalid = || StoreError::InvalidCursor {
        cursor: cursor.to_owned(),
    };
    let (set, rank) = cursor.split_once(':').ok_or_else(invalid)?;
    let set: usize = set.parse().map_err(|_| invalid())?;
    let rank: u64 = rank.parse().map_err(|_| invalid())?;
    if set == 0 || set > sets {
        return Err(invalid());
    }
    Ok((set, rank))
}

/// The error for a script's "final:STATE" or "state:STATE" answer.
fn wrong_state(id: &str, action: &'static str, answer: &str, allowed: &'static str) -> StoreError {
    let state = answer.split_once(':').map_or(answer, |(_, state)| state);
    match state.parse() {
        Ok(state) => StoreError::WrongState {
            id: id.to_owned(),
            action,
            state,
            allowed,
        },
        Err(err) => StoreError::backend(action, anyhow!("unexpected answer `{answer}`: {err}")),
    }
}

/// Reads a task from the flat field/value array that HGETALL returns inside a script.
fn task_from_fields(fields: Vec<Value>) -> anyhow::Result<Task> {
    let mut map = HashMap::with_capacity(fields.len() / 2);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let name = name.into_string().context("field name is not text")?;
        let value = value
            .into_string()
            .with_context(|| format!("field `{name}` is not text"))?;
        map.insert(name, value);
    }
    task_from_map(&map)
}

/// Reads a task from its hash fields, naming the field that is missing or malformed.
fn task_from_map(fields: &HashMap<String, String>) -> anyhow::Result<Task> {
    let text = |name: &str| -> anyhow::Result<String> {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("task hash has no field `{name}`"))
    };
    let number = |name: &str| -> anyhow::Result<u64> {
        text(name)?
            .parse()
            .with_context(|| format!("task field `{name}` is not a number"))
    };
    let optional = |name: &str| -> anyhow::Result<Option<u64>> {
        fields
            .get(name)
            .map(|v| v.parse())
            .transpose()
            .with_context(|| format!("task field `{name}` is not a number"))
    };

    let id = text("id")?;
    let state: TaskState = text("state")?.parse().map_err(|e: String| anyhow!(e))?;
    let retry: Option<RetryPolicy> = fields
        .get("retry")
        .map(|json| serde_json::from_str(json))
        .transpose()
        .context("task field `retry` is not a retry policy")?;
    let gpu: Option<GpuRequirement> = fields
        .get("gpu")
        .map(|json| serde_json::from_str(json))
        .transpose()
        .context("task field `gpu` is not a GPU requirement")?;
    let errors: Vec<String> = match fields.get("errors") {
        Some(json) => serde_json::from_str(json).context("task field `errors` is not a list")?,
        None => Vec::new(),
    };
    let lease = match (fields.get("owner"), optional("lease_deadline")?) {
        (Some(owner), Some(deadline_ms)) => Some(Lease {
            owner: owner.clone(),
            deadline_ms,
            token: number("token")?,
        }),
        _ => None,
    };
    let priority: i32 = text("priority")?
        .parse()
        .context("task field `priority` is not a number")?;

    Ok(Task {
        id,
        queue: text("queue")?,
        params: text("params")?,
        state,
        priority,
        attempt: u32::try_from(number("attempt")?).unwrap_or(u32::MAX),
        retry,
        gpu,
        run_at_ms: number("run_at")?,
        progress: u8::try_from(number("progress")?.min(100)).unwrap_or(100),
        result: fields.get("result").cloned(),
        last_error: fields.get("last_error").cloned(),
        errors,
        exhausted_hook_runs: u32::try_from(number("hook_runs")?).unwrap_or(u32::MAX),
        lease_losses: u32::try_from(optional("lease_losses")?.unwrap_or(0)).unwrap_or(u32::MAX),
        cancel_requested: fields.contains_key("cancel"),
        created_ms: number("created")?,
        updated_ms: number("updated")?,
        started_ms: optional("started")?,
        finished_ms: optional("finished")?,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::mask_url_password;

    #[test]
    fn masks_every_password_in_a_url() {
        let cases = [
            ("redis://localhost:6379/0", "redis://localhost:6379/0"),
            (
                "redis://:s3cret@localhost:6379",
                "redis://:********@localhost:6379",
            ),
            (
                "rediss://app:p@ss@w0rd@db:6380/2",
                "rediss://app:********@db:6380/2",
            ),
            ("redis://app@localhost", "redis://app@localhost"),
            (
                "redis-cluster://u:a@h1:30001?node=u:b@h2:30002&node=h3:30003",
                "redis-cluster://u:********@h1:30001?node=u:********@h2:30002&node=h3:30003",
            ),
            (
                "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=x",
                "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=********",
            ),
            ("not a url", "not a url"),
        ];
        for (url, masked) in cases {
            assert_eq!(mask_url_password(url), masked, "{url}");
        }
    }
}
