//! A GPU probe whose readings the test sets and changes while the host runs: the only way
//! to exercise the GPU gate on a machine without a GPU. It exists in this crate alone; a
//! host started from the command line reads NVML or nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rebound::gpu::{GIB, GpuGate, GpuProbe, GpuReading};

/// Readings set by the test.
#[derive(Default)]
pub struct ScriptedProbe {
    readings: Mutex<Vec<GpuReading>>,
}

impl ScriptedProbe {
    /// A probe that reads `gpus` until told otherwise, and a gate reading it every
    /// `interval`.
    pub fn gate(gpus: Vec<GpuReading>, interval: Duration) -> (Arc<ScriptedProbe>, GpuGate) {
        let probe = Arc::new(ScriptedProbe {
            readings: Mutex::new(gpus),
        });
        let gate = GpuGate::new(probe.clone(), interval);
        (probe, gate)
    }

    /// From now on, the probe reads `gpus`.
    pub fn set(&self, gpus: Vec<GpuReading>) {
        *self.readings.lock().expect("poisoned") = gpus;
    }
}

impl GpuProbe for ScriptedProbe {
    fn read(&self) -> anyhow::Result<Vec<GpuReading>> {
        Ok(self.readings.lock().expect("poisoned").clone())
    }

    fn describe(&self) -> String {
        "scripted (tests)".to_owned()
    }
}

/// A reading of GPU `index` with `free_gib` GiB free of 80, `utilization` percent busy.
pub fn gpu(index: u32, free_gib: f64, utilization: u8) -> GpuReading {
    GpuReading {
        index,
        name: format!("scripted GPU {index}"),
        free_bytes: (free_gib * GIB as f64) as u64,
        total_bytes: 80 * GIB,
        utilization_percent: utilization,
    }
}
