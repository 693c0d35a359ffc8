//! Claims tasks for each queue that has a plugin, runs them, and records how they ended.
//!
//! The scheduler follows the host's [`LivePlugins`]: a queue whose plugin appears (at
//! start-up or by a reload) gets a worker; a worker whose plugin is gone stops claiming and
//! lets its running attempts finish. Each attempt runs on the plugin version it was claimed
//! with, so a reload never changes an attempt under way.
//!
//! One worker per queue holds a semaphore of `concurrency` slots (the plugin's manifest's,
//! else the host's). It claims only as many
//! tasks as it has free slots (at most `batch_size` per round trip), and each claimed task
//! runs as its own async task that owns its slot: the slot is released when that task ends,
//! whatever the path, so a slow task holds one slot and never a whole batch. An idle worker
//! asks the store again after `poll_interval`, or as soon as the store announces a
//! submission to its queue ([`crate::store::Store::watch_submissions`]), whichever is first.
//!
//! After an attempt, the worker applies the task's retry policy: a retry request or a trap
//! becomes `retrying` with the policy's delay (or the handler's own); on the last attempt it
//! runs the plugin's `on-exhausted` hook and fails the task; a fatal failure fails it at once.
//!
//! Leases: while an attempt runs, its lease is renewed every third of the lease length. Every
//! worker also takes back, at the same pace, the tasks of its queue whose lease ran out
//! because their host died, so no task stays `running` forever. A host that finds its lease
//! taken over interrupts the attempt; the store would refuse its outcome anyway.
//!
//! Cancellation: a worker with running attempts asks the store every [`CANCEL_POLL`] which of
//! its tasks were canceled, and interrupts those; they end `canceled`.
//!
//! GPU gate: a claimed task that needs a GPU (by its plugin's manifest or its own
//! requirement) starts only if the host's [`GpuGate`] admits it, and holds the reservation
//! until its attempt ends. A task the gate refuses is handed back uncharged, claimable again
//! one gate interval later, so it waits without spending attempts and without standing in
//! front of the queue's other tasks, whatever their priority: the worker claims again at
//! once, and the held-back tasks are out of the way until their interval is over. Each held
//! task thus costs one claim and one hand-back per gate interval.
//!
//! Shutdown: the worker stops claiming and tells running attempts (their `cancelled()` turns
//! true), lets them finish within `shutdown_grace`, then interrupts the rest. Interrupted
//! attempts, and attempts that ask for a retry while the host shuts down, are handed back to
//! the store without being charged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::HostConfig;
use crate::gpu::{GpuGate, GpuRequirement, Reservation};
use crate::metrics;
use crate::runtime::bindings::Failure;
use crate::runtime::plugin::LivePlugins;
use crate::runtime::sandbox::{AttemptSignals, InterruptCause};
use crate::runtime::{AttemptOutcome, Plugin, Runtime, TrapReason};
use crate::store::{
    AttemptRef, FailedAttempt, HostReport, NextStep, Requeued, SharedStore, StoreError,
    SubmissionWatch, WakeFn, now_ms,
};
use crate::task::{MAX_DELAY_MS, Task, TaskState, bounded_error};

/// How often a running attempt's progress is written to the store, when it changed.
const PROGRESS_FLUSH: Duration = Duration::from_millis(500);
/// How often a worker with running attempts asks the store which were canceled; with the
/// epoch tick, a canceled task stops within about this long.
const CANCEL_POLL: Duration = Duration::from_millis(250);
/// How many times a store write that failed is tried again before the host gives up on it.
const REPORT_TRIES: u32 = 8;

/// Runs the tasks of every queue that has a plugin.
pub struct Scheduler {
    store: SharedStore,
    runtime: Arc<Runtime>,
    plugins: LivePlugins,
    config: HostConfig,
    host_id: String,
    gate: GpuGate,
}

/// Wakes each queue's worker when a task is submitted to it, by queue.
type Wakeups = Arc<Mutex<HashMap<String, Arc<Notify>>>>;

