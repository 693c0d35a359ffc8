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

const GPU_FREE: &str = "rebound_gpu_free_memory_bytes";
const GPU_TOTAL: &str = "rebound_gpu_total_memory_bytes";
const GPU_UTILIZATION: &str = "rebound_gpu_utilization_ratio";
const GPU_RESERVED: &str = "rebound_gpu_reserved_memory_bytes";
const GATE_WAITING: &str = "rebound_gate_waiting_tasks";
const GATE_WAIT: &str = "rebound_gate_wait_seconds";
const GATE_ADMITTED: &str = "rebound_gate_admitted_tasks_total";

/// Histogram buckets for waits, in seconds: from 10 ms to 30 minutes.
const WAIT_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 1800.0,
];

/// Installs the Prometheus recorder for this process and describes every metric. Call once;
/// the handle renders the text format for `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(GATE_WAIT.to_owned()), &WAIT_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
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
