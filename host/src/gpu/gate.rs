//! Admission: one reading per interval, shared by every queue, minus what is promised.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::probe::{GpuProbe, GpuReading, NoGpu};
use super::{GpuRequirement, format_gib};
use crate::metrics;
use crate::store::now_ms;

/// Decides which GPU tasks may start on this host. Cheap to clone; clones share one state.
#[derive(Clone)]
pub struct GpuGate {
    inner: Arc<Inner>,
}

struct Inner {
    probe: Arc<dyn GpuProbe>,
    interval: Duration,
    state: Mutex<State>,
    /// Bumped after every reading and every released reservation: whenever a task that was
    /// refused might now fit.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// The latest reading; empty before the first, on a machine without GPUs, and after a
    /// failed reading (the gate is closed until a good one).
    readings: Vec<GpuReading>,
    /// When the latest reading was taken, in ms since the Unix epoch.
    read_at_ms: Option<u64>,
    /// Why the latest reading failed, if it did.
    error: Option<String>,
    /// Memory promised to running tasks, by GPU index.
    reserved: BTreeMap<u32, u64>,
    /// How many reservations are held.
    reservations: usize,
    /// Whether "no GPU" was logged already, so it is said once and not every second.
    told_no_gpu: bool,
}

/// The memory a running task was promised on one GPU. Dropping it gives the memory back,
/// whatever way the task ended.
pub struct Reservation {
    inner: Arc<Inner>,
    gpu: u32,
    bytes: u64,
}

impl Reservation {
    /// The GPU the task was admitted to.
    pub fn gpu(&self) -> u32 {
        self.gpu
    }

    /// The memory promised, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut state = self.inner.state.lock().expect("poisoned");
            let reserved = state.reserved.entry(self.gpu).or_default();
            *reserved = reserved.saturating_sub(self.bytes);
            let now_reserved = *reserved;
            state.reservations = state.reservations.saturating_sub(1);
            metrics::gpu_reserved(self.gpu, now_reserved);
        }
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("gpu", &self.gpu)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// The gate's state at one moment, as `rebound stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateSnapshot {
    /// What reads the GPUs.
    pub probe: String,
    /// The latest readings.
    pub gpus: Vec<GpuReading>,
    /// Memory promised to running tasks, by GPU index, in bytes.
    pub reserved_bytes: BTreeMap<u32, u64>,
    /// How many tasks hold a reservation.
    pub reservations: usize,
    /// When the readings were taken, in ms since the Unix epoch.
    pub read_at_ms: Option<u64>,
    /// Why the latest reading failed, if it did.
    pub error: Option<String>,
}

impl GpuGate {
    /// A gate reading `probe` every `interval`. It reads nothing until [`GpuGate::refresh`]
    /// or [`GpuGate::spawn_refresher`].
    pub fn new(probe: Arc<dyn GpuProbe>, interval: Duration) -> Self {
        let (changed, _) = watch::channel(0);
        GpuGate {
            inner: Arc::new(Inner {
                probe,
                interval,
                state: Mutex::default(),
                changed,
            }),
        }
    }

    /// A gate with no GPU behind it: tasks that need one wait.
    pub fn closed(reason: &str) -> Self {
        let probe = NoGpu {
            reason: reason.to_owned(),
        };
        GpuGate::new(Arc::new(probe), Duration::from_secs(1))
    }

    /// How often the probe is read.
    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// A receiver that changes after every reading and every released reservation.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Reads the probe once, on a blocking thread, and makes that the current reading.
    pub async fn refresh(&self) {
        let probe = self.inner.probe.clone();
        let reading = tokio::task::spawn_blocking(move || probe.read())
            .await
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("the GPU probe panicked: {panic}")));
        self.inner.apply(reading);
    }

    /// Reads the probe now and then every interval, until every clone of the gate is gone.
    pub fn spawn_refresher(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.interval;
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                GpuGate { inner }.refresh().await;
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// Admits a task that needs `requirement`, if a GPU fits it now: among the GPUs that
    /// do, the one with the most memory left after reservations (then the least busy, then
    /// the lowest index). The returned reservation holds the task's memory until dropped.
    pub fn admit(&self, requirement: &GpuRequirement) -> Option<Reservation> {
        let mut state = self.inner.state.lock().expect("poisoned");
        let chosen = state
            .readings
            .iter()
            .map(|gpu| {
                let reserved = state.reserved.get(&gpu.index).copied().unwrap_or(0);
                (gpu, gpu.free_bytes.saturating_sub(reserved))
            })
            .filter(|(gpu, available)| requirement.fits(*available, gpu.utilization_percent))
            .max_by(|(a, a_free), (b, b_free)| {
                a_free
                    .cmp(b_free)
                    .then(b.utilization_percent.cmp(&a.utilization_percent))
                    .then(b.index.cmp(&a.index))
            })
            .map(|(gpu, _)| gpu.index)?;
        let bytes = requirement.memory_bytes.unwrap_or(0);
        let reserved = state.reserved.entry(chosen).or_default();
        *reserved = reserved.saturating_add(bytes);
        let now_reserved = *reserved;
        state.reservations += 1;
        metrics::gpu_reserved(chosen, now_reserved);
        Some(Reservation {
            inner: self.inner.clone(),
            gpu: chosen,
            bytes,
        })
    }

    /// The gate's state now.
    pub fn snapshot(&self) -> GateSnapshot {
        let state = self.inner.state.lock().expect("poisoned");
        GateSnapshot {
            probe: self.inner.probe.describe(),
            gpus: state.readings.clone(),
            reserved_bytes: state.reserved.clone(),
            reservations: state.reservations,
            read_at_ms: state.read_at_ms,
            error: state.error.clone(),
        }
    }
}

