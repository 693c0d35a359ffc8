//! Plugin manifests: the optional `NAME.toml` beside `NAME.wasm`.
//!
//! A manifest says how the host is to run the plugin: which queue it serves, how its tasks
//! retry, the limits of its sandbox, how many of its attempts run at once, what its tasks
//! need of a GPU, and what it may reach beyond the host's own imports. Every key is
//! optional:
//!
//! ```toml
//! queue = "resize"            # the queue it serves; default: the file name
//! concurrency = 4             # attempts at once on this host; default: host.concurrency
//!
//! [retry]                     # for tasks submitted without a policy of their own
//! backoff = "exponential"     # fixed, linear, exponential
//! backoff_interval_ms = 500
//! max_retry_count = 5
//!
//! [limits]
//! exec_timeout_ms = 30000     # wall clock of one attempt
//! fuel = 5_000_000_000        # CPU budget of one attempt
//! memory_mb = 128             # all of an instance's memories together
//! max_output_kb = 1024        # the handler's result
//! max_log_kb = 1024           # what one attempt writes through the host's log
//! max_log_lines_per_s = 100   # sustained log rate (bursts of 10 s worth are fine)
//! max_progress_per_s = 20     # sustained progress-update rate (same bursts)
//!
//! [gpu]
//! min_gpu_memory_gb = 6.5     # free memory, in GiB (2^30 bytes); fractions allowed
//! max_gpu_utilization = 70    # start only while the GPU is at most this busy, in percent
//!
//! [capabilities]              # nothing is granted unless listed
//! env = ["MODEL_NAME"]        # environment variables copied from the host's
//! http = ["127.0.0.1:8000"]   # host:port pairs reachable through wasi:http
//! ```
//!
//! Precedence, key by key: the manifest over the host's configuration (`[limits]`,
//! `[retry]`, `host.concurrency`, `[plugins.NAME]`) over the built-in defaults.
//!
//! Unknown sections and keys are refused, so a misspelt key is an error at load time rather
//! than a setting silently ignored. Every error names the file and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::{Capabilities, SandboxLimits};
use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::settings::{MAX_CONCURRENCY, MAX_MEMORY_MB};
use crate::task::validate_queue_name;

/// A plugin's manifest, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    /// The queue the plugin serves, when not its file name.
    pub queue: Option<String>,
    /// Attempts of this plugin that may run at once on a host, when not the host's setting.
    pub concurrency: Option<usize>,
    /// The `[retry]` keys given, laid over the host's policy by [`Manifest::retry_policy`].
    retry: toml::Table,
    /// The `[limits]` keys given.
    limits: LimitsSection,
    /// What the plugin's tasks need of a GPU; `None` when they need none.
    pub gpu: Option<GpuRequirement>,
    /// What the plugin may reach besides the host's imports.
    pub capabilities: Capabilities,
    /// Things that load but should change (deprecated keys), to be logged.
    pub warnings: Vec<String>,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    queue: Option<String>,
    concurrency: Option<u64>,
    retry: Option<toml::Table>,
    limits: Option<LimitsSection>,
    gpu: Option<GpuSection>,
    capabilities: Option<CapabilitiesSection>,
}

