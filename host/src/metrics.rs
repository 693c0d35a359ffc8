//! Every metric the host exports, declared in one place.
//!
//! Names start with `rebound_` and end in their unit; labels are bounded (queue, GPU index),
//! never a task id. The rest of the host records through the functions below rather than
//! through the `metrics` macros, so a name or a label is spelled once.
//!
//! Without [`install`] the recording functions cost a few nanoseconds and go nowhere (the
//! `metrics` facade has no recorder), which is what library users and tests get.

use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::gpu::GpuReading;

const TASKS_CREATED: &str = "rebound_tasks_created_total";
const ATTEMPTS: &str = "rebound_attempts_total";
const TASK_DURATION: &str = "rebound_task_duration_seconds";
const QUEUE_WAIT: &str = "rebound_queue_wait_seconds";
const INSTANTIATION: &str = "rebound_instantiation_seconds";
const QUEUE_DEPTH: &str = "rebound_queue_depth_tasks";
const RUNNING: &str = "rebound_running_instances";
const FUEL: &str = "rebound_fuel_consumed_total";
const PLUGIN_LOADS: &str = "rebound_plugin_loads_total";
const PLUGIN_LOAD_FAILURES: &str = "rebound_plugin_load_failures_total";
const GPU_FREE: &str = "rebound_gpu_free_memory_bytes";
const GPU_TOTAL: &str = "rebound_gpu_total_memory_bytes";
const GPU_UTILIZATION: &str = "rebound_gpu_utilization_ratio";
const GPU_RESERVED: &str = "rebound_gpu_reserved_memory_bytes";
const GATE_WAITING: &str = "rebound_gate_waiting_tasks";
const GATE_WAIT: &str = "rebound_gate_wait_seconds";
const GATE_ADMITTED: &str = "rebound_gate_admitted_tasks_total";

/// Histogram buckets for waits and task durations, in seconds: from 1 ms to 30 minutes.
const WAIT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 900.0,
    1800.0,
];

/// Histogram buckets for instantiation, in seconds: from 10 µs to 1 s.
const INSTANTIATION_BUCKETS: [f64; 11] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1, 1.0,
];

/// Every outcome an attempt can have, as the `outcome` label spells it.
pub const OUTCOMES: [&str; 12] = [
    "completed",
    "retry",
    "failed",
    "timeout",
    "out_of_fuel",
    "memory_limit",
    "stack_overflow",
    "guest_panic",
    "host_limit",
    "trap",
    "canceled",
    "lease_lost",
];

/// Installs the Prometheus recorder for this process and describes every metric. Call once;
/// the handle renders the text format for `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(GATE_WAIT.to_owned()), &WAIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(TASK_DURATION.to_owned()), &WAIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.to_owned()), &WAIT_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(INSTANTIATION.to_owned()),
            &INSTANTIATION_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        TASKS_CREATED,
        "Tasks submitted through this host's HTTP API, by queue"
    );
    describe_counter!(
        ATTEMPTS,
        "Attempts that ended, by queue and outcome (completed, retry, failed, timeout, \
         out_of_fuel, memory_limit, stack_overflow, guest_panic, host_limit, trap, canceled, \
         lease_lost)"
    );
    describe_histogram!(
        TASK_DURATION,
        Unit::Seconds,
        "Wall-clock time of one attempt, from instantiation to its outcome"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time from a task becoming due (created, or its delay or backoff over) to its start"
    );
    describe_histogram!(
        INSTANTIATION,
        Unit::Seconds,
        "Time to create a plugin instance for one attempt"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Tasks of each queue this host serves, by state, as the store counts them"
    );
    describe_gauge!(RUNNING, "Plugin instances running an attempt on this host");
    describe_counter!(
        FUEL,
        "Fuel burnt by attempts (about one unit per WebAssembly instruction); only with a budget"
    );
    describe_counter!(
        PLUGIN_LOADS,
        "Plugins loaded (at start-up and by reloads), by plugin and version (content hash prefix)"
    );
    describe_counter!(PLUGIN_LOAD_FAILURES, "Plugin files that failed to load");
    describe_gauge!(
        GPU_FREE,
        Unit::Bytes,
        "Free memory of each GPU at the latest reading"
    );
    describe_gauge!(GPU_TOTAL, Unit::Bytes, "Total memory of each GPU");
    describe_gauge!(
        GPU_UTILIZATION,
        "Share of the latest sample period during which each GPU ran a kernel (0 to 1)"
    );
    describe_gauge!(
        GPU_RESERVED,
        Unit::Bytes,
        "GPU memory this host promised to its running tasks"
    );
    describe_gauge!(
        GATE_WAITING,
        "Tasks of each queue that the GPU gate is holding back on this host"
    );
    describe_histogram!(
        GATE_WAIT,
        Unit::Seconds,
        "Time from a task's first refusal at the GPU gate to its admission"
    );
    describe_counter!(GATE_ADMITTED, "Tasks the GPU gate admitted, by queue");
}

