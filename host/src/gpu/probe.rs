//! Reading the GPUs: free memory, total memory and utilization of each device.

use std::str::FromStr;

use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

/// One GPU as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReading {
    /// The device index, as CUDA and NVML number devices; it is what the plugin receives.
    pub index: u32,
    /// The device's model name, for humans.
    pub name: String,
    /// Memory no process has allocated, in bytes.
    pub free_bytes: u64,
    /// All the device's memory, in bytes.
    pub total_bytes: u64,
    /// Percent of the last sample period during which a kernel ran (0–100).
    pub utilization_percent: u8,
}

/// Reads every GPU of the machine. Called from a blocking thread once per gate interval, so
/// an implementation may block briefly.
pub trait GpuProbe: Send + Sync + 'static {
    /// Every GPU's current reading; an empty list when the machine has none.
    fn read(&self) -> anyhow::Result<Vec<GpuReading>>;

    /// What reads the GPUs, for logs and `rebound stats` ("nvml", "none").
    fn describe(&self) -> String;
}

/// Which probe a host uses: the `gpu_probe` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// No GPU is ever read: tasks that need one wait.
    None,
    /// The NVIDIA driver's NVML library, when it is installed.
    #[default]
    Nvml,
}

impl FromStr for ProbeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(ProbeKind::None),
            "nvml" => Ok(ProbeKind::Nvml),
            other => Err(format!(
                "unknown GPU probe `{other}`, expected `none` or `nvml`"
            )),
        }
    }
}

/// A machine without GPUs, or a host told not to look for them.
#[derive(Debug, Clone)]
pub struct NoGpu {
    /// Why there is no GPU, for `describe`.
    pub reason: String,
}

impl GpuProbe for NoGpu {
    fn read(&self) -> anyhow::Result<Vec<GpuReading>> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        format!("none ({})", self.reason)
    }
}

/// The NVIDIA driver, through NVML. The library is opened at run time, so the host's binary
/// does not depend on it.
pub struct NvmlProbe {
    nvml: Nvml,
}

impl NvmlProbe {
    /// Opens NVML. Fails (without panicking) where the driver is not installed.
    pub fn open() -> anyhow::Result<Self> {
        let nvml = Nvml::init().map_err(|err| anyhow::anyhow!("NVML is not available: {err}"))?;
        Ok(NvmlProbe { nvml })
    }
}

impl GpuProbe for NvmlProbe {
    fn read(&self) -> anyhow::Result<Vec<GpuReading>> {
        let count = self.nvml.device_count()?;
        let mut readings = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = self.nvml.device_by_index(index)?;
            let memory = device.memory_info()?;
            let utilization = device.utilization_rates()?;
            readings.push(GpuReading {
                index,
                name: device.name().unwrap_or_else(|_| "unknown".to_owned()),
                free_bytes: memory.free,
                total_bytes: memory.total,
                utilization_percent: u8::try_from(utilization.gpu.min(100)).unwrap_or(100),
            });
        }
        Ok(readings)
    }

    fn describe(&self) -> String {
        match self.nvml.sys_driver_version() {
            Ok(version) => format!("nvml (driver {version})"),
            Err(_) => "nvml".to_owned(),
        }
    }
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlProbe")
    }
}

/// The probe of kind `kind`. Where NVML cannot be opened this is [`NoGpu`], with the reason,
/// so a host without the driver still starts.
pub fn open_probe(kind: ProbeKind) -> Box<dyn GpuProbe> {
    match kind {
        ProbeKind::None => Box::new(NoGpu {
            reason: "gpu_probe is none".to_owned(),
        }),
        ProbeKind::Nvml => match NvmlProbe::open() {
            Ok(probe) => Box::new(probe),
            Err(err) => Box::new(NoGpu {
                reason: format!("{err:#}"),
            }),
        },
    }
}