/// `[limits]`: each key given replaces the host's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    exec_timeout_ms: Option<u64>,
    fuel: Option<u64>,
    memory_mb: Option<u64>,
    max_output_kb: Option<u64>,
    max_log_kb: Option<u64>,
    max_log_lines_per_s: Option<u32>,
    max_progress_per_s: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuSection {
    min_gpu_memory_gb: Option<f64>,
    max_gpu_utilization: Option<f64>,
    /// The replaced framework's name for `max_gpu_utilization`: despite "min", it meant
    /// "run only while utilization is at most this".
    min_gpu_utilization: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesSection {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    http: Vec<String>,
}

/// The manifest path for the plugin at `wasm`: the same name with `.toml`.
pub fn manifest_path(wasm: &Path) -> PathBuf {
    wasm.with_extension("toml")
}

impl Manifest {
    /// Reads the manifest beside the plugin at `wasm`; the default when there is none.
    pub fn for_plugin(wasm: &Path) -> anyhow::Result<Manifest> {
        let path = manifest_path(wasm);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Manifest::default());
            }
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot read manifest {}", path.display()));
            }
        };
        Manifest::parse(&text).with_context(|| format!("manifest {}", path.display()))
    }

    /// Parses and checks a manifest's text.
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let file: ManifestFile = toml::from_str(text).map_err(|err| anyhow!("{err}"))?;
        let mut manifest = Manifest::default();
        if let Some(queue) = file.queue {
            validate_queue_name(&queue).map_err(|err| anyhow!("queue: {err}"))?;
            manifest.queue = Some(queue);
        }
        if let Some(concurrency) = file.concurrency {
            if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
                bail!(
                    "concurrency = {concurrency} is out of range, expected 1 to {MAX_CONCURRENCY}"
                );
            }
            manifest.concurrency = Some(concurrency as usize);
        }
        if let Some(retry) = file.retry {
            manifest.retry = retry;
            // Checked against the defaults now, so a bad key fails at load, whatever the
            // host's policy turns out to be.
            manifest.retry_policy(&RetryPolicy::default())?;
        }
        if let Some(limits) = file.limits {
            limits.validate()?;
            manifest.limits = limits;
        }
        if let Some(gpu) = file.gpu {
            manifest.gpu = Some(gpu.requirement(&mut manifest.warnings)?);
        }
        if let Some(capabilities) = file.capabilities {
            manifest.capabilities = capabilities.validate()?;
        }
        Ok(manifest)
    }

    /// The retry policy of the plugin's queue: the manifest's `[retry]` keys over `host`.
    pub fn retry_policy(&self, host: &RetryPolicy) -> anyhow::Result<RetryPolicy> {
        if self.retry.is_empty() {
            return Ok(host.clone());
        }
        let mut merged = toml::Table::try_from(host).context("the host's retry policy")?;
        for (key, value) in &self.retry {
            merged.insert(key.clone(), value.clone());
        }
        let policy: RetryPolicy = merged
            .try_into()
            .map_err(|err: toml::de::Error| anyhow!("[retry] {}", err.message()))?;
        policy.validate().map_err(|err| anyhow!("[retry] {err}"))?;
        Ok(policy)
    }

    /// The sandbox limits of the plugin's attempts: the manifest's `[limits]` keys over
    /// `host`.
    pub fn sandbox_limits(&self, host: &SandboxLimits) -> anyhow::Result<SandboxLimits> {
        let given = &self.limits;
        let mut limits = host.clone();
        if let Some(ms) = given.exec_timeout_ms {
            limits.exec_timeout = Duration::from_millis(ms);
        }
        if let Some(fuel) = given.fuel {
            limits.fuel = Some(fuel);
        }
        if let Some(mb) = given.memory_mb {
            let bytes = usize::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
            if host.pool.is_some() && bytes > host.memory_bytes {
                bail!(
                    "[limits] memory_mb = {mb} is over the host's pooled instance size of {} \
                     MiB; raise the host's limits.memory_mb, or set limits.pooling = false",
                    host.memory_bytes / (1024 * 1024)
                );
            }
            limits.memory_bytes = bytes;
        }
        let kib = |kb: u64| usize::try_from(kb.saturating_mul(1024)).unwrap_or(usize::MAX);
        if let Some(kb) = given.max_output_kb {
            limits.boundary.output_bytes = kib(kb);
        }
        if let Some(kb) = given.max_log_kb {
            limits.boundary.log_bytes = kib(kb);
        }
        if let Some(rate) = given.max_log_lines_per_s {
            limits.boundary.log_lines_per_s = rate;
        }
        if let Some(rate) = given.max_progress_per_s {
            limits.boundary.progress_per_s = rate;
        }
        Ok(limits)
    }
}

