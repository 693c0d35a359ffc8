//! The embedded store: every task in one SQLite file on this machine.
//!
//! It is the store a host uses when no Redis is configured. Tasks are on disk, so they survive
//! a restart of the host, and several processes may open the same file at once (the host that
//! runs tasks and a CLI call that submits them): the file is in WAL mode, so readers never wait
//! for the writer, and every transition is one short `BEGIN IMMEDIATE` transaction, which takes
//! the file's single write lock before it reads anything. Two transitions, in this process or
//! another, therefore never interleave, and a claim cannot hand out a task another claim has.
//!
//! Each handle owns one connection behind an async mutex, and runs SQLite work on tokio's
//! blocking threads, so a transition that waits for the write lock (up to [`BUSY_TIMEOUT`])
//! never holds up the runtime. SQLite's locks cannot queue their waiters, so a connection
//! that finds the write lock taken tries again every [`LOCK_RETRY_INTERVAL`]: often enough to
//! slip in between the back-to-back transactions of a busy host. SQLite's own busy timeout
//! backs off to 100 ms between tries, and with it one of two hosts claiming in a loop got no
//! task at all in half of our runs.
//!
//! The per-state counts of each queue are kept in their own table, updated in the same
//! transaction as the task, so [`Store::counts`] reads six rows whatever the queue's size.
//!
//! Limitations: times are stored as SQLite integers, so a time past `i64::MAX` milliseconds (a
//! delay of about 292 million years) is stored as `i64::MAX`. A claim scans the claimable tasks
//! of a queue in claim order and skips those not yet due, so many delayed tasks of a higher
//! priority than the due ones make it slower. A transition whose caller stops waiting for it
//! still runs to its end on its blocking thread, so a claim given up that way leaves its tasks
//! running under leases no host knows it holds.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension as _, Row, ToSql, Transaction, TransactionBehavior};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use super::{
    AttemptRef, FailedAttempt, HostReport, NextStep, Requeued, Store, StoreError, SubmissionWatch,
    TaskPage, WakeFn, now_ms,
};
use crate::task::{ERROR_HISTORY_LEN, Lease, NewTask, StateCounts, Task, TaskState};

/// How long a transition waits for another connection's write transaction before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection waiting for the write lock sleeps between tries.
pub const LOCK_RETRY_INTERVAL: Duration = Duration::from_micros(200);

/// The schema version this code reads and writes, kept in SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 2;

/// The schema of a new file, at [`SCHEMA_VERSION`].
///
/// `seq` is the rowid, so it orders tasks by insertion and is part of every index for free.
/// `lease_token` outlives the lease it belongs to (the owner and deadline are cleared when an
/// attempt ends) so the next claim's token is always higher than every earlier one.
const SCHEMA: &str = "
CREATE TABLE tasks (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    queue               TEXT NOT NULL,
    params              TEXT NOT NULL,
    state               TEXT NOT NULL,
    priority            INTEGER NOT NULL,
    attempt             INTEGER NOT NULL,
    retry               TEXT,
    gpu                 TEXT,
    run_at_ms           INTEGER NOT NULL,
    progress            INTEGER NOT NULL,
    result              TEXT,
    last_error          TEXT,
    errors              TEXT NOT NULL,
    exhausted_hook_runs INTEGER NOT NULL,
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL,
    started_ms          INTEGER,
    finished_ms         INTEGER,
    lease_owner         TEXT,
    lease_deadline_ms   INTEGER,
    lease_token         INTEGER NOT NULL,
    lease_losses        INTEGER NOT NULL DEFAULT 0,
    cancel_requested    INTEGER NOT NULL DEFAULT 0
);

-- Only claimable tasks are in this index, in claim order, so a claim reads the first due
-- entries of its queue instead of sorting the queue.
CREATE INDEX tasks_claimable ON tasks (queue, priority DESC, run_at_ms, seq)
    WHERE state IN ('pending', 'retrying');

-- Tasks by state in insertion order, for listing one state of a queue page by page.
CREATE INDEX tasks_by_state ON tasks (queue, state, seq);

-- Finished tasks by finish time, so trimming old ones reads only those.
CREATE INDEX tasks_finished ON tasks (queue, finished_ms)
    WHERE state IN ('completed', 'failed', 'canceled');

-- Running tasks by lease deadline, so finding expired leases reads only those.
CREATE INDEX tasks_leased ON tasks (queue, lease_deadline_ms) WHERE state = 'running';

CREATE TABLE queues (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;

CREATE TABLE state_counts (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;

CREATE TABLE hosts (
    id         TEXT PRIMARY KEY,
    report     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The changes from each schema version to the next: `MIGRATIONS[v - 1]` takes a file from
/// version `v` to `v + 1`. Each runs inside the transaction that opens the file.
const MIGRATIONS: [&str; 1] = [
    // 1 → 2: tasks may carry a GPU requirement; hosts report what they do.
    "ALTER TABLE tasks ADD COLUMN gpu TEXT;
     CREATE TABLE hosts (
         id         TEXT PRIMARY KEY,
         report     TEXT NOT NULL,
         expires_ms INTEGER NOT NULL
     ) WITHOUT ROWID;",
];

/// The columns [`task_from_row`] reads, in a `SELECT` or a `RETURNING` clause.
const TASK_COLUMNS: &str = "id, queue, params, state, priority, attempt, retry, gpu, run_at_ms, \
     progress, result, last_error, errors, exhausted_hook_runs, created_ms, updated_ms, \
     started_ms, finished_ms, lease_owner, lease_deadline_ms, lease_token, lease_losses, cancel_requested";

/// The largest time, in ms since the Unix epoch, that fits in an SQLite integer.
const MAX_STORED_MS: u64 = i64::MAX as u64;

/// A store in one SQLite file. See the module docs.
///
/// Clones share one connection; open the file again for a connection of its own (of which a
/// process gains little, as SQLite lets only one of them write at a time).
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    /// The file, for error messages.
    path: PathBuf,
    /// The connection. The mutex is tokio's: transitions queue for it in order, and without
    /// holding a blocking thread while they wait.
    conn: Arc<Mutex<Connection>>,
    /// Announces the queue of every task submitted ready to run through this handle (or a
    /// clone), for [`Store::watch_submissions`]. Other processes' submissions are not
    /// seen: hosts find those by polling.
    submitted: tokio::sync::broadcast::Sender<String>,
}

/// How a transition's work can fail: with a refusal the caller gets as it is, or with a
/// backend error that gets the transition's name on its way out.
enum Failure {
    Refused(StoreError),
    Backend(anyhow::Error),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Self {
        Failure::Refused(err)
    }
}

impl From<rusqlite::Error> for Failure {
    fn from(err: rusqlite::Error) -> Self {
        Failure::Backend(err.into())
    }
}

impl EmbeddedStore {
    /// Opens the store in the file at `path`, creating the file, its parent directories and
    /// the schema when they are missing.
    ///
    /// This blocks on file I/O, and waits up to [`BUSY_TIMEOUT`] when another process is
    /// creating the schema at the same moment.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let conn = open_waiting_for_locks(path)
            .with_context(|| format!("cannot open the task store {}", path.display()))
            .map_err(|err| StoreError::backend("open", err))?;
        Ok(EmbeddedStore {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            submitted: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// The file the store is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the connection on a blocking thread, naming `transition` in any backend
    /// error.
    async fn run<T, F>(&self, transition: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Failure> + Send + 'static,
    {
        // A panic in `work` drops its transaction, which rolls it back, and then the guard,
        // so the connection is left clean for the next transition.
        let mut conn = Arc::clone(&self.conn).lock_owned().await;
        let joined = tokio::task::spawn_blocking(move || work(&mut conn)).await;

        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Failure::Refused(err))) => Err(err),
            Ok(Err(Failure::Backend(err))) => Err(StoreError::backend(transition, err)),
            Err(join_err) => Err(StoreError::backend(transition, join_err)),
        }
    }
}

/// [`open_connection`], tried again while another process holds a lock that SQLite reports
/// without calling the busy handler: switching a new file to WAL, or recovering the WAL index
/// while another connection opens the same file.
fn open_waiting_for_locks(path: &Path) -> anyhow::Result<Connection> {
    let started = Instant::now();
    loop {
        match open_connection(path) {
            Err(err) if is_busy(&err) && started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Whether `err` is SQLite saying the file is locked by another connection.
fn is_busy(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause
                .downcast_ref::<rusqlite::Error>()
                .and_then(rusqlite::Error::sqlite_error_code),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    })
}

/// Opens the connection, sets it up for sharing the file, and brings the schema up to date.
fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
    }
    let mut conn = Connection::open(path)?;

    // Set before anything else touches the file, so that even setting up waits for a
    // concurrent writer instead of failing at once.
    conn.busy_handler(Some(wait_for_lock))?;

    // WAL lets a CLI read counts while the host writes, and makes a commit one append.
    // `synchronous` stays at its default, FULL: a task a producer was told is submitted must
    // still be there after a power loss, not only after a crash.
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "the file does not support WAL journal mode (it stayed in `{mode}` mode)"
    );

    migrate(&mut conn)?;
    Ok(conn)
}