impl Inner {
    /// Makes `reading` the current one, logging a change between "GPUs", "none" and
    /// "failing" once rather than at every interval.
    fn apply(&self, reading: anyhow::Result<Vec<GpuReading>>) {
        {
            let mut state = self.state.lock().expect("poisoned");
            state.read_at_ms = Some(now_ms());
            match reading {
                Ok(gpus) => {
                    if state.error.take().is_some() {
                        info!(gpus = gpus.len(), "GPU probe reads again");
                    }
                    if gpus.is_empty() && !state.told_no_gpu {
                        info!(
                            probe = %self.probe.describe(),
                            "no GPU present: tasks that need a GPU wait"
                        );
                    } else if state.readings.is_empty() && !gpus.is_empty() {
                        for gpu in &gpus {
                            info!(
                                gpu = gpu.index,
                                name = %gpu.name,
                                free_gib = %format_gib(gpu.free_bytes),
                                total_gib = %format_gib(gpu.total_bytes),
                                utilization = gpu.utilization_percent,
                                "GPU found"
                            );
                        }
                    }
                    state.told_no_gpu = gpus.is_empty();
                    for gpu in &gpus {
                        metrics::gpu_reading(gpu);
                    }
                    state.readings = gpus;
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    if state.error.is_none() {
                        warn!(
                            error = %message,
                            "GPU probe failed: tasks that need a GPU wait until it reads again"
                        );
                    }
                    state.error = Some(message);
                    state.readings.clear();
                }
            }
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::super::GIB;
    use super::*;

    /// A probe whose readings the test sets.
    struct Fixed(Mutex<anyhow::Result<Vec<GpuReading>>>);

    impl GpuProbe for Fixed {
        fn read(&self) -> anyhow::Result<Vec<GpuReading>> {
            match &*self.0.lock().unwrap() {
                Ok(gpus) => Ok(gpus.clone()),
                Err(err) => Err(anyhow::anyhow!("{err}")),
            }
        }

        fn describe(&self) -> String {
            "fixed".into()
        }
    }

    fn gpu(index: u32, free_gib: u64, utilization: u8) -> GpuReading {
        GpuReading {
            index,
            name: format!("test gpu {index}"),
            free_bytes: free_gib * GIB,
            total_bytes: 80 * GIB,
            utilization_percent: utilization,
        }
    }

    async fn gate_with(gpus: Vec<GpuReading>) -> (GpuGate, Arc<Fixed>) {
        let probe = Arc::new(Fixed(Mutex::new(Ok(gpus))));
        let gate = GpuGate::new(probe.clone(), Duration::from_secs(1));
        gate.refresh().await;
        (gate, probe)
    }

    fn needs(gib: f64) -> GpuRequirement {
        GpuRequirement::from_settings(Some(gib), None).unwrap()
    }

    #[tokio::test]
    async fn one_reading_admits_only_what_fits() {
        let (gate, _) = gate_with(vec![gpu(0, 10, 0)]).await;
        let first = gate.admit(&needs(4.0)).expect("4 of 10 GiB fits");
        let second = gate.admit(&needs(4.0)).expect("8 of 10 GiB fits");
        assert!(gate.admit(&needs(4.0)).is_none(), "12 of 10 GiB does not");
        assert_eq!(gate.snapshot().reserved_bytes[&0], 8 * GIB);

        drop(first);
        let third = gate.admit(&needs(4.0)).expect("a release makes room");
        assert_eq!(gate.snapshot().reservations, 2);
        drop((second, third));
        assert_eq!(gate.snapshot().reserved_bytes[&0], 0);
        assert_eq!(gate.snapshot().reservations, 0);
    }

    #[tokio::test]
    async fn the_gpu_with_most_room_is_chosen() {
        let (gate, _) = gate_with(vec![gpu(0, 2, 95), gpu(1, 40, 5)]).await;
        let admitted = gate.admit(&needs(1.0)).unwrap();
        assert_eq!(admitted.gpu(), 1);
        let busy = GpuRequirement::from_settings(None, Some(50.0)).unwrap();
        assert_eq!(gate.admit(&busy).unwrap().gpu(), 1);
    }

    #[tokio::test]
    async fn utilization_over_the_limit_admits_nothing_until_it_drops() {
        let (gate, probe) = gate_with(vec![gpu(0, 40, 90)]).await;
        let limit = GpuRequirement::from_settings(None, Some(50.0)).unwrap();
        assert!(gate.admit(&limit).is_none());

        *probe.0.lock().unwrap() = Ok(vec![gpu(0, 40, 10)]);
        let changed = gate.changed();
        gate.refresh().await;
        assert!(changed.has_changed().unwrap(), "a reading wakes waiters");
        assert!(gate.admit(&limit).is_some());
    }

    #[tokio::test]
    async fn no_gpu_or_a_failed_reading_closes_the_gate() {
        let (gate, probe) = gate_with(Vec::new()).await;
        assert!(gate.admit(&GpuRequirement::default()).is_none());

        *probe.0.lock().unwrap() = Ok(vec![gpu(0, 40, 0)]);
        gate.refresh().await;
        assert!(gate.admit(&GpuRequirement::default()).is_some());

        *probe.0.lock().unwrap() = Err(anyhow::anyhow!("GPU fell off the bus"));
        gate.refresh().await;
        assert!(gate.admit(&GpuRequirement::default()).is_none());
        let snapshot = gate.snapshot();
        assert!(snapshot.error.unwrap().contains("fell off the bus"));
        assert!(snapshot.gpus.is_empty());
    }
}