impl LimitsSection {
    fn validate(&self) -> anyhow::Result<()> {
        let ranges: [(&str, Option<u64>, u64, u64); 7] = [
            ("exec_timeout_ms", self.exec_timeout_ms, 1, 24 * 3_600_000),
            ("fuel", self.fuel, 1, u64::MAX),
            ("memory_mb", self.memory_mb, 1, MAX_MEMORY_MB),
            ("max_output_kb", self.max_output_kb, 1, 1 << 20),
            ("max_log_kb", self.max_log_kb, 1, 1 << 20),
            (
                "max_log_lines_per_s",
                self.max_log_lines_per_s.map(u64::from),
                1,
                1_000_000,
            ),
            (
                "max_progress_per_s",
                self.max_progress_per_s.map(u64::from),
                1,
                1_000_000,
            ),
        ];
        for (key, value, min, max) in ranges {
            if let Some(value) = value
                && !(min..=max).contains(&value)
            {
                bail!("[limits] {key} = {value} is out of range, expected {min} to {max}");
            }
        }
        Ok(())
    }
}

impl GpuSection {
    fn requirement(self, warnings: &mut Vec<String>) -> anyhow::Result<GpuRequirement> {
        let utilization = match (self.max_gpu_utilization, self.min_gpu_utilization) {
            (Some(_), Some(_)) => bail!(
                "[gpu] sets both max_gpu_utilization and its deprecated alias \
                 min_gpu_utilization; keep max_gpu_utilization"
            ),
            (None, Some(old)) => {
                warnings.push(
                    "[gpu] min_gpu_utilization is deprecated: it means \"start only while \
                     utilization is at most this\"; name it max_gpu_utilization"
                        .to_owned(),
                );
                Some(old)
            }
            (max, None) => max,
        };
        GpuRequirement::from_settings(self.min_gpu_memory_gb, utilization)
            .map_err(|err| anyhow!("[gpu] {err}"))
    }
}

impl CapabilitiesSection {
    fn validate(self) -> anyhow::Result<Capabilities> {
        for name in &self.env {
            let valid = !name.is_empty() && !name.contains('=') && !name.contains('\0');
            if !valid {
                bail!("[capabilities] env: `{name}` is not an environment variable name");
            }
        }
        let mut http = Vec::with_capacity(self.http.len());
        for entry in &self.http {
            http.push(parse_authority(entry).map_err(|why| {
                anyhow!("[capabilities] http: `{entry}` is not host:port ({why})")
            })?);
        }
        Ok(Capabilities {
            env: self.env,
            http,
        })
    }
}

