//! Settings of a running host: how it claims tasks, how long they may run, how they retry.
//!
//! Every field documents its default, its unit, and what zero means. The command line
//! (`rebound run --help`) sets them; values that make no sense are refused by
//! [`HostConfig::validate`] with the name of the setting.

use std::time::Duration;

use crate::backoff::RetryPolicy;
use crate::gpu::ProbeKind;
use crate::runtime::SandboxLimits;

/// Everything `rebound run` needs besides the store and the plugin directory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// Limits of every attempt's sandbox (timeout, fuel, memory).
    pub limits: SandboxLimits,
    /// Retry policy for tasks submitted without one.
    pub retry: RetryPolicy,
    /// Attempts that may run at once, per queue. Default 8; must be at least 1.
    pub concurrency: usize,
    /// Most tasks claimed in one round trip to the store. Default 16; at least 1.
    pub batch_size: usize,
    /// How long an idle queue waits before asking the store again. Default 50 ms.
    pub poll_interval: Duration,
    /// How long running attempts may go on after a shutdown was asked for, before they are
    /// interrupted. Default 30 s; zero interrupts them at once.
    pub shutdown_grace: Duration,
    /// How long a lease lasts without renewal. A host renews the leases of its running
    /// tasks every third of this; when a host dies, its tasks are taken back by any host
    /// once this much time has passed. Default 30 s; at least 100 ms.
    pub lease: Duration,
    /// How many times a task may lose its lease (its host died or stalled) before it is
    /// failed instead of being run again. Default 3.
    pub max_lease_losses: u32,
    /// How long finished tasks (completed, failed, canceled) are kept before they are
    /// deleted. Default 7 days; zero deletes them at the next clean-up (about every lease
    /// renewal period).
    pub retention: Duration,
    /// What reads the GPUs for the GPU gate: `nvml` (the NVIDIA driver, when installed) or
    /// `none`. Default `nvml`; without the driver the host runs and GPU tasks wait.
    pub gpu_probe: ProbeKind,
    /// How often the GPU gate reads the GPUs, and so how soon a held-back task is tried
    /// again. Default 1 s; at least 10 ms.
    pub gpu_interval: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            limits: SandboxLimits::default(),
            retry: RetryPolicy::default(),
            concurrency: 8,
            batch_size: 16,
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            max_lease_losses: 3,
            retention: Duration::from_secs(7 * 24 * 60 * 60),
            gpu_probe: ProbeKind::Nvml,
            gpu_interval: Duration::from_secs(1),
        }
    }
}

impl HostConfig {
    /// Refuses settings the host cannot run with, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if self.limits.exec_timeout.is_zero() {
            return Err("exec_timeout must be more than zero".into());
        }
        if self.limits.fuel == Some(0) {
            return Err("fuel must be more than zero (leave it unset for no budget)".into());
        }
        if self.limits.memory_bytes < 64 * 1024 {
            return Err("memory limit must be at least 64 KiB (one WebAssembly page)".into());
        }
        if self.lease < Duration::from_millis(100) {
            return Err("lease must be at least 100 ms".into());
        }
        if self.gpu_interval < Duration::from_millis(10) {
            return Err("gpu_interval must be at least 10 ms".into());
        }
        self.retry.validate()
    }

    /// How often a host renews its leases and looks for expired ones: a third of the lease,
    /// so that two renewals can be lost before a lease runs out.
    pub fn lease_renewal(&self) -> Duration {
        self.lease / 3
    }
}
