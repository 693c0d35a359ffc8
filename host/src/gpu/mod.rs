//! The GPU gate: tasks that need a GPU start only where one has the memory and idle capacity
//! they ask for.
//!
//! Three parts:
//!
//! - [`GpuRequirement`]: what a task needs, from its plugin's manifest and, field by field,
//!   from the task itself. A task with no requirement never touches the gate.
//! - [`GpuProbe`]: reads every GPU's free memory and utilization. [`NvmlProbe`] asks the
//!   NVIDIA driver through NVML, loaded at run time, so a host without the driver still runs
//!   (its gate stays closed for tasks that need a GPU). Tests plug in their own probe.
//! - [`GpuGate`]: one per host, shared by all queues. It reads the probe once per interval
//!   and admits a task only when some GPU still fits it after subtracting the memory already
//!   promised to this host's running GPU tasks. Each admission is a [`Reservation`] that gives
//!   the memory back when dropped, so a reading can never admit more tasks than fit.

mod gate;
mod probe;

pub use gate::{GateSnapshot, GpuGate, Reservation};
pub use probe::{GpuProbe, GpuReading, NoGpu, NvmlProbe, ProbeKind, open_probe};

use serde::{Deserialize, Serialize};

/// Bytes in one GiB: requirements are given in GiB (2^30 bytes), readings come in bytes.
pub const GIB: u64 = 1 << 30;

/// The largest memory requirement accepted, in GiB: far above any GPU, well inside `u64`.
pub const MAX_MEMORY_GIB: f64 = 1024.0 * 1024.0;

/// What a task needs of a GPU to start. Each field may be left open; a requirement with
/// both open still needs some GPU to be present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRequirement {
    /// Free memory the GPU must have, in bytes, beyond what this host already promised to
    /// its running tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The highest utilization, in percent (0–100), at which the GPU may take the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_utilization: Option<u8>,
}

impl GpuRequirement {
    /// A requirement from the settings' units: free memory in GiB (fractional allowed) and
    /// utilization in percent. Errors name the setting that is wrong.
    pub fn from_settings(
        min_gpu_memory_gb: Option<f64>,
        max_gpu_utilization: Option<f64>,
    ) -> Result<Self, String> {
        let memory_bytes = min_gpu_memory_gb.map(gib_to_bytes).transpose()?;
        let max_utilization = max_gpu_utilization
            .map(|percent| {
                if percent.is_finite() && (0.0..=100.0).contains(&percent) && percent.fract() == 0.0
                {
                    // In range and whole, so the cast is exact.
                    Ok(percent as u8)
                } else {
                    Err(format!(
                        "max_gpu_utilization {percent} is out of range: a whole percent from 0 to 100"
                    ))
                }
            })
            .transpose()?;
        Ok(GpuRequirement {
            memory_bytes,
            max_utilization,
        })
    }

    /// Whether neither field is set.
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.max_utilization.is_none()
    }

    /// This requirement with the fields it leaves open taken from `base`.
    pub fn over(self, base: GpuRequirement) -> GpuRequirement {
        GpuRequirement {
            memory_bytes: self.memory_bytes.or(base.memory_bytes),
            max_utilization: self.max_utilization.or(base.max_utilization),
        }
    }

    /// The requirement for a task: the task's own fields over its plugin's; `None` when
    /// neither asks for a GPU, and the task does not touch the gate.
    pub fn effective(
        task: Option<GpuRequirement>,
        plugin: Option<GpuRequirement>,
    ) -> Option<GpuRequirement> {
        let merged = match (task, plugin) {
            (Some(task), Some(plugin)) => task.over(plugin),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => return None,
        };
        Some(merged)
    }

    /// Whether a GPU with `available` bytes free (after reservations) and `utilization`
    /// percent busy can take the task. Exactly the required memory is enough.
    pub fn fits(&self, available: u64, utilization: u8) -> bool {
        self.memory_bytes.is_none_or(|needed| available >= needed)
            && self.max_utilization.is_none_or(|max| utilization <= max)
    }
}

impl std::fmt::Display for GpuRequirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.memory_bytes, self.max_utilization) {
            (None, None) => f.write_str("any GPU"),
            (Some(bytes), None) => write!(f, "{} GiB free", format_gib(bytes)),
            (None, Some(util)) => write!(f, "utilization at most {util}%"),
            (Some(bytes), Some(util)) => write!(
                f,
                "{} GiB free and utilization at most {util}%",
                format_gib(bytes)
            ),
        }
    }
}