/// Creates the schema in a new file, brings an older file up to date, and refuses a file
/// written by a newer version.
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    // Immediate, so that of two processes opening a new file at once, the second waits and
    // then finds the schema the first created.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        older if (1..SCHEMA_VERSION).contains(&older) => {
            for step in older..SCHEMA_VERSION {
                let index = usize::try_from(step - 1).expect("a small positive number");
                tx.execute_batch(MIGRATIONS[index])
                    .with_context(|| format!("migrating schema version {step} to {}", step + 1))?;
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        newer => anyhow::bail!(
            "schema version {newer} is newer than this version of rebound reads \
             (version {SCHEMA_VERSION})"
        ),
    }
    tx.commit()?;
    Ok(())
}

thread_local! {
    /// When the wait for a lock that SQLite is retrying on this thread began.
    static WAIT_STARTED: Cell<Instant> = Cell::new(Instant::now());
}

/// SQLite's busy handler: sleeps [`LOCK_RETRY_INTERVAL`] and has SQLite try again, until the
/// wait has lasted [`BUSY_TIMEOUT`]. `retries` counts the tries of this wait so far; a wait runs
/// on one thread from start to end, so a thread-local clock times it.
fn wait_for_lock(retries: i32) -> bool {
    let now = Instant::now();
    if retries == 0 {
        WAIT_STARTED.set(now);
    }
    if now.duration_since(WAIT_STARTED.get()) >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(LOCK_RETRY_INTERVAL);
    true
}