/// Records a task of `queue` created through this host.
pub fn task_created(queue: &str) {
    metrics::counter!(TASKS_CREATED, "queue" => queue.to_owned()).increment(1);
}

/// Records an attempt of `queue` that ended with `outcome` (one of [`OUTCOMES`]) after
/// running `took`.
pub fn attempt_ended(queue: &str, outcome: &'static str, took: Duration) {
    metrics::counter!(ATTEMPTS, "queue" => queue.to_owned(), "outcome" => outcome).increment(1);
    metrics::histogram!(TASK_DURATION, "queue" => queue.to_owned()).record(took.as_secs_f64());
}

/// Records that a task of `queue` started `waited` after it became due.
pub fn queue_wait(queue: &str, waited: Duration) {
    metrics::histogram!(QUEUE_WAIT, "queue" => queue.to_owned()).record(waited.as_secs_f64());
}

/// Records how long an instance of `queue`'s plugin took to create.
pub fn instantiated(queue: &str, took: Duration) {
    metrics::histogram!(INSTANTIATION, "queue" => queue.to_owned()).record(took.as_secs_f64());
}

/// Records the number of tasks of `queue` in `state`.
pub fn queue_depth(queue: &str, state: &'static str, tasks: u64) {
    metrics::gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state).set(tasks as f64);
}

/// Records the number of running instances of `queue`'s plugin.
pub fn running(queue: &str, instances: usize) {
    metrics::gauge!(RUNNING, "queue" => queue.to_owned()).set(instances as f64);
}

/// Records fuel an attempt of `queue` burnt.
pub fn fuel_consumed(queue: &str, fuel: u64) {
    metrics::counter!(FUEL, "queue" => queue.to_owned()).increment(fuel);
}

/// Records a plugin that loaded.
pub fn plugin_loaded(plugin: &str, version: &str) {
    metrics::counter!(
        PLUGIN_LOADS,
        "plugin" => plugin.to_owned(),
        "version" => version.to_owned()
    )
    .increment(1);
}

/// Records a plugin file that failed to load.
pub fn plugin_load_failed() {
    metrics::counter!(PLUGIN_LOAD_FAILURES).increment(1);
}

/// Records one GPU's reading.
pub fn gpu_reading(gpu: &GpuReading) {
    let index = gpu.index.to_string();
    metrics::gauge!(GPU_FREE, "gpu" => index.clone()).set(gpu.free_bytes as f64);
    metrics::gauge!(GPU_TOTAL, "gpu" => index.clone()).set(gpu.total_bytes as f64);
    metrics::gauge!(GPU_UTILIZATION, "gpu" => index)
        .set(f64::from(gpu.utilization_percent) / 100.0);
}

/// Records the memory reserved on GPU `gpu`.
pub fn gpu_reserved(gpu: u32, bytes: u64) {
    metrics::gauge!(GPU_RESERVED, "gpu" => gpu.to_string()).set(bytes as f64);
}

/// Records how many tasks of `queue` the gate holds back.
pub fn gate_waiting(queue: &str, tasks: usize) {
    metrics::gauge!(GATE_WAITING, "queue" => queue.to_owned()).set(tasks as f64);
}

/// Records a task of `queue` admitted by the gate after waiting `waited` (zero when it was
/// admitted at once).
pub fn gate_admitted(queue: &str, waited: Duration) {
    metrics::counter!(GATE_ADMITTED, "queue" => queue.to_owned()).increment(1);
    metrics::histogram!(GATE_WAIT, "queue" => queue.to_owned()).record(waited.as_secs_f64());
}