/// GiB to bytes, rounded up so that a fractional requirement never asks for less than
/// given. Refuses negative, non-finite and absurdly large values, naming the setting.
pub fn gib_to_bytes(gib: f64) -> Result<u64, String> {
    if !gib.is_finite() || !(0.0..=MAX_MEMORY_GIB).contains(&gib) {
        return Err(format!(
            "min_gpu_memory_gb {gib} is out of range: from 0 to {MAX_MEMORY_GIB} GiB"
        ));
    }
    // At most 2^50 GiB-fractions of 2^30: below 2^51, exact in an f64 and in a u64.
    let bytes = (gib * GIB as f64).ceil() as u64;
    Ok(bytes)
}

/// Bytes as GiB with up to two decimals, for messages and `rebound stats`.
pub fn format_gib(bytes: u64) -> String {
    let gib = bytes as f64 / GIB as f64;
    let text = format!("{gib:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_converts_to_bytes_rounding_up() {
        let cases = [
            (0.0, 0),
            (1.0, GIB),
            (0.5, GIB / 2),
            (1.5, GIB + GIB / 2),
            (40.0, 40 * GIB),
            // 0.1 GiB is not a whole number of bytes: round up, never down.
            (0.1, 107_374_183),
        ];
        for (gib, bytes) in cases {
            assert_eq!(gib_to_bytes(gib), Ok(bytes), "{gib} GiB");
        }
    }

    #[test]
    fn bad_memory_values_name_the_setting() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, MAX_MEMORY_GIB * 2.0] {
            let err = gib_to_bytes(bad).unwrap_err();
            assert!(err.contains("min_gpu_memory_gb"), "{err}");
        }
    }

    #[test]
    fn utilization_must_be_a_whole_percent() {
        for bad in [-1.0, 101.0, 50.5, f64::NAN] {
            let err = GpuRequirement::from_settings(None, Some(bad)).unwrap_err();
            assert!(err.contains("max_gpu_utilization"), "{err}");
        }
        let req = GpuRequirement::from_settings(Some(2.5), Some(80.0)).unwrap();
        assert_eq!(req.memory_bytes, Some(2 * GIB + GIB / 2));
        assert_eq!(req.max_utilization, Some(80));
    }

    #[test]
    fn exactly_the_required_memory_fits_and_one_byte_less_does_not() {
        let req = GpuRequirement::from_settings(Some(4.0), None).unwrap();
        assert!(req.fits(4 * GIB, 100));
        assert!(!req.fits(4 * GIB - 1, 0));
        // A fractional requirement compares in bytes too.
        let half = GpuRequirement::from_settings(Some(0.5), None).unwrap();
        assert!(half.fits(GIB / 2, 0));
        assert!(!half.fits(GIB / 2 - 1, 0));
    }

    #[test]
    fn utilization_limit_is_inclusive() {
        let req = GpuRequirement::from_settings(None, Some(30.0)).unwrap();
        assert!(req.fits(0, 30));
        assert!(!req.fits(u64::MAX, 31));
    }

    #[test]
    fn a_task_overrides_its_plugin_field_by_field() {
        let plugin = GpuRequirement::from_settings(Some(8.0), Some(50.0)).unwrap();
        let task = GpuRequirement::from_settings(Some(2.0), None).unwrap();
        let merged = GpuRequirement::effective(Some(task), Some(plugin)).unwrap();
        assert_eq!(merged.memory_bytes, Some(2 * GIB));
        assert_eq!(merged.max_utilization, Some(50));
        assert_eq!(GpuRequirement::effective(None, None), None);
        assert_eq!(
            GpuRequirement::effective(None, Some(plugin)),
            Some(plugin),
            "a task without its own requirement takes its plugin's"
        );
    }

    #[test]
    fn requirements_read_as_text() {
        let req = GpuRequirement::from_settings(Some(1.5), Some(70.0)).unwrap();
        assert_eq!(req.to_string(), "1.5 GiB free and utilization at most 70%");
        assert_eq!(GpuRequirement::default().to_string(), "any GPU");
        assert_eq!(format_gib(10 * GIB), "10");
    }
}