/// Starts the transaction of one transition, holding the write lock from its first statement.
fn begin(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create(&self, new: NewTask) -> Result<Task, StoreError> {
        new.validate().map_err(StoreError::Invalid)?;
        let task = self
            .run("create", move |conn| {
                let tx = begin(conn)?;
                let id = new
                    .id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                let task = Task::submitted(id, new, now_ms());
                ensure_unique_id(&tx, &task.id)?;
                insert_task(&tx, &task)?;
                tx.execute(
                    "INSERT OR IGNORE INTO queues (name) VALUES (?1)",
                    [&task.queue],
                )?;
                move_count(&tx, &task.queue, None, TaskState::Pending)?;
                tx.commit()?;
                Ok(task)
            })
            .await?;
        if task.run_at_ms <= task.created_ms {
            // No receiver is not an error: no host of this process is watching.
            let _ = self.submitted.send(task.queue.clone());
        }
        Ok(task)
    }

    async fn claim(
        &self,
        queue: &str,
        owner: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Task>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let queue = queue.to_owned();
        let owner = owner.to_owned();
        self.run("claim", move |conn| {
            let tx = begin(conn)?;
            let claimed = claim_due(&tx, &queue, &owner, max, lease, now_ms())?;
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn claim_task(&self, id: &str, owner: &str, lease: Duration) -> Result<Task, StoreError> {
        let id = id.to_owned();
        let owner = owner.to_owned();
        self.run("claim", move |conn| {
            let tx = begin(conn)?;
            let task =
                load_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            if !matches!(task.state, TaskState::Pending | TaskState::Retrying) {
                return Err(StoreError::WrongState {
                    id,
                    action: "claim",
                    state: task.state,
                    allowed: "pending (delayed or not) or retrying",
                }
                .into());
            }
            let seq: i64 = tx.query_row("SELECT seq FROM tasks WHERE id = ?1", [&id], |row| {
                row.get(0)
            })?;
            let claimed = start_run(&tx, seq, task.state, &task.queue, &owner, lease, now_ms())?;
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    async fn complete(
        &self,
        attempt: &AttemptRef,
        result: &str,
        progress: u8,
    ) -> Result<(), StoreError> {
        let attempt = attempt.clone();
        let result = result.to_owned();
        self.run("complete", move |conn| {
            let tx = begin(conn)?;
            let mut task = leased_task(&tx, &attempt, "complete")?;
            record_success(&mut task, result, progress, now_ms());
            save_outcome(&tx, &task)?;
            move_count(&tx, &task.queue, Some(TaskState::Running), task.state)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn fail(
        &self,
        attempt: &AttemptRef,
        failure: &FailedAttempt,
    ) -> Result<TaskState, StoreError> {
        let attempt = attempt.clone();
        let failure = failure.clone();
        self.run("fail", move |conn| {
            let tx = begin(conn)?;
            let mut task = leased_task(&tx, &attempt, "fail")?;
            record_failure(&mut task, &failure, now_ms());
            save_outcome(&tx, &task)?;
            move_count(&tx, &task.queue, Some(TaskState::Running), task.state)?;
            tx.commit()?;
            Ok(task.state)
        })
        .await
    }

    async fn heartbeat(&self, attempt: &AttemptRef, lease: Duration) -> Result<(), StoreError> {
        let attempt = attempt.clone();
        self.run("heartbeat", move |conn| {
            let tx = begin(conn)?;
            let task = leased_task(&tx, &attempt, "heartbeat")?;
            let deadline = stored_ms(now_ms().saturating_add(duration_ms(lease)));
            tx.execute(
                "UPDATE tasks SET lease_deadline_ms = ?2 WHERE id = ?1",
                rusqlite::params![task.id, deadline],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn release(
        &self,
        attempt: &AttemptRef,
        progress: u8,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let attempt = attempt.clone();
        self.run("release", move |conn| {
            let tx = begin(conn)?;
            let mut task = leased_task(&tx, &attempt, "release")?;
            let progress = raised_progress(task.progress, progress);
            if task.cancel_requested {
                task.progress = progress;
                end_canceled(&tx, &mut task, now_ms())?;
            } else {
                let now = now_ms();
                let run_at = stored_ms(now.saturating_add(duration_ms(delay)));
                return_to_pending(&tx, &task, progress, now, run_at)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn requeue_expired(
        &self,
        queue: &str,
        max: usize,
        max_lease_losses: u32,
    ) -> Result<Requeued, StoreError> {
        let queue = queue.to_owned();
        self.run("requeue expired leases", move |conn| {
            let tx = begin(conn)?;
            let now = now_ms();
            let mut done = Requeued::default();
            for mut task in expired_leases(&tx, &queue, max, now)? {
                let owner = task.lease.as_ref().map_or("unknown", |l| l.owner.as_str());
                let owner = owner.to_owned();
                task.lease_losses = task.lease_losses.saturating_add(1);
                tx.execute(
                    "UPDATE tasks SET lease_losses = ?2 WHERE id = ?1",
                    rusqlite::params![task.id, task.lease_losses],
                )?;
                if task.cancel_requested {
                    end_canceled(&tx, &mut task, now)?;
                    done.canceled += 1;
                } else if task.lease_losses > max_lease_losses {
                    let failure = FailedAttempt {
                        error: format!(
                            "lost its lease {} times (last held by {owner}); its hosts keep \
                             dying or stalling, so it is not run again",
                            task.lease_losses
                        ),
                        next: NextStep::Fail,
                        exhausted_hook_ran: false,
                        progress: task.progress,
                    };
                    record_failure(&mut task, &failure, now);
                    save_outcome(&tx, &task)?;
                    move_count(&tx, &queue, Some(TaskState::Running), TaskState::Failed)?;
                    done.failed += 1;
                } else {
                    return_to_pending(&tx, &task, task.progress, now, now)?;
                    done.requeued += 1;
                }
            }
            tx.commit()?;
            Ok(done)
        })
        .await
    }

    async fn cancel(&self, id: &str) -> Result<TaskState, StoreError> {
        let id = id.to_owned();
        self.run("cancel", move |conn| {
            let tx = begin(conn)?;
            let task =
                load_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            let now = now_ms();
            let state = match task.state {
                TaskState::Pending | TaskState::Retrying => {
                    tx.execute(
                        "UPDATE tasks SET state = 'canceled', finished_ms = ?2, updated_ms = ?2
                         WHERE id = ?1",
                        rusqlite::params![id, now],
                    )?;
                    move_count(&tx, &task.queue, Some(task.state), TaskState::Canceled)?;
                    TaskState::Canceled
                }
                TaskState::Running => {
                    tx.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1", [&id])?;
                    TaskState::Running
                }
                finished => {
                    return Err(StoreError::WrongState {
                        id,
                        action: "cancel",
                        state: finished,
                        allowed: "pending (delayed or not), retrying or running",
                    }
                    .into());
                }
            };
            tx.commit()?;
            Ok(state)
        })
        .await
    }

    async fn cancel_requests(&self, queue: &str) -> Result<Vec<String>, StoreError> {
        let queue = queue.to_owned();
        self.run("read cancel requests", move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM tasks
                 WHERE queue = ?1 AND state = 'running' AND cancel_requested = 1",
            )?;
            let ids = stmt.query_map([&queue], |row| row.get(0))?;
            Ok(ids.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    async fn retry(&self, id: &str) -> Result<Task, StoreError> {
        let id = id.to_owned();
        self.run("retry", move |conn| {
            let tx = begin(conn)?;
            let task =
                load_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            if !matches!(task.state, TaskState::Failed | TaskState::Canceled) {
                return Err(StoreError::WrongState {
                    id,
                    action: "retry",
                    state: task.state,
                    allowed: "failed or canceled",
                }
                .into());
            }
            tx.execute(
                "UPDATE tasks SET state = 'pending', attempt = 0, lease_losses = 0,
                     cancel_requested = 0, run_at_ms = ?2, updated_ms = ?2, finished_ms = NULL
                 WHERE id = ?1",
                rusqlite::params![id, now_ms()],
            )?;
            move_count(&tx, &task.queue, Some(task.state), TaskState::Pending)?;
            let task =
                load_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
            tx.commit()?;
            Ok(task)
        })
        .await
    }

    async fn list(
        &self,
        queue: &str,
        state: TaskState,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<TaskPage, StoreError> {
        // The cursor is the insertion sequence number of the last task shown.
        let after: i64 = match cursor {
            None => 0,
            Some(cursor) => cursor
                .parse::<i64>()
                .ok()
                .filter(|seq| *seq > 0)
                .ok_or_else(|| StoreError::InvalidCursor {
                    cursor: cursor.to_owned(),
                })?,
        };
        let queue = queue.to_owned();
        let limit = limit.clamp(1, 1000);
        self.run("list", move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT seq, {TASK_COLUMNS} FROM tasks
                 WHERE queue = ?1 AND state = ?2 AND seq > ?3
                 ORDER BY seq
                 LIMIT ?4"
            ))?;
            let page_size = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(rusqlite::params![queue, state, after, page_size], |row| {
                    Ok((row.get::<_, i64>("seq")?, task_from_row(row)?))
                })?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            let next = match rows.last() {
                Some((seq, _)) if rows.len() == limit => Some(seq.to_string()),
                _ => None,
            };
            let tasks = rows.into_iter().map(|(_, task)| task).collect();
            Ok(TaskPage { tasks, next })
        })
        .await
    }

    async fn trim_finished(
        &self,
        queue: &str,
        retention: Duration,
        max: usize,
    ) -> Result<u64, StoreError> {
        let queue = queue.to_owned();
        self.run("trim finished tasks", move |conn| {
            let tx = begin(conn)?;
            let cutoff = now_ms().saturating_sub(duration_ms(retention));
            let old: Vec<(String, TaskState)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, state FROM tasks
                     WHERE queue = ?1 AND state IN ('completed', 'failed', 'canceled')
                       AND finished_ms < ?2
                     LIMIT ?3",
                )?;
                let limit = i64::try_from(max).unwrap_or(i64::MAX);
                let rows = stmt.query_map(rusqlite::params![queue, cutoff, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (id, state) in &old {
                tx.execute("DELETE FROM tasks WHERE id = ?1", [id])?;
                tx.prepare_cached(
                    "UPDATE state_counts SET count = count - 1 WHERE queue = ?1 AND state = ?2",
                )?
                .execute(rusqlite::params![queue, state])?;
            }
            tx.commit()?;
            Ok(old.len() as u64)
        })
        .await
    }

    async fn set_progress(&self, attempt: &AttemptRef, percent: u8) -> Result<(), StoreError> {
        let attempt = attempt.clone();
        self.run("set progress", move |conn| {
            let tx = begin(conn)?;
            let task = leased_task(&tx, &attempt, "set progress")?;
            let progress = raised_progress(task.progress, percent);
            tx.execute(
                "UPDATE tasks SET progress = ?2 WHERE id = ?1",
                rusqlite::params![task.id, progress],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let id = id.to_owned();
        self.run("get", move |conn| Ok(load_task(conn, &id)?)).await
    }

    async fn counts(&self, queue: &str) -> Result<StateCounts, StoreError> {
        let queue = queue.to_owned();
        self.run("count", move |conn| Ok(read_counts(conn, &queue)?))
            .await
    }

    async fn queues(&self) -> Result<Vec<String>, StoreError> {
        self.run("list queues", |conn| {
            let mut stmt = conn.prepare_cached("SELECT name FROM queues ORDER BY name")?;
            let names = stmt.query_map([], |row| row.get(0))?;
            Ok(names.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    async fn report_host(&self, report: &HostReport, ttl: Duration) -> Result<(), StoreError> {
        let report = report.clone();
        self.run("report host", move |conn| {
            let now = now_ms();
            let expires = stored_ms(now.saturating_add(duration_ms(ttl)));
            let tx = begin(conn)?;
            tx.prepare_cached("DELETE FROM hosts WHERE expires_ms <= ?1")?
                .execute([now])?;
            tx.prepare_cached(
                "INSERT INTO hosts (id, report, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET report = ?2, expires_ms = ?3",
            )?
            .execute(rusqlite::params![report.host, Json(&report), expires])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn watch_submissions(
        &self,
        queues: &[String],
        wake: WakeFn,
    ) -> Result<SubmissionWatch, StoreError> {
        let queues: HashSet<String> = queues.iter().cloned().collect();
        let mut submitted = self.submitted.subscribe();
        let (watch, mut stopped) = SubmissionWatch::new();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = submitted.recv() => message,
                    _ = &mut stopped => break,
                };
                match message {
                    Ok(queue) if queues.contains(&queue) => wake(&queue),
                    Ok(_) => {}
                    // Fell behind: wake every queue rather than miss one.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        queues.iter().for_each(|queue| wake(queue));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(watch)
    }

    async fn forget_host(&self, host: &str) -> Result<(), StoreError> {
        let host = host.to_owned();
        self.run("forget host", move |conn| {
            conn.prepare_cached("DELETE FROM hosts WHERE id = ?1")?
                .execute([host])?;
            Ok(())
        })
        .await
    }

    async fn hosts(&self) -> Result<Vec<HostReport>, StoreError> {
        self.run("list hosts", |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT report FROM hosts WHERE expires_ms > ?1 ORDER BY id")?;
            let reports = stmt.query_map([now_ms()], |row| row.get::<_, String>(0))?;
            let mut out = Vec::new();
            for json in reports {
                // A report this version cannot read (a newer host's) is left out.
                if let Ok(report) = serde_json::from_str(&json?) {
                    out.push(report);
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Refuses an id another task of any queue already has.
fn ensure_unique_id(tx: &Transaction<'_>, id: &str) -> Result<(), Failure> {
    let existing: Option<String> = tx
        .prepare_cached("SELECT queue FROM tasks WHERE id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()?;
    match existing {
        Some(queue) => Err(StoreError::DuplicateId {
            id: id.to_owned(),
            queue,
        }
        .into()),
        None => Ok(()),
    }
}

/// Inserts a new task; its lease token starts at 0, so the first claim gets token 1.
fn insert_task(tx: &Transaction<'_>, task: &Task) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO tasks (id, queue, params, state, priority, attempt, retry, run_at_ms,
             progress, errors, exhausted_hook_runs, created_ms, updated_ms, gpu, lease_token)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0)",
    )?;
    stmt.execute(rusqlite::params![
        task.id,
        task.queue,
        task.params,
        task.state,
        task.priority,
        task.attempt,
        task.retry.as_ref().map(Json),
        task.run_at_ms,
        task.progress,
        Json(&task.errors),
        task.exhausted_hook_runs,
        task.created_ms,
        task.updated_ms,
        task.gpu.as_ref().map(Json),
    ])?;
    Ok(())
}

/// Moves up to `max` due tasks of `queue` to `running` under a lease for `owner`, in claim
/// order, and returns them as they are now.
fn claim_due(
    tx: &Transaction<'_>,
    queue: &str,
    owner: &str,
    max: usize,
    lease: Duration,
    now: u64,
) -> rusqlite::Result<Vec<Task>> {
    let due = due_tasks(tx, queue, max, now)?;
    let mut claimed = Vec::with_capacity(due.len());
    for (seq, state) in due {
        claimed.push(start_run(tx, seq, state, queue, owner, lease, now)?);
    }
    Ok(claimed)
}

/// Moves the task with rowid `seq`, now in `state`, to `running` under a fresh lease for
/// `owner`, one attempt further, and returns it as it is now.
fn start_run(
    tx: &Transaction<'_>,
    seq: i64,
    state: TaskState,
    queue: &str,
    owner: &str,
    lease: Duration,
    now: u64,
) -> rusqlite::Result<Task> {
    let deadline = stored_ms(now.saturating_add(duration_ms(lease)));
    let task = tx
        .prepare_cached(&format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, started_ms = ?2,
                 updated_ms = ?2, lease_owner = ?3, lease_deadline_ms = ?4,
                 lease_token = lease_token + 1
             WHERE seq = ?1
             RETURNING {TASK_COLUMNS}"
        ))?
        .query_row(rusqlite::params![seq, now, owner, deadline], task_from_row)?;
    move_count(tx, queue, Some(state), TaskState::Running)?;
    Ok(task)
}

/// The rowids and states of the first `max` claimable tasks of `queue` that are due at `now`,
/// in claim order: highest priority first, then earliest due, then first inserted.
fn due_tasks(
    tx: &Transaction<'_>,
    queue: &str,
    max: usize,
    now: u64,
) -> rusqlite::Result<Vec<(i64, TaskState)>> {
    // The state condition is written exactly as in the index's WHERE clause, which is what
    // lets SQLite use the partial index.
    let mut stmt = tx.prepare_cached(
        "SELECT seq, state FROM tasks
         WHERE queue = ?1 AND state IN ('pending', 'retrying') AND run_at_ms <= ?2
         ORDER BY priority DESC, run_at_ms, seq
         LIMIT ?3",
    )?;
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = stmt.query_map(rusqlite::params![queue, now, limit], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    rows.collect()
}

/// Running tasks of `queue` whose lease ended before `now`, at most `max` of them.
fn expired_leases(
    tx: &Transaction<'_>,
    queue: &str,
    max: usize,
    now: u64,
) -> rusqlite::Result<Vec<Task>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE queue = ?1 AND state = 'running' AND lease_deadline_ms < ?2
         ORDER BY lease_deadline_ms
         LIMIT ?3"
    ))?;
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = stmt.query_map(rusqlite::params![queue, now, limit], task_from_row)?;
    rows.collect()
}

/// Ends a running task whose cancellation was asked for as `canceled`.
fn end_canceled(tx: &Transaction<'_>, task: &mut Task, now: u64) -> rusqlite::Result<()> {
    task.state = TaskState::Canceled;
    task.cancel_requested = false;
    task.finished_ms = Some(now);
    task.updated_ms = now;
    task.lease = None;
    save_outcome(tx, task)?;
    move_count(
        tx,
        &task.queue,
        Some(TaskState::Running),
        TaskState::Canceled,
    )
}

/// Makes a running task claimable again at `run_at`, without charging it the attempt it was
/// in.
fn return_to_pending(
    tx: &Transaction<'_>,
    task: &Task,
    progress: u8,
    now: u64,
    run_at: u64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE tasks SET state = 'pending', attempt = attempt - 1, run_at_ms = ?4,
             progress = ?3, updated_ms = ?2, lease_owner = NULL, lease_deadline_ms = NULL
         WHERE id = ?1",
    )?
    .execute(rusqlite::params![task.id, now, progress, run_at])?;
    move_count(
        tx,
        &task.queue,
        Some(TaskState::Running),
        TaskState::Pending,
    )
}

/// The task an attempt refers to, provided that attempt still holds its lease; otherwise
/// [`StoreError::LeaseLost`] for `transition`, with the task's state now.
///
/// An attempt names its task by queue and id, as the Redis store's keys do, so a task of
/// another queue with the same id counts as missing there and here alike.
fn leased_task(
    tx: &Transaction<'_>,
    attempt: &AttemptRef,
    transition: &'static str,
) -> Result<Task, Failure> {
    let task = load_task(tx, &attempt.id)?.filter(|task| task.queue == attempt.queue);
    let held = task.as_ref().is_some_and(|task| {
        task.state == TaskState::Running
            && task
                .lease
                .as_ref()
                .is_some_and(|lease| lease.token == attempt.token)
    });
    match task {
        Some(task) if held => Ok(task),
        other => Err(StoreError::LeaseLost {
            id: attempt.id.clone(),
            transition,
            token: attempt.token,
            state: other.map_or_else(|| "missing".to_owned(), |task| task.state.to_string()),
        }
        .into()),
    }
}

/// Applies a successful attempt to a running task.
fn record_success(task: &mut Task, result: String, progress: u8, now: u64) {
    task.state = TaskState::Completed;
    task.result = Some(result);
    task.progress = raised_progress(task.progress, progress);
    task.finished_ms = Some(now);
    task.updated_ms = now;
    task.lease = None;
    // Work that finished before a cancel request took effect is kept.
    task.cancel_requested = false;
}

/// Applies a failed attempt to a running task, as the host decided: retry later, or fail.
fn record_failure(task: &mut Task, failure: &FailedAttempt, now: u64) {
    task.errors.push(failure.error.clone());
    let excess = task.errors.len().saturating_sub(ERROR_HISTORY_LEN);
    task.errors.drain(..excess);
    task.last_error = Some(failure.error.clone());
    task.progress = raised_progress(task.progress, failure.progress);
    if failure.exhausted_hook_ran {
        task.exhausted_hook_runs = task.exhausted_hook_runs.saturating_add(1);
    }
    task.updated_ms = now;
    task.lease = None;

    if task.cancel_requested {
        task.cancel_requested = false;
        task.state = TaskState::Canceled;
        task.finished_ms = Some(now);
        return;
    }
    match failure.next {
        NextStep::RetryIn(delay) => {
            task.state = TaskState::Retrying;
            task.run_at_ms = stored_ms(now.saturating_add(duration_ms(delay)));
        }
        NextStep::Fail => {
            task.state = TaskState::Failed;
            task.finished_ms = Some(now);
        }
    }
}

/// Writes what ending an attempt changed. The lease's owner and deadline are cleared; its
/// token is kept, for the next claim to count on from.
fn save_outcome(tx: &Transaction<'_>, task: &Task) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "UPDATE tasks SET state = ?2, progress = ?3, result = ?4, last_error = ?5,
             errors = ?6, exhausted_hook_runs = ?7, run_at_ms = ?8, updated_ms = ?9,
             finished_ms = ?10, cancel_requested = ?11, lease_owner = NULL,
             lease_deadline_ms = NULL
         WHERE id = ?1",
    )?;
    stmt.execute(rusqlite::params![
        task.id,
        task.state,
        task.progress,
        task.result,
        task.last_error,
        Json(&task.errors),
        task.exhausted_hook_runs,
        task.run_at_ms,
        task.updated_ms,
        task.finished_ms,
        task.cancel_requested,
    ])?;
    Ok(())
}

/// The task with this id, if any.
fn load_task(conn: &Connection, id: &str) -> rusqlite::Result<Option<Task>> {
    conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?
        .query_row([id], task_from_row)
        .optional()
}

/// Moves one task of `queue` from the count of `from` (none for a new task) to that of `to`.
fn move_count(
    tx: &Transaction<'_>,
    queue: &str,
    from: Option<TaskState>,
    to: TaskState,
) -> rusqlite::Result<()> {
    if let Some(from) = from {
        tx.prepare_cached(
            "UPDATE state_counts SET count = count - 1 WHERE queue = ?1 AND state = ?2",
        )?
        .execute(rusqlite::params![queue, from])?;
    }
    tx.prepare_cached(
        "INSERT INTO state_counts (queue, state, count) VALUES (?1, ?2, 1)
         ON CONFLICT (queue, state) DO UPDATE SET count = count + 1",
    )?
    .execute(rusqlite::params![queue, to])?;
    Ok(())
}

/// The per-state counts of `queue`: at most one row per state, so O(1).
fn read_counts(conn: &Connection, queue: &str) -> rusqlite::Result<StateCounts> {
    let mut stmt = conn.prepare_cached("SELECT state, count FROM state_counts WHERE queue = ?1")?;
    let rows = stmt.query_map([queue], |row| {
        Ok((row.get::<_, TaskState>(0)?, row.get::<_, u64>(1)?))
    })?;
    let mut counts = StateCounts::default();
    for row in rows {
        let (state, count) = row?;
        *counts.get_mut(state) = count;
    }
    Ok(counts)
}

/// Reads a task from a row with the columns of [`TASK_COLUMNS`].
fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    let lease = match row.get::<_, Option<String>>("lease_owner")? {
        Some(owner) => Some(Lease {
            owner,
            deadline_ms: row.get("lease_deadline_ms")?,
            token: row.get("lease_token")?,
        }),
        None => None,
    };
    Ok(Task {
        id: row.get("id")?,
        queue: row.get("queue")?,
        params: row.get("params")?,
        state: row.get("state")?,
        priority: row.get("priority")?,
        attempt: row.get("attempt")?,
        retry: row.get::<_, Option<Json<_>>>("retry")?.map(|json| json.0),
        gpu: row.get::<_, Option<Json<_>>>("gpu")?.map(|json| json.0),
        run_at_ms: row.get("run_at_ms")?,
        progress: row.get("progress")?,
        result: row.get("result")?,
        last_error: row.get("last_error")?,
        errors: row.get::<_, Json<_>>("errors")?.0,
        exhausted_hook_runs: row.get("exhausted_hook_runs")?,
        lease_losses: row.get("lease_losses")?,
        cancel_requested: row.get("cancel_requested")?,
        created_ms: row.get("created_ms")?,
        updated_ms: row.get("updated_ms")?,
        started_ms: row.get("started_ms")?,
        finished_ms: row.get("finished_ms")?,
        lease,
    })
}

/// Progress after a report of `reported`: it never goes down, and never past 100.
fn raised_progress(stored: u8, reported: u8) -> u8 {
    stored.max(reported.min(100))
}

/// A duration in whole milliseconds, saturating.
fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A time as the store keeps it: at most [`MAX_STORED_MS`], which an SQLite integer holds.
fn stored_ms(ms: u64) -> u64 {
    ms.min(MAX_STORED_MS)
}

/// A value stored as JSON text.
struct Json<T>(T);

impl<T: Serialize> ToSql for Json<T> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let text = serde_json::to_string(&self.0)
            .map_err(|err| rusqlite::Error::ToSqlConversionFailure(err.into()))?;
        Ok(ToSqlOutput::from(text))
    }
}

impl<T: DeserializeOwned> FromSql for Json<T> {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        serde_json::from_str(text)
            .map(Json)
            .map_err(|err| FromSqlError::Other(err.into()))
    }
}

// States are stored by name, so the file reads the same in the `sqlite3` shell.
impl ToSql for TaskState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for TaskState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|err: String| FromSqlError::Other(err.into()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::backoff::{RetryPolicy, Strategy};

    const LEASE: Duration = Duration::from_secs(30);

    /// A store in a fresh temporary directory, which lives as long as the returned guard.
    fn temp_store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = EmbeddedStore::open(&dir.path().join("tasks.db")).expect("open store");
        (dir, store)
    }

    fn task_with_id(queue: &str, id: &str) -> NewTask {
        NewTask {
            id: Some(id.to_owned()),
            ..NewTask::new(queue, "{}")
        }
    }

    fn failure(error: &str, next: NextStep) -> FailedAttempt {
        FailedAttempt {
            error: error.to_owned(),
            next,
            exhausted_hook_ran: false,
            progress: 0,
        }
    }

    async fn claim_one(store: &EmbeddedStore, queue: &str) -> Task {
        let mut claimed = store.claim(queue, "host-a", 1, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 1, "expected one claimable task in `{queue}`");
        claimed.remove(0)
    }

    /// The ids of the tasks a claim of up to `max` tasks of `queue` gets.
    async fn claim_ids(store: &EmbeddedStore, queue: &str, max: usize) -> Vec<String> {
        let claimed = store.claim(queue, "host-a", max, LEASE).await.unwrap();
        claimed.into_iter().map(|task| task.id).collect()
    }

    /// The counts of `queue` as `COUNT(*)` over the tasks table gives them.
    fn counted(path: &Path, queue: &str) -> StateCounts {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT state, COUNT(*) FROM tasks WHERE queue = ?1 GROUP BY state")
            .unwrap();
        let mut counts = StateCounts::default();
        let rows = stmt
            .query_map([queue], |row| {
                Ok((row.get::<_, TaskState>(0)?, row.get(1)?))
            })
            .unwrap();
        for row in rows {
            let (state, count) = row.unwrap();
            *counts.get_mut(state) = count;
        }
        counts
    }

    #[tokio::test]
    async fn created_task_round_trips_through_get() {
        let (_dir, store) = temp_store();
        let policy = RetryPolicy {
            backoff: Strategy::Linear,
            backoff_interval_ms: 250,
            backoff_max_ms: Some(4000),
            max_retry_count: 7,
            ..RetryPolicy::default()
        };
        let new = NewTask {
            id: Some("resize-42".into()),
            priority: 5,
            delay_ms: 60_000,
            retry: Some(policy.clone()),
            ..NewTask::new("thumbnails", r#"{"width":64}"#)
        };

        let created = store.create(new).await.unwrap();

        assert_eq!(created.id, "resize-42");
        assert_eq!(created.queue, "thumbnails");
        assert_eq!(created.params, r#"{"width":64}"#);
        assert_eq!(created.state, TaskState::Pending);
        assert_eq!(created.priority, 5);
        assert_eq!(created.attempt, 0);
        assert_eq!(created.retry, Some(policy));
        assert_eq!(created.run_at_ms, created.created_ms + 60_000);
        assert_eq!(created.updated_ms, created.created_ms);
        assert_eq!(created.errors, Vec::<String>::new());
        assert_eq!(created.lease, None);
        assert_eq!(store.get("resize-42").await.unwrap(), Some(created));
        assert_eq!(store.get("resize-43").await.unwrap(), None);
    }

    #[tokio::test]
    async fn generated_ids_are_uuid_v7() {
        let (_dir, store) = temp_store();

        let task = store.create(NewTask::new("echo", "[]")).await.unwrap();

        let uuid = uuid::Uuid::parse_str(&task.id).expect("a generated id is a UUID");
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(store.get(&task.id).await.unwrap(), Some(task));
    }

    #[tokio::test]
    async fn invalid_task_is_refused_and_not_stored() {
        let (_dir, store) = temp_store();

        let err = store
            .create(NewTask::new("echo", "{not json"))
            .await
            .unwrap_err();

        assert!(
            matches!(&err, StoreError::Invalid(msg) if msg.contains("params")),
            "{err}"
        );
        assert_eq!(store.queues().await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn duplicate_id_is_refused_in_any_queue() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("emails", "job-1")).await.unwrap();

        let err = store
            .create(task_with_id("thumbnails", "job-1"))
            .await
            .unwrap_err();

        match err {
            StoreError::DuplicateId { id, queue } => {
                assert_eq!(id, "job-1");
                assert_eq!(queue, "emails");
            }
            other => panic!("expected DuplicateId, got {other}"),
        }
        assert_eq!(store.get("job-1").await.unwrap().unwrap().queue, "emails");
        assert_eq!(
            store.counts("thumbnails").await.unwrap(),
            StateCounts::default()
        );
        assert_eq!(store.queues().await.unwrap(), ["emails"]);
    }

    #[tokio::test]
    async fn claim_takes_highest_priority_first_then_oldest() {
        let (_dir, store) = temp_store();
        for (id, priority) in [("low-1", -5), ("mid-1", 0), ("high-1", 10), ("mid-2", 0)] {
            let new = NewTask {
                priority,
                ..task_with_id("q", id)
            };
            store.create(new).await.unwrap();
        }
        store
            .create(task_with_id("other", "elsewhere"))
            .await
            .unwrap();

        let first = claim_ids(&store, "q", 3).await;
        let rest = claim_ids(&store, "q", 3).await;

        assert_eq!(first, ["high-1", "mid-1", "mid-2"]);
        assert_eq!(rest, ["low-1"]);
        assert!(claim_ids(&store, "q", 3).await.is_empty());
    }

    #[tokio::test]
    async fn within_a_priority_earliest_due_goes_first_then_first_inserted() {
        let (_dir, store) = temp_store();
        for id in ["due-last", "due-first-a", "due-first-b"] {
            store.create(task_with_id("q", id)).await.unwrap();
        }
        // Set due times directly, as retries would, so that insertion order and due order
        // differ whatever the clock did between the creates.
        let conn = Connection::open(store.path()).unwrap();
        conn.execute(
            "UPDATE tasks SET run_at_ms = CASE id WHEN 'due-last' THEN 2000 ELSE 1000 END",
            [],
        )
        .unwrap();

        let claimed = claim_ids(&store, "q", 3).await;

        assert_eq!(claimed, ["due-first-a", "due-first-b", "due-last"]);
    }

    #[tokio::test]
    async fn claimed_task_is_running_under_a_fresh_lease() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();

        let claimed = claim_one(&store, "q").await;

        assert_eq!(claimed.state, TaskState::Running);
        assert_eq!(claimed.attempt, 1);
        let started = claimed.started_ms.expect("a claimed task has a start time");
        assert_eq!(claimed.updated_ms, started);
        let lease = claimed.lease.clone().expect("a claimed task has a lease");
        assert_eq!(lease.owner, "host-a");
        assert_eq!(lease.token, 1);
        assert_eq!(lease.deadline_ms, started + 30_000);
        assert_eq!(store.get("t").await.unwrap(), Some(claimed));
    }

    #[tokio::test]
    async fn claiming_nothing_changes_nothing() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();

        assert!(claim_ids(&store, "q", 0).await.is_empty());
        assert!(claim_ids(&store, "unknown", 5).await.is_empty());
        assert_eq!(store.counts("q").await.unwrap().pending, 1);
    }

    #[tokio::test]
    async fn delayed_task_is_claimable_only_once_due() {
        let (_dir, store) = temp_store();
        let delayed = NewTask {
            delay_ms: 300,
            ..task_with_id("q", "later")
        };
        store.create(delayed).await.unwrap();
        store.create(task_with_id("q", "now")).await.unwrap();

        let early = claim_ids(&store, "q", 10).await;
        tokio::time::sleep(Duration::from_millis(350)).await;
        let late = claim_ids(&store, "q", 10).await;

        assert_eq!(early, ["now"]);
        assert_eq!(late, ["later"]);
    }

    #[tokio::test]
    async fn stale_token_is_rejected_after_reclaim() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();
        let first = AttemptRef::of(&claim_one(&store, "q").await);
        let retry_now = failure("boom", NextStep::RetryIn(Duration::ZERO));
        store.fail(&first, &retry_now).await.unwrap();
        let second = claim_one(&store, "q").await;
        assert_eq!(second.lease.as_ref().unwrap().token, 2);

        let complete = store.complete(&first, "\"late\"", 100).await.unwrap_err();
        let fail = store.fail(&first, &retry_now).await.unwrap_err();
        let progress = store.set_progress(&first, 90).await.unwrap_err();

        for (err, transition) in [
            (complete, "complete"),
            (fail, "fail"),
            (progress, "set progress"),
        ] {
            match err {
                StoreError::LeaseLost {
                    id,
                    transition: got,
                    token,
                    state,
                } => {
                    assert_eq!((id.as_str(), got, token), ("t", transition, 1));
                    assert_eq!(state, "running");
                }
                other => panic!("expected LeaseLost for {transition}, got {other}"),
            }
        }
        assert_eq!(store.get("t").await.unwrap(), Some(second));
    }

    #[tokio::test]
    async fn reports_for_finished_or_missing_tasks_are_rejected() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();
        let attempt = AttemptRef::of(&claim_one(&store, "q").await);
        store.complete(&attempt, "1", 100).await.unwrap();
        let missing = AttemptRef {
            id: "nope".into(),
            ..attempt.clone()
        };
        let elsewhere = AttemptRef {
            queue: "other".into(),
            ..attempt.clone()
        };

        let again = store.complete(&attempt, "2", 100).await.unwrap_err();
        let unknown = store.set_progress(&missing, 5).await.unwrap_err();
        let wrong_queue = store.fail(&elsewhere, &failure("x", NextStep::Fail)).await;

        assert!(
            matches!(&again, StoreError::LeaseLost { state, .. } if state == "completed"),
            "{again}"
        );
        assert!(
            matches!(&unknown, StoreError::LeaseLost { state, .. } if state == "missing"),
            "{unknown}"
        );
        assert!(
            matches!(&wrong_queue, Err(StoreError::LeaseLost { state, .. }) if state == "missing"),
            "{wrong_queue:?}"
        );
        assert_eq!(
            store.get("t").await.unwrap().unwrap().result.as_deref(),
            Some("1")
        );
    }

    #[tokio::test]
    async fn completion_records_the_result_and_ends_the_lease() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();
        let attempt = AttemptRef::of(&claim_one(&store, "q").await);
        store.set_progress(&attempt, 70).await.unwrap();

        store
            .complete(&attempt, r#"{"ok":true}"#, 40)
            .await
            .unwrap();

        let task = store.get("t").await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Completed);
        assert_eq!(task.result.as_deref(), Some(r#"{"ok":true}"#));
        assert_eq!(task.progress, 70, "progress never goes down");
        assert_eq!(task.lease, None);
        assert_eq!(task.finished_ms, Some(task.updated_ms));
    }

    #[tokio::test]
    async fn progress_only_rises_and_stops_at_100() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();
        let attempt = AttemptRef::of(&claim_one(&store, "q").await);
        let mut seen = Vec::new();

        for percent in [10, 50, 20, 250] {
            store.set_progress(&attempt, percent).await.unwrap();
            seen.push(store.get("t").await.unwrap().unwrap().progress);
        }

        assert_eq!(seen, [10, 50, 50, 100]);
    }

    #[tokio::test]
    async fn failed_attempt_retries_then_fails_for_good() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();
        let first = AttemptRef::of(&claim_one(&store, "q").await);
        let retry = FailedAttempt {
            progress: 30,
            ..failure("timeout", NextStep::RetryIn(Duration::from_secs(60)))
        };

        let state = store.fail(&first, &retry).await.unwrap();

        let waiting = store.get("t").await.unwrap().unwrap();
        assert_eq!(state, TaskState::Retrying);
        assert_eq!(waiting.state, TaskState::Retrying);
        assert_eq!(waiting.run_at_ms, waiting.updated_ms + 60_000);
        assert_eq!(waiting.last_error.as_deref(), Some("timeout"));
        assert_eq!(waiting.progress, 30);
        assert_eq!((waiting.lease, waiting.finished_ms), (None, None));
        assert!(claim_ids(&store, "q", 1).await.is_empty());

        // Make the retry due at once instead of waiting out the minute.
        let conn = Connection::open(store.path()).unwrap();
        conn.execute("UPDATE tasks SET run_at_ms = 0 WHERE id = 't'", [])
            .unwrap();
        let second = claim_one(&store, "q").await;
        assert_eq!(second.attempt, 2);
        let fatal = FailedAttempt {
            exhausted_hook_ran: true,
            ..failure("out of fuel", NextStep::Fail)
        };

        let state = store.fail(&AttemptRef::of(&second), &fatal).await.unwrap();

        let failed = store.get("t").await.unwrap().unwrap();
        assert_eq!(state, TaskState::Failed);
        assert_eq!(failed.state, TaskState::Failed);
        assert_eq!(failed.errors, ["timeout", "out of fuel"]);
        assert_eq!(failed.last_error.as_deref(), Some("out of fuel"));
        assert_eq!(failed.exhausted_hook_runs, 1);
        assert_eq!(failed.finished_ms, Some(failed.updated_ms));
        assert!(claim_ids(&store, "q", 1).await.is_empty());
    }

    #[tokio::test]
    async fn error_history_keeps_only_the_latest() {
        let (_dir, store) = temp_store();
        store.create(task_with_id("q", "t")).await.unwrap();

        for n in 1..=ERROR_HISTORY_LEN + 2 {
            let attempt = AttemptRef::of(&claim_one(&store, "q").await);
            let retry_now = failure(&format!("error {n}"), NextStep::RetryIn(Duration::ZERO));
            store.fail(&attempt, &retry_now).await.unwrap();
        }

        let task = store.get("t").await.unwrap().unwrap();
        assert_eq!(
            task.errors,
            ["error 3", "error 4", "error 5", "error 6", "error 7"]
        );
        assert_eq!(task.attempt, 7);
    }

    #[tokio::test]
    async fn huge_delays_are_refused_or_saturate() {
        let (_dir, store) = temp_store();
        let far = NewTask {
            delay_ms: u64::MAX,
            ..task_with_id("q", "far")
        };

        // A submission's delay is bounded; a retry delay from a host is stored saturated.
        let err = store.create(far).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        store.create(task_with_id("q", "t")).await.unwrap();
        let attempt = AttemptRef::of(&claim_one(&store, "q").await);
        let forever = failure("later", NextStep::RetryIn(Duration::MAX));
        store.fail(&attempt, &forever).await.unwrap();

        assert_eq!(store.get("far").await.unwrap(), None);
        assert_eq!(
            store.get("t").await.unwrap().unwrap().run_at_ms,
            MAX_STORED_MS
        );
    }

    #[tokio::test]
    async fn counts_follow_every_transition() {
        let (dir, store) = temp_store();
        let path = dir.path().join("tasks.db");
        for n in 0..4 {
            store
                .create(task_with_id("q", &format!("t{n}")))
                .await
                .unwrap();
        }
        let claimed = store.claim("q", "host-a", 3, LEASE).await.unwrap();
        let attempts: Vec<AttemptRef> = claimed.iter().map(AttemptRef::of).collect();
        let retry_now = failure("flaky", NextStep::RetryIn(Duration::ZERO));

        // Each step, then the counts it leaves:
        // (pending, running, retrying, completed, failed).
        let mut seen = vec![store.counts("q").await.unwrap()];
        store.complete(&attempts[0], "1", 100).await.unwrap();
        seen.push(store.counts("q").await.unwrap());
        store.fail(&attempts[1], &retry_now).await.unwrap();
        seen.push(store.counts("q").await.unwrap());
        let fatal = failure("fatal", NextStep::Fail);
        store.fail(&attempts[2], &fatal).await.unwrap();
        seen.push(store.counts("q").await.unwrap());
        store.claim("q", "host-a", 10, LEASE).await.unwrap();
        seen.push(store.counts("q").await.unwrap());

        let expected = [
            (1, 3, 0, 0, 0),
            (1, 2, 0, 1, 0),
            (1, 1, 1, 1, 0),
            (1, 0, 1, 1, 1),
            (0, 2, 0, 1, 1),
        ];
        let as_tuple = |c: &StateCounts| (c.pending, c.running, c.retrying, c.completed, c.failed);
        assert_eq!(seen.iter().map(as_tuple).collect::<Vec<_>>(), expected);
        assert_eq!(store.counts("q").await.unwrap(), counted(&path, "q"));
        assert_eq!(
            store.counts("unknown").await.unwrap(),
            StateCounts::default()
        );
    }

    #[tokio::test]
    async fn queues_are_listed_sorted_and_once() {
        let (_dir, store) = temp_store();
        for (queue, id) in [("zeta", "1"), ("alpha", "2"), ("zeta", "3"), ("mid", "4")] {
            store.create(task_with_id(queue, id)).await.unwrap();
        }

        assert_eq!(store.queues().await.unwrap(), ["alpha", "mid", "zeta"]);
    }

    #[tokio::test]
    async fn tasks_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/tasks.db");
        let store = EmbeddedStore::open(&path).unwrap();
        store.create(task_with_id("q", "kept")).await.unwrap();
        let delayed = NewTask {
            delay_ms: 60_000,
            ..task_with_id("q", "waiting")
        };
        let waiting = store.create(delayed).await.unwrap();
        let attempt = AttemptRef::of(&claim_one(&store, "q").await);
        let retry_now = failure("crash", NextStep::RetryIn(Duration::ZERO));
        store.fail(&attempt, &retry_now).await.unwrap();
        let before = store.get("kept").await.unwrap();
        let counts = store.counts("q").await.unwrap();
        drop(store);

        let reopened = EmbeddedStore::open(&path).unwrap();

        assert_eq!(reopened.get("kept").await.unwrap(), before);
        assert_eq!(reopened.get("waiting").await.unwrap(), Some(waiting));
        assert_eq!(reopened.counts("q").await.unwrap(), counts);
        assert_eq!(reopened.queues().await.unwrap(), ["q"]);
        let again = claim_one(&reopened, "q").await;
        assert_eq!(again.id, "kept");
        assert_eq!(
            again.lease.unwrap().token,
            2,
            "tokens keep growing across restarts"
        );
    }

    #[tokio::test]
    async fn newer_schema_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        drop(EmbeddedStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();

        let err = EmbeddedStore::open(&path).unwrap_err().to_string();

        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_version_1_file_is_migrated_keeping_its_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let store = EmbeddedStore::open(&path).unwrap();
        store.create(task_with_id("old", "kept")).await.unwrap();
        drop(store);
        // Turn the file back into what version 1 wrote.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("ALTER TABLE tasks DROP COLUMN gpu; DROP TABLE hosts;")
            .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);

        let store = EmbeddedStore::open(&path).unwrap();

        assert_eq!(store.get("kept").await.unwrap().unwrap().gpu, None);
        let needs = crate::gpu::GpuRequirement::from_settings(Some(2.0), None).unwrap();
        let task = NewTask {
            gpu: Some(needs),
            ..task_with_id("new", "gpu")
        };
        store.create(task).await.unwrap();
        assert_eq!(store.get("gpu").await.unwrap().unwrap().gpu, Some(needs));
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn unopenable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();

        let err = EmbeddedStore::open(dir.path()).unwrap_err().to_string();

        assert!(err.starts_with("store failed to open"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn claim_reads_the_claimable_index_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("tasks.db")).unwrap();
        let conn = store.conn.blocking_lock();

        let mut stmt = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT seq, state FROM tasks
                 WHERE queue = ?1 AND state IN ('pending', 'retrying') AND run_at_ms <= ?2
                 ORDER BY priority DESC, run_at_ms, seq
                 LIMIT ?3",
            )
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map(rusqlite::params!["q", 0, 1], |row| row.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();

        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX tasks_claimable"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_from_two_handles_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let first = EmbeddedStore::open(&path).unwrap();
        let second = EmbeddedStore::open(&path).unwrap();
        for n in 0..200 {
            first
                .create(task_with_id("q", &format!("t{n}")))
                .await
                .unwrap();
        }

        // Three claimers per handle, each claiming small batches until the queue is empty.
        let mut claimers = Vec::new();
        for n in 0..6 {
            let store = if n % 2 == 0 { &first } else { &second }.clone();
            claimers.push(tokio::spawn(async move {
                let owner = format!("host-{n}");
                let mut ids = Vec::new();
                loop {
                    let batch = store.claim("q", &owner, 7, LEASE).await.unwrap();
                    if batch.is_empty() {
                        return ids;
                    }
                    ids.extend(batch.into_iter().map(|task| task.id));
                }
            }));
        }
        let mut per_handle = [0, 0];
        let mut all = Vec::new();
        for (n, claimer) in claimers.into_iter().enumerate() {
            let ids = claimer.await.unwrap();
            per_handle[n % 2] += ids.len();
            all.extend(ids);
        }

        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(all.len(), 200, "every task is claimed exactly once");
        assert_eq!(unique.len(), 200, "no task is claimed twice");
        assert!(
            per_handle.iter().all(|&n| n > 0),
            "each handle gets work, not only the one that wrote last: {per_handle:?}"
        );
        let counts = second.counts("q").await.unwrap();
        assert_eq!((counts.pending, counts.running), (0, 200));
        assert_eq!(counts, counted(&path, "q"));
    }

    #[test]
    fn many_handles_opening_a_new_file_at_once_all_succeed() {
        // A host and CLI calls starting together race to create the schema and switch the
        // new file to WAL; none of them may fail with "database is locked".
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tasks.db");
            let openers: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || EmbeddedStore::open(&path).map(|_| ()))
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().unwrap();
            }
        }
    }
}