/// `host:port`, lowercased, as an HTTP request's authority is compared with it.
fn parse_authority(entry: &str) -> Result<String, &'static str> {
    if entry.contains("://") || entry.contains('/') {
        return Err("a URL: give only its host and port, say `models.internal:443`");
    }
    let (host, port) = match entry.strip_prefix('[') {
        Some(rest) => {
            let (address, after) = rest.split_once(']').ok_or("an unclosed `[`")?;
            let port = after.strip_prefix(':').ok_or("no port")?;
            if address.is_empty() {
                return Err("no host name");
            }
            (format!("[{address}]"), port)
        }
        None => {
            let (host, port) = entry.rsplit_once(':').ok_or("no port")?;
            if host.contains(':') {
                return Err(
                    "more than one `:`; an IPv6 address goes in brackets, say `[::1]:8080`",
                );
            }
            (host.to_owned(), port)
        }
    };
    if host.is_empty() || host.contains('@') || host.chars().any(char::is_whitespace) {
        return Err("no host name");
    }
    if host.contains('*') {
        return Err("wildcards are not supported: list each host");
    }
    // Digits only, no leading zero: the grant must read as requests' ports do.
    let plain =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
    match port.parse::<u16>() {
        Ok(_) if plain => {}
        _ => return Err("the port is not 1 to 65535, written plainly"),
    }
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Strategy;
    use crate::gpu::GIB;

    #[test]
    fn gpu_requirement_reads_in_gib_and_percent() {
        let manifest =
            Manifest::parse("[gpu]\nmin_gpu_memory_gb = 6.5\nmax_gpu_utilization = 70\n").unwrap();
        let gpu = manifest.gpu.unwrap();
        assert_eq!(gpu.memory_bytes, Some(6 * GIB + GIB / 2));
        assert_eq!(gpu.max_utilization, Some(70));
        assert!(manifest.warnings.is_empty());
    }

    #[test]
    fn an_empty_manifest_asks_for_nothing() {
        let manifest = Manifest::parse("").unwrap();
        assert_eq!(manifest, Manifest::default());
        let host = SandboxLimits::default();
        assert_eq!(manifest.sandbox_limits(&host).unwrap(), host);
        assert_eq!(
            manifest.retry_policy(&RetryPolicy::default()).unwrap(),
            RetryPolicy::default()
        );
        // An empty [gpu] section still asks for a GPU, of any kind.
        assert_eq!(
            Manifest::parse("[gpu]\n").unwrap().gpu,
            Some(GpuRequirement::default())
        );
    }

    #[test]
    fn manifest_keys_win_over_the_host_key_by_key() {
        let manifest = Manifest::parse(
            "queue = \"resize\"\nconcurrency = 2\n\
             [retry]\nbackoff = \"fixed\"\nmax_retry_count = 9\n\
             [limits]\nexec_timeout_ms = 1500\nfuel = 1000\nmax_output_kb = 4\n\
             max_log_lines_per_s = 7\n",
        )
        .unwrap();
        assert_eq!(manifest.queue.as_deref(), Some("resize"));
        assert_eq!(manifest.concurrency, Some(2));

        let host_policy = RetryPolicy {
            backoff_interval_ms: 250,
            ..RetryPolicy::default()
        };
        let policy = manifest.retry_policy(&host_policy).unwrap();
        assert_eq!(policy.backoff, Strategy::Fixed);
        assert_eq!(policy.max_retry_count, 9);
        // Not in the manifest: the host's value stays.
        assert_eq!(policy.backoff_interval_ms, 250);

        let host = SandboxLimits {
            memory_bytes: 64 << 20,
            ..SandboxLimits::default()
        };
        let limits = manifest.sandbox_limits(&host).unwrap();
        assert_eq!(limits.exec_timeout, Duration::from_millis(1500));
        assert_eq!(limits.fuel, Some(1000));
        assert_eq!(limits.memory_bytes, 64 << 20);
        assert_eq!(limits.boundary.output_bytes, 4096);
        assert_eq!(limits.boundary.log_lines_per_s, 7);
        assert_eq!(limits.boundary.log_bytes, host.boundary.log_bytes);
    }

    #[test]
    fn a_pooled_host_refuses_a_memory_cap_over_its_slots() {
        let manifest = Manifest::parse("[limits]\nmemory_mb = 512\n").unwrap();
        let pooled = SandboxLimits {
            memory_bytes: 256 << 20,
            pool: Some(8),
            ..SandboxLimits::default()
        };
        let err = manifest.sandbox_limits(&pooled).unwrap_err().to_string();
        assert!(
            err.contains("memory_mb") && err.contains("256 MiB"),
            "{err}"
        );
        let unpooled = SandboxLimits {
            pool: None,
            ..pooled
        };
        assert_eq!(
            manifest.sandbox_limits(&unpooled).unwrap().memory_bytes,
            512 << 20
        );
    }

    #[test]
    fn capabilities_are_listed_names_and_host_port_pairs() {
        let manifest = Manifest::parse(
            "[capabilities]\nenv = [\"MODEL\"]\nhttp = [\"Models.Internal:8000\", \"[::1]:80\"]\n",
        )
        .unwrap();
        assert_eq!(manifest.capabilities.env, ["MODEL"]);
        assert_eq!(
            manifest.capabilities.http,
            ["models.internal:8000", "[::1]:80"]
        );
        assert_eq!(Manifest::default().capabilities, Capabilities::default());
    }

    #[test]
    fn the_old_name_is_accepted_with_a_warning() {
        let manifest = Manifest::parse("[gpu]\nmin_gpu_utilization = 40\n").unwrap();
        assert_eq!(manifest.gpu.unwrap().max_utilization, Some(40));
        assert!(
            manifest.warnings[0].contains("deprecated"),
            "{:?}",
            manifest.warnings
        );

        let err = Manifest::parse("[gpu]\nmin_gpu_utilization = 40\nmax_gpu_utilization = 40\n")
            .unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[gpu]\nmin_gpu_memory = 4\n", "min_gpu_memory"),
            ("[gpus]\n", "gpus"),
            ("[gpu]\nmin_gpu_memory_gb = -2\n", "min_gpu_memory_gb"),
            ("[gpu]\nmax_gpu_utilization = 250\n", "max_gpu_utilization"),
            ("[gpu]\nmin_gpu_memory_gb = \"four\"\n", "min_gpu_memory_gb"),
            ("queue = \"no spaces\"\n", "queue"),
            ("concurrency = 0\n", "concurrency"),
            ("[retry]\nbackof = \"fixed\"\n", "backof"),
            ("[retry]\nbackoff = \"sideways\"\n", "sideways"),
            ("[retry]\nbackoff_multiplier = 0.5\n", "backoff_multiplier"),
            ("[limits]\nexec_timeout_ms = 0\n", "exec_timeout_ms"),
            ("[limits]\nmemory = 5\n", "memory"),
            ("[limits]\nfuel = -1\n", "fuel"),
            ("[limits]\nmax_progress_per_s = 0\n", "max_progress_per_s"),
            ("[capabilities]\nenv = [\"A=B\"]\n", "env"),
            ("[capabilities]\nhttp = [\"example.com\"]\n", "example.com"),
            ("[capabilities]\nhttp = [\"example.com:http\"]\n", "http"),
            ("[capabilities]\nhttp = [\"example.com:0\"]\n", "1 to 65535"),
            (
                "[capabilities]\nhttp = [\"127.0.0.1:018080\"]\n",
                "1 to 65535",
            ),
            (
                "[capabilities]\nhttp = [\"example.com:+80\"]\n",
                "1 to 65535",
            ),
            (
                "[capabilities]\nhttp = [\"*.example.com:443\"]\n",
                "wildcards",
            ),
            ("[capabilities]\nhttp = [\"[::1]\"]\n", "no port"),
            (
                "[capabilities]\nhttp = [\"1.2.3.4:80:90\"]\n",
                "more than one",
            ),
            (
                "[capabilities]\nhttp = [\"exa mple.com:80\"]\n",
                "no host name",
            ),
            ("[capabilities]\nhttp = [\"::1:8080\"]\n", "brackets"),
            (
                "[capabilities]\nhttp = [\"http://example.com/\"]\n",
                "a URL",
            ),
            ("[capabilities]\nfiles = [\"/etc\"]\n", "files"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", Manifest::parse(text).unwrap_err());
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_manifest_file_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("model.wasm");
        assert_eq!(Manifest::for_plugin(&wasm).unwrap(), Manifest::default());
        std::fs::write(manifest_path(&wasm), "[gpu]\nmax_gpu_utilization = 101\n").unwrap();
        let err = format!("{:#}", Manifest::for_plugin(&wasm).unwrap_err());
        assert!(err.contains("model.toml"), "{err}");
    }
}