impl Scheduler {
    /// A scheduler for `plugins` on `store`. `host_id` names this host in leases and logs.
    pub fn new(
        store: SharedStore,
        runtime: Arc<Runtime>,
        plugins: impl Into<LivePlugins>,
        config: HostConfig,
        host_id: String,
    ) -> Self {
        Scheduler {
            store,
            runtime,
            plugins: plugins.into(),
            config,
            host_id,
            gate: GpuGate::closed("no GPU probe configured"),
        }
    }

    /// Uses `gate` to admit tasks that need a GPU. Without one, such tasks wait.
    pub fn with_gpu_gate(mut self, gate: GpuGate) -> Self {
        self.gate = gate;
        self
    }

    /// Runs until `shutdown` completes, then shuts down as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_until(shutdown, std::future::pending()).await;
    }

    /// Like [`Scheduler::run`], but once shutdown has begun, `hurry` completing ends the
    /// grace period at once (a second Ctrl-C): running attempts are interrupted and handed
    /// back.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
        hurry: impl Future<Output = ()>,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hurry_tx, hurry_rx) = watch::channel(false);
        let refresher = self.gate.spawn_refresher();
        let held = HeldCounts::default();
        let reporter = tokio::spawn(self.report_loop(held.clone()));
        let mut workers = Workers {
            running: JoinSet::new(),
            serving: HashSet::new(),
            wakeups: Wakeups::default(),
            submissions: SubmissionWatch::none(),
            stop: stop_rx,
            hurry: hurry_rx,
            held,
        };
        self.start_workers(&mut workers).await;
        info!(host = %self.host_id, queues = workers.serving.len(), "host started");

        let mut changes = self.plugins.subscribe();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Ok(()) = changes.changed() => self.start_workers(&mut workers).await,
                Some(ended) = workers.running.join_next() => {
                    if let Ok(queue) = ended {
                        workers.serving.remove(&queue);
                    }
                    // Its plugin may be back already.
                    self.start_workers(&mut workers).await;
                }
            }
        }

        info!(
            grace = ?self.config.shutdown_grace,
            "shutting down: no new claims, waiting for running tasks"
        );
        let _ = stop_tx.send(true);
        let drained = async { while workers.running.join_next().await.is_some() {} };
        tokio::pin!(drained);
        tokio::select! {
            _ = &mut drained => {}
            _ = hurry => {
                info!("asked again: interrupting running tasks now");
                let _ = hurry_tx.send(true);
                drained.await;
            }
        }
        refresher.abort();
        reporter.abort();
        if let Err(err) = self.store.forget_host(&self.host_id).await {
            debug!(error = %err, "host report not deleted; it expires by itself");
        }
        info!("host stopped");
    }

    /// Starts a worker for each queue of the live plugins that has none, and has the store
    /// wake the workers on submissions to their queues.
    async fn start_workers(&self, workers: &mut Workers) {
        let plugins = self.plugins.current();
        let mut started = false;
        for plugin in plugins.iter() {
            let queue = plugin.queue().to_owned();
            if workers.serving.contains(&queue) {
                continue;
            }
            let submitted = Arc::new(Notify::new());
            workers
                .wakeups
                .lock()
                .expect("poisoned")
                .insert(queue.clone(), submitted.clone());
            let concurrency = plugin.concurrency().unwrap_or(self.config.concurrency);
            let worker = QueueWorker {
                queue: queue.clone(),
                hurry: workers.hurry.clone(),
                store: self.store.clone(),
                runtime: self.runtime.clone(),
                plugins: self.plugins.clone(),
                config: self.config.clone(),
                host_id: self.host_id.clone(),
                slots: Arc::new(Semaphore::new(concurrency)),
                running: Arc::default(),
                gate: self.gate.clone(),
                held: workers.held.clone(),
                submitted,
            };
            debug!(%queue, plugin = plugin.name(), version = plugin.version(), concurrency, "queue worker started");
            workers.serving.insert(queue.clone());
            let stop = workers.stop.clone();
            workers.running.spawn(async move {
                worker.run(stop).await;
                queue
            });
            started = true;
        }
        if started {
            let queues: Vec<String> = workers.serving.iter().cloned().collect();
            workers.submissions = self
                .watch_submissions(queues, workers.wakeups.clone())
                .await;
        }
    }

    /// Has the store wake each queue's worker when a task is submitted to it. Without it
    /// (the store could not set it up), workers find new tasks by polling.
    async fn watch_submissions(&self, queues: Vec<String>, wakeups: Wakeups) -> SubmissionWatch {
        let wake: WakeFn = Arc::new(move |queue: &str| {
            if let Some(notify) = wakeups.lock().expect("poisoned").get(queue) {
                notify.notify_one();
            }
        });
        match self.store.watch_submissions(&queues, wake).await {
            Ok(watch) => watch,
            Err(err) => {
                warn!(error = %err, "no submission wake-ups; idle queues poll");
                SubmissionWatch::none()
            }
        }
    }

    /// Publishes this host's report (queues, GPU gate) every gate interval, for
    /// `rebound stats`; it expires a few intervals after the host stops.
    fn report_loop(&self, held: HeldCounts) -> impl Future<Output = ()> + Send + 'static {
        let store = self.store.clone();
        let gate = self.gate.clone();
        let host = self.host_id.clone();
        let plugins = self.plugins.clone();
        let started_ms = now_ms();
        let every = gate.interval();
        let ttl = every * 3 + Duration::from_secs(2);
        async move {
            loop {
                let queues: Vec<String> = plugins.current().queues().map(str::to_owned).collect();
                let report = HostReport {
                    host: host.clone(),
                    queues: queues.clone(),
                    started_ms,
                    reported_ms: now_ms(),
                    gate: gate.snapshot(),
                    held_at_gate: held
                        .lock()
                        .expect("poisoned")
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(q, n)| (q.clone(), *n))
                        .collect(),
                };
                if let Err(err) = store.report_host(&report, ttl).await {
                    debug!(error = %err, "host report not stored");
                }
                for queue in &queues {
                    if let Ok(counts) = store.counts(queue).await {
                        for state in TaskState::ALL {
                            metrics::queue_depth(queue, state.as_str(), counts.get(state));
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// The queue workers of a running scheduler, and what they share.
struct Workers {
    /// Each worker ends with its queue's name.
    running: JoinSet<String>,
    /// The queues that have a worker.
    serving: HashSet<String>,
    wakeups: Wakeups,
    /// Submission wake-ups for the queues in `serving`; replaced when a queue is added.
    submissions: SubmissionWatch,
    stop: watch::Receiver<bool>,
    hurry: watch::Receiver<bool>,
    held: HeldCounts,
}

/// How many tasks the GPU gate holds back, by queue, shared by the workers.
type HeldCounts = Arc<Mutex<BTreeMap<String, usize>>>;

/// The attempts one worker is running, by task id, so they can be asked to stop.
type RunningAttempts = Arc<Mutex<HashMap<String, AttemptSignals>>>;

/// Claims and runs the tasks of one queue.
struct QueueWorker {
    queue: String,
    /// True once the grace period is to end at once.
    hurry: watch::Receiver<bool>,
    store: SharedStore,
    runtime: Arc<Runtime>,
    /// Where the queue's plugin, in its newest version, is looked up at every claim.
    plugins: LivePlugins,
    config: HostConfig,
    host_id: String,
    slots: Arc<Semaphore>,
    running: RunningAttempts,
    gate: GpuGate,
    held: HeldCounts,
    /// Notified when a task is submitted to the queue.
    submitted: Arc<Notify>,
}

/// The size of a worker's slot semaphore, changed when its plugin's concurrency is. A
/// smaller size takes slots out as they come free, so running attempts are never cut short.
#[derive(Debug)]
struct SlotCapacity {
    /// Slots the worker means to have.
    size: usize,
    /// Slots still to be taken out (they were in use when the size went down).
    owed: usize,
}

impl SlotCapacity {
    fn new(size: usize) -> Self {
        SlotCapacity { size, owed: 0 }
    }

    /// Makes `slots` hold `wanted` permits in all, as far as free ones allow now; the rest
    /// are taken out at later calls.
    fn resize(&mut self, slots: &Semaphore, wanted: usize) {
        if wanted > self.size {
            let mut more = wanted - self.size;
            let repaid = more.min(self.owed);
            self.owed -= repaid;
            more -= repaid;
            slots.add_permits(more);
        } else {
            self.owed += self.size - wanted;
        }
        self.size = wanted;
        if self.owed > 0 {
            self.owed -= slots.forget_permits(self.owed);
        }
    }
}

/// When the gate first and last refused a task, for the time it spent waiting.
#[derive(Debug, Clone, Copy)]
struct Held {
    since: Instant,
    last: Instant,
}

impl QueueWorker {
    /// Claims and runs tasks until `stop`, then drains. Maintenance (cancel requests,
    /// expired leases) goes on alongside, through the drain.
    async fn run(self, stop: watch::Receiver<bool>) {
        let mut attempts = JoinSet::new();
        let maintenance = self.maintain();
        tokio::pin!(maintenance);
        tokio::select! {
            _ = self.claim_until_stopped(stop.clone(), &mut attempts) => {}
            _ = &mut maintenance => {}
        }
        tokio::select! {
            _ = self.drain(attempts) => {}
            _ = &mut maintenance => {}
        }
    }

    async fn claim_until_stopped(
        &self,
        mut stop: watch::Receiver<bool>,
        attempts: &mut JoinSet<()>,
    ) {
        let queue = self.queue.as_str();
        let mut claim_errors = 0u32;
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut capacity = SlotCapacity::new(self.slots.available_permits());
        while !*stop.borrow() {
            let Some(plugin) = self.plugins.get(queue) else {
                info!(%queue, "no plugin serves the queue any more: no new claims");
                break;
            };
            // A reload may have changed the plugin's concurrency.
            let wanted = plugin.concurrency().unwrap_or(self.config.concurrency);
            capacity.resize(&self.slots, wanted);
            // Wait for a free slot first, so nothing is claimed that cannot start at once.
            let first = tokio::select! {
                permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = stop.changed() => break,
            };
            let mut slots = vec![first];
            while slots.len() < self.config.batch_size {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => slots.push(permit),
                    Err(_) => break,
                }
            }

            let claimed = match self.claim(queue, slots.len()).await {
                Ok(tasks) => {
                    claim_errors = 0;
                    tasks
                }
                Err(err) => {
                    claim_errors += 1;
                    // One line per streak of failures, plus one every minute or so of it.
                    if claim_errors == 1 || claim_errors.is_multiple_of(1200) {
                        warn!(%queue, error = %err, failures = claim_errors, "claim failed");
                    }
                    Vec::new()
                }
            };
            let idle = claimed.len() < slots.len();
            let mut refused = 0;
            for task in claimed {
                let reservation = match self.admit(&plugin, &task, &mut held) {
                    Admission::Free => None,
                    Admission::Reserved(reservation) => Some(reservation),
                    Admission::Refused => {
                        refused += 1;
                        self.hold_back(&task).await;
                        continue;
                    }
                };
                let permit = slots.pop().expect("never claims more tasks than slots");
                let attempt = self.attempt(&plugin, task, permit, reservation, stop.clone());
                attempts.spawn(attempt);
            }
            drop(slots);
            while attempts.try_join_next().is_some() {}
            self.forget_stale_holds(&mut held);

            if refused > 0 {
                // The held-back tasks are out of the ready set for a gate interval: claim
                // again at once, so the tasks behind them (of lower priority too) get the
                // slots they left, rather than waiting behind tasks that cannot start.
                continue;
            } else if idle {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = self.submitted.notified() => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }

    /// Whether `task` may start: at once when it needs no GPU, with a reservation when the
    /// gate admits it, or not now.
    fn admit(&self, plugin: &Plugin, task: &Task, held: &mut HashMap<String, Held>) -> Admission {
        let Some(needs) = GpuRequirement::effective(task.gpu, plugin.gpu()) else {
            return Admission::Free;
        };
        let queue = self.queue.as_str();
        let now = Instant::now();
        match self.gate.admit(&needs) {
            Some(reservation) => {
                let waited = held
                    .remove(&task.id)
                    .map_or(Duration::ZERO, |h| now - h.since);
                debug!(task_id = %task.id, gpu = reservation.gpu(), ?waited, "GPU gate admitted the task");
                metrics::gate_admitted(queue, waited);
                Admission::Reserved(reservation)
            }
            None => {
                let entry = held.entry(task.id.clone()).or_insert_with(|| {
                    info!(%queue, task_id = %task.id, needs = %needs, "GPU gate holds the task until a GPU fits it");
                    Held { since: now, last: now }
                });
                entry.last = now;
                Admission::Refused
            }
        }
    }

    /// Hands a task the gate refused back to the store, uncharged, claimable again after
    /// one gate interval.
    async fn hold_back(&self, task: &Task) {
        let attempt = AttemptRef::of(task);
        let delay = self.gate.interval();
        let released = with_retries("release", || {
            self.store.release(&attempt, task.progress, delay)
        })
        .await;
        if let Err(err) = released {
            // The lease runs out and any host takes the task back; nothing is lost.
            warn!(task_id = %task.id, error = %err, "could not hand back a task the GPU gate held");
        }
    }

    /// Forgets held-back tasks not seen for a while (canceled, or taken by another host),
    /// and publishes how many are held.
    fn forget_stale_holds(&self, held: &mut HashMap<String, Held>) {
        let queue = self.queue.as_str();
        if held.is_empty() {
            // Nothing held now; say so once if something was.
            let mut counts = self.held.lock().expect("poisoned");
            if counts.get(queue).is_some_and(|n| *n > 0) {
                counts.insert(queue.to_owned(), 0);
                metrics::gate_waiting(queue, 0);
            }
            return;
        }
        let horizon = self.gate.interval() * 3 + self.config.poll_interval * 4;
        let now = Instant::now();
        held.retain(|_, h| now - h.last < horizon);
        self.held
            .lock()
            .expect("poisoned")
            .insert(queue.to_owned(), held.len());
        metrics::gate_waiting(queue, held.len());
    }

    async fn claim(&self, queue: &str, max: usize) -> Result<Vec<Task>, StoreError> {
        self.store
            .claim(queue, &self.host_id, max, self.config.lease)
            .await
    }

    /// Runs forever: interrupts running attempts whose task was canceled, takes back the
    /// queue's tasks whose host stopped renewing their lease, and deletes finished tasks
    /// past their retention.
    async fn maintain(&self) {
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(CANCEL_POLL).await;
            self.interrupt_canceled().await;
            if last_sweep.elapsed() >= self.config.lease_renewal() {
                last_sweep = tokio::time::Instant::now();
                self.requeue_expired().await;
                self.trim_finished().await;
            }
        }
    }

    /// Deletes the queue's finished tasks that are past their retention, in bounded bites.
    async fn trim_finished(&self) {
        let queue = self.queue.as_str();
        match self
            .store
            .trim_finished(queue, self.config.retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(deleted) => debug!(%queue, deleted, "deleted finished tasks past retention"),
            Err(err) => debug!(%queue, error = %err, "trimming finished tasks failed"),
        }
    }

    /// Interrupts the running attempts whose cancellation was asked for.
    async fn interrupt_canceled(&self) {
        if self.running.lock().expect("poisoned").is_empty() {
            return;
        }
        let queue = self.queue.as_str();
        let requests = match self.store.cancel_requests(queue).await {
            Ok(ids) => ids,
            Err(err) => {
                debug!(%queue, error = %err, "cancel requests not read");
                return;
            }
        };
        let running = self.running.lock().expect("poisoned");
        for id in requests {
            if let Some(signals) = running.get(&id) {
                info!(%queue, task_id = %id, "canceling a running task");
                signals.interrupt(InterruptCause::Canceled);
            }
        }
    }

    /// Takes back the queue's tasks whose host stopped renewing their lease.
    async fn requeue_expired(&self) {
        let queue = self.queue.as_str();
        let max_losses = self.config.max_lease_losses;
        match self.store.requeue_expired(queue, 1000, max_losses).await {
            Ok(done) if done != Requeued::default() => warn!(
                %queue,
                requeued = done.requeued,
                failed = done.failed,
                canceled = done.canceled,
                "took back tasks whose lease expired"
            ),
            Ok(_) => {}
            Err(err) => debug!(%queue, error = %err, "requeue of expired leases failed"),
        }
    }

    /// Asks running attempts to finish, waits for them up to the grace period, then
    /// interrupts the rest and waits for them to be handed back.
    async fn drain(&self, mut attempts: JoinSet<()>) {
        let running = || -> Vec<AttemptSignals> {
            let running = self.running.lock().expect("poisoned");
            running.values().cloned().collect()
        };
        for signals in running() {
            signals.request_stop();
        }
        let all_done = async { while attempts.join_next().await.is_some() {} };
        let mut hurry = self.hurry.clone();
        // Whether the grace period ran out (rather than being cut short).
        let grace_over = async {
            tokio::select! {
                _ = tokio::time::sleep(self.config.shutdown_grace) => true,
                _ = hurry.wait_for(|hurry| *hurry) => false,
            }
        };
        let ran_out = tokio::select! {
            _ = all_done => return,
            ran_out = grace_over => ran_out,
        };
        let left = running();
        if ran_out {
            warn!(
                queue = %self.queue,
                tasks = left.len(),
                "shutdown grace period over, interrupting running tasks"
            );
        } else {
            info!(queue = %self.queue, tasks = left.len(), "interrupting running tasks");
        }
        for signals in left {
            signals.interrupt(InterruptCause::Shutdown);
        }
        while attempts.join_next().await.is_some() {}
    }

    /// One attempt from start to recorded outcome, holding its concurrency slot throughout.
    fn attempt(
        &self,
        plugin: &Arc<Plugin>,
        task: Task,
        slot: OwnedSemaphorePermit,
        reservation: Option<Reservation>,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let gpu = reservation.as_ref().map(Reservation::gpu);
        let span = info_span!(
            "attempt",
            task_id = %task.id,
            queue = %task.queue,
            attempt = task.attempt,
            version = plugin.version(),
            gpu,
        );
        let ctx = AttemptContext {
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            plugin: plugin.clone(),
            running: self.running.clone(),
            lease: self.config.lease,
            stop,
            gpu,
            wake: self.submitted.clone(),
        };
        async move {
            ctx.run(task).await;
            // The GPU memory and the slot are given back however the attempt ended.
            drop(reservation);
            drop(slot);
        }
        .instrument(span)
    }
}

/// What one attempt needs, detached from its worker so it can run as its own task.
struct AttemptContext {
    store: SharedStore,
    runtime: Arc<Runtime>,
    plugin: Arc<Plugin>,
    running: RunningAttempts,
    lease: Duration,
    /// True once the host is shutting down.
    stop: watch::Receiver<bool>,
    /// The GPU the gate admitted the task to, if it needs one.
    gpu: Option<u32>,
    /// Wakes the queue's worker: used when a retry this attempt scheduled comes due.
    wake: Arc<Notify>,
}

impl AttemptContext {
    async fn run(self, task: Task) {
        let attempt = AttemptRef::of(&task);
        let signals = AttemptSignals::new(task.progress);
        let queue = self.plugin.queue();
        let running = {
            let mut running = self.running.lock().expect("poisoned");
            running.insert(task.id.clone(), signals.clone());
            running.len()
        };
        metrics::running(queue, running);
        if let Some(started) = task.started_ms {
            let waited = started.saturating_sub(task.run_at_ms.max(task.created_ms));
            metrics::queue_wait(queue, Duration::from_millis(waited));
        }
        debug!("attempt started");

        let began = Instant::now();
        let outcome = self.execute(&task, &attempt, &signals).await;
        metrics::attempt_ended(queue, outcome_label(&outcome, &signals), began.elapsed());
        self.record(&task, &attempt, outcome, &signals).await;

        let running = {
            let mut running = self.running.lock().expect("poisoned");
            running.remove(&task.id);
            running.len()
        };
        metrics::running(queue, running);
    }

    /// Runs the handler, renewing the lease and writing progress to the store as it goes.
    async fn execute(
        &self,
        task: &Task,
        attempt: &AttemptRef,
        signals: &AttemptSignals,
    ) -> AttemptOutcome {
        let run = self
            .runtime
            .run_attempt(&self.plugin, task, self.gpu, signals);
        tokio::pin!(run);
        let mut flush = tokio::time::interval(PROGRESS_FLUSH);
        // The claim just took a fresh lease: the first renewal is due a third of it later.
        let period = self.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut flushed = task.progress;
        loop {
            tokio::select! {
                outcome = &mut run => return outcome,
                _ = renew.tick() => self.renew_lease(attempt, signals).await,
                _ = flush.tick() => {
                    let progress = signals.progress();
                    if progress > flushed {
                        flushed = progress;
                        if let Err(err) = self.store.set_progress(attempt, progress).await {
                            debug!(error = %err, "progress not stored");
                        }
                    }
                }
            }
        }
    }

    /// Renews the attempt's lease; stops the attempt when another host has taken the task.
    async fn renew_lease(&self, attempt: &AttemptRef, signals: &AttemptSignals) {
        match self.store.heartbeat(attempt, self.lease).await {
            Ok(()) => {}
            Err(err @ StoreError::LeaseLost { .. }) => {
                warn!(error = %err, "lease lost, stopping the attempt");
                signals.interrupt(InterruptCause::LeaseLost);
            }
            // The store is unreachable; the next renewal may get through before the lease
            // runs out.
            Err(err) => debug!(error = %err, "lease renewal failed"),
        }
    }

    /// Turns the outcome into a store transition, applying the retry policy.
    async fn record(
        &self,
        task: &Task,
        attempt: &AttemptRef,
        outcome: AttemptOutcome,
        signals: &AttemptSignals,
    ) {
        let progress = signals.progress();
        if self.hand_back(&outcome, signals) {
            match with_retries("release", || {
                self.store.release(attempt, progress, Duration::ZERO)
            })
            .await
            {
                Ok(()) => info!("task handed back"),
                Err(err) => report_lost(&err),
            }
            return;
        }

        let (error, retry_in) = match outcome {
            AttemptOutcome::Completed(output) => {
                let done = with_retries("complete", || {
                    self.store.complete(attempt, &output, progress)
                })
                .await;
                match done {
                    Ok(()) => info!("task completed"),
                    Err(err) => report_lost(&err),
                }
                return;
            }
            AttemptOutcome::Failed(Failure::Fatal(message)) => {
                let failure = FailedAttempt {
                    error: bounded_error(message),
                    next: NextStep::Fail,
                    exhausted_hook_ran: false,
                    progress,
                };
                return self.record_failure(attempt, &failure).await;
            }
            AttemptOutcome::Failed(Failure::Retry(message)) => (message, self.backoff(task)),
            AttemptOutcome::Failed(Failure::RetryAfter(after)) => {
                (after.message, Duration::from_millis(after.delay_ms))
            }
            AttemptOutcome::Trapped {
                reason: TrapReason::Canceled,
                message,
            } => {
                // Canceled on request: the store ends the task `canceled`, as it knows the
                // request, whatever the next step says.
                let failure = FailedAttempt {
                    error: format!("{}: {message}", TrapReason::Canceled.as_str()),
                    next: NextStep::Fail,
                    exhausted_hook_ran: false,
                    progress,
                };
                return self.record_failure(attempt, &failure).await;
            }
            AttemptOutcome::Trapped { reason, message } => (
                format!("{}: {message}", reason.as_str()),
                self.backoff(task),
            ),
        };

        let error = bounded_error(error);
        let retry_in = retry_in.min(Duration::from_millis(MAX_DELAY_MS));
        let policy = self.plugin.policy_for(task);
        let failure = if policy.allows_retry_after(task.attempt) {
            FailedAttempt {
                error,
                next: NextStep::RetryIn(retry_in),
                exhausted_hook_ran: false,
                progress,
            }
        } else {
            let hook = self
                .runtime
                .run_exhausted_hook(&self.plugin, task, self.gpu, &error);
            if let Err(hook_error) = hook.await {
                warn!(error = %hook_error, "on-exhausted hook failed");
            }
            FailedAttempt {
                error,
                next: NextStep::Fail,
                exhausted_hook_ran: true,
                progress,
            }
        };
        self.record_failure(attempt, &failure).await;
        if let NextStep::RetryIn(delay) = failure.next {
            // Wake the worker when the retry comes due rather than at its next poll, a poll
            // interval later at worst. The store set the due time while recording, so a
            // timer started now ends after it.
            let wake = self.wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                wake.notify_one();
            });
        }
    }

    /// Whether the attempt ends by handing the task back uncharged rather than by recording
    /// its outcome: when this host stopped it (shutdown, or a lease taken over), and when the
    /// handler asked for a retry while the host was shutting down (it was told to stop).
    fn hand_back(&self, outcome: &AttemptOutcome, signals: &AttemptSignals) -> bool {
        match signals.interrupt_cause() {
            Some(InterruptCause::Shutdown | InterruptCause::LeaseLost) => return true,
            Some(InterruptCause::Canceled) => return false,
            None => {}
        }
        let shutting_down = *self.stop.borrow();
        shutting_down
            && matches!(
                outcome,
                AttemptOutcome::Failed(Failure::Retry(_) | Failure::RetryAfter(_))
            )
    }

    /// The policy's delay before retrying `task` after its current attempt.
    fn backoff(&self, task: &Task) -> Duration {
        let policy = self.plugin.policy_for(task);
        policy.jittered_delay(task.attempt, rand::random::<f64>())
    }

    async fn record_failure(&self, attempt: &AttemptRef, failure: &FailedAttempt) {
        match with_retries("fail", || self.store.fail(attempt, failure)).await {
            Ok(state) => info!(%state, error = %failure.error, "attempt failed"),
            Err(err) => report_lost(&err),
        }
    }
}

/// The `outcome` label of an attempt's metrics (one of [`metrics::OUTCOMES`]).
fn outcome_label(outcome: &AttemptOutcome, signals: &AttemptSignals) -> &'static str {
    if signals.interrupt_cause() == Some(InterruptCause::LeaseLost) {
        return "lease_lost";
    }
    match outcome {
        AttemptOutcome::Completed(_) => "completed",
        AttemptOutcome::Failed(Failure::Retry(_) | Failure::RetryAfter(_)) => "retry",
        AttemptOutcome::Failed(Failure::Fatal(_)) => "failed",
        AttemptOutcome::Trapped { reason, .. } => reason.as_str(),
    }
}

/// What the GPU gate says of a claimed task.
enum Admission {
    /// It needs no GPU.
    Free,
    /// A GPU fits it; the reservation holds its memory while it runs.
    Reserved(Reservation),
    /// No GPU fits it now.
    Refused,
}

/// Logs an outcome the store did not take.
fn report_lost(err: &StoreError) {
    match err {
        StoreError::LeaseLost { .. } => warn!(error = %err, "outcome discarded"),
        _ => error!(
            error = %err,
            "outcome not recorded; the task stays running until its lease expires"
        ),
    }
}

/// Runs a store write, trying again with a growing pause while the backend is unreachable
/// (a Redis restart), for about 25 s in all. Other errors are returned at once.
async fn with_retries<T, F, Fut>(transition: &str, mut write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut pause = Duration::from_millis(100);
    let mut tries = 1;
    loop {
        match write().await {
            Err(StoreError::Backend { .. }) if tries < REPORT_TRIES => {
                debug!(transition, tries, "store write failed, trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                tries += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_capacity_follows_the_wanted_size_without_cutting_running_attempts() {
        let slots = Arc::new(Semaphore::new(4));
        let mut capacity = SlotCapacity::new(4);
        let running: Vec<_> = (0..3)
            .map(|_| slots.clone().try_acquire_owned().unwrap())
            .collect();

        // Down to 2 while 3 run: the one free slot goes now, two more as attempts end.
        capacity.resize(&slots, 2);
        assert_eq!(slots.available_permits(), 0);
        drop(running);
        assert_eq!(slots.available_permits(), 3);
        capacity.resize(&slots, 2);
        assert_eq!(slots.available_permits(), 2);

        // Up to 5, then back to 1 with nothing running.
        capacity.resize(&slots, 5);
        assert_eq!(slots.available_permits(), 5);
        capacity.resize(&slots, 1);
        assert_eq!(slots.available_permits(), 1);

        // Up again while slots are still owed: what is owed is cancelled first.
        let held: Vec<_> = (0..1)
            .map(|_| slots.clone().try_acquire_owned().unwrap())
            .collect();
        capacity.resize(&slots, 0);
        assert_eq!(capacity.owed, 1);
        capacity.resize(&slots, 3);
        assert_eq!(capacity.owed, 0);
        drop(held);
        assert_eq!(slots.available_permits(), 3);
    }
}
