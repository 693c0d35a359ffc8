//! Layered configuration: defaults, then a TOML file, then `REBOUND_*` environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! The file is `--config FILE` (or `REBOUND_CONFIG`), else `rebound.toml` in the working
//! directory when there is one. Every setting has a key in the file; in the environment the
//! same key is `REBOUND_` + the key in capitals with `__` between section and name
//! (`host.concurrency` is `REBOUND_HOST__CONCURRENCY`). A few short names are kept for the
//! settings people set most: `REBOUND_REDIS_URL`, `REBOUND_REDIS_CA`, `REBOUND_DATA`,
//! `REBOUND_HTTP`, `REBOUND_HTTP_TOKEN`, `REBOUND_GPU_PROBE`.
//!
//! Unknown keys and badly typed or out-of-range values stop the command before it does
//! anything, with the key and the layer it came from. The replaced Python framework's
//! sections (`storage`, `task`, `threadpool`, `scheduler`) are read where they map onto a
//! setting here, with a warning naming the new key; a new key given too wins.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::backoff::{RetryPolicy, Strategy};
use crate::config::HostConfig;
use crate::gpu::{GpuRequirement, ProbeKind};
use crate::runtime::{BoundaryLimits, SandboxLimits};
use crate::store::redis::mask_url_password;

/// The file read when no `--config` is given, if it exists in the working directory.
pub const DEFAULT_FILE: &str = "rebound.toml";

/// The most attempts one queue may run at once.
pub const MAX_CONCURRENCY: u64 = 10_000;
/// The most tasks one claim may take.
pub const MAX_BATCH: u64 = 1_000;
/// The largest memory cap of an instance, in MiB (1 TiB).
pub const MAX_MEMORY_MB: u64 = 1 << 20;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Every setting, as the file spells it. See the module docs for the layers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where tasks are stored.
    pub store: StoreSettings,
    /// How a host claims and runs tasks.
    pub host: HostSettings,
    /// Limits of every attempt's sandbox.
    pub limits: LimitSettings,
    /// Retry policy of tasks submitted without one.
    pub retry: RetryPolicy,
    /// The GPU gate.
    pub gpu: GpuSettings,
    /// The host's HTTP endpoint.
    pub http: HttpSettings,
    /// Logging.
    pub log: LogSettings,
    /// The compiled-plugin cache.
    pub cache: CacheSettings,
    /// Per-plugin settings, by plugin name: `[plugins.NAME]`. A plugin's own manifest wins
    /// over these.
    pub plugins: BTreeMap<String, PluginSettings>,

    /// The replaced framework's `storage` section.
    #[serde(skip_serializing)]
    pub storage: Option<LegacyStorage>,
    /// The replaced framework's `task` section.
    #[serde(skip_serializing)]
    pub task: Option<LegacyTask>,
    /// The replaced framework's `threadpool` section.
    #[serde(skip_serializing)]
    pub threadpool: Option<LegacyThreadPool>,
    /// The replaced framework's `scheduler` section.
    #[serde(skip_serializing)]
    pub scheduler: Option<LegacyScheduler>,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Redis URL; without it, the embedded store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// PEM file of the certificate authorities for a `rediss://` URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca: Option<PathBuf>,
    /// The embedded store's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
}

/// `[host]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSettings {
    /// The plugin directory of `rebound run`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins: Option<PathBuf>,
    /// Attempts running at once, per queue.
    pub concurrency: usize,
    /// Most tasks claimed per round trip to the store.
    pub batch_size: usize,
    /// How long an idle queue waits before polling the store again, in ms.
    pub poll_interval_ms: u64,
    /// How long running tasks may finish after a shutdown request, in ms.
    pub shutdown_grace_ms: u64,
    /// Lease length, in ms.
    pub lease_ms: u64,
    /// Lease losses after which a task is failed rather than run again.
    pub max_lease_losses: u32,
    /// How long finished tasks are kept, in seconds.
    pub retention_s: u64,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Wall-clock limit of one attempt, in ms.
    pub exec_timeout_ms: u64,
    /// Fuel budget of one attempt; no budget when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Memory cap of one instance, in MiB.
    pub memory_mb: u64,
    /// Reuse instance slots (memories, tables, stacks) from a pool sized by the plugins'
    /// concurrencies, instead of mapping fresh memory for every attempt.
    pub pooling: bool,
    /// Largest result of one attempt, in KiB.
    pub max_output_kb: u64,
    /// Most one attempt may write through the host's log, in KiB.
    pub max_log_kb: u64,
    /// Sustained log lines per second of one attempt (bursts of 10 s worth pass).
    pub max_log_lines_per_s: u32,
    /// Sustained progress updates per second of one attempt (bursts of 10 s worth pass).
    pub max_progress_per_s: u32,
}

/// `[gpu]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSettings {
    /// What reads the GPUs: `nvml` or `none`.
    pub probe: ProbeKind,
    /// How often the gate reads the GPUs, in ms.
    pub interval_ms: u64,
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Where `rebound run` serves its HTTP API and `/metrics`; not served when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// A bearer token the API's `/v1` routes require; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,rebound::scheduler=debug`; `RUST_LOG` wins.
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// `[cache]`: where compiled plugins are kept, so a restart does not compile them again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Whether to cache at all.
    pub enabled: bool,
    /// The directory; `$XDG_CACHE_HOME/rebound/plugins` (else `~/.cache/rebound/plugins`)
    /// when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: true,
            dir: None,
        }
    }
}

impl CacheSettings {
    /// The cache directory to use, if caching is on and a directory can be found.
    pub fn directory(&self) -> Option<PathBuf> {
        if !self.enabled {
            return None;
        }
        if let Some(dir) = &self.dir {
            return Some(dir.clone());
        }
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache")
            }
        };
        Some(base.join("rebound").join("plugins"))
    }
}

/// `[plugins.NAME]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Free GPU memory the plugin's tasks need, in GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_gpu_memory_gb: Option<f64>,
    /// Highest GPU utilization, in percent, at which its tasks start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpu_utilization: Option<f64>,
    /// The replaced framework's name for `max_gpu_utilization` (it meant "at most").
    #[serde(skip_serializing)]
    pub min_gpu_utilization: Option<f64>,
}

impl PluginSettings {
    /// The requirement these settings give, `None` when they give none.
    pub fn requirement(&self) -> Result<Option<GpuRequirement>, String> {
        let utilization = match (self.max_gpu_utilization, self.min_gpu_utilization) {
            (Some(_), Some(_)) => {
                return Err("sets both max_gpu_utilization and its deprecated alias \
                            min_gpu_utilization; keep max_gpu_utilization"
                    .to_owned());
            }
            (max, old) => max.or(old),
        };
        if self.min_gpu_memory_gb.is_none() && utilization.is_none() {
            return Ok(None);
        }
        GpuRequirement::from_settings(self.min_gpu_memory_gb, utilization).map(Some)
    }
}

/// The old framework's `storage`: a Redis server by parts.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyStorage {
    #[serde(rename = "type")]
    kind: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: Option<u32>,
    username: Option<String>,
    password: Option<String>,
    charset: Option<String>,
}

/// The old framework's `task`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyTask {
    biz_prefix: Option<String>,
    batch_size: Option<usize>,
    max_retry_count: Option<u32>,
    backoff_strategy: Option<Strategy>,
    /// Seconds (fractions allowed).
    backoff_interval: Option<f64>,
    backoff_multiplier: Option<f64>,
    min_gpu_memory_gb: Option<f64>,
    min_gpu_utilization: Option<f64>,
}

/// The old framework's `threadpool`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyThreadPool {
    concurrency: Option<usize>,
    proc_mode: Option<String>,
    /// Seconds (fractions allowed).
    exec_timeout: Option<f64>,
}

/// The old framework's `scheduler`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyScheduler {
    /// Seconds (fractions allowed).
    interval: Option<f64>,
}

impl Default for HostSettings {
    fn default() -> Self {
        let host = HostConfig::default();
        HostSettings {
            plugins: None,
            concurrency: host.concurrency,
            batch_size: host.batch_size,
            poll_interval_ms: millis(host.poll_interval),
            shutdown_grace_ms: millis(host.shutdown_grace),
            lease_ms: millis(host.lease),
            max_lease_losses: host.max_lease_losses,
            retention_s: host.retention.as_secs(),
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        let limits = SandboxLimits::default();
        LimitSettings {
            exec_timeout_ms: millis(limits.exec_timeout),
            fuel: limits.fuel,
            memory_mb: (limits.memory_bytes / (1024 * 1024)) as u64,
            pooling: true,
            max_output_kb: (limits.boundary.output_bytes / 1024) as u64,
            max_log_kb: (limits.boundary.log_bytes / 1024) as u64,
            max_log_lines_per_s: limits.boundary.log_lines_per_s,
            max_progress_per_s: limits.boundary.progress_per_s,
        }
    }
}

impl Default for GpuSettings {
    fn default() -> Self {
        let host = HostConfig::default();
        GpuSettings {
            probe: host.gpu_probe,
            interval_ms: millis(host.gpu_interval),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Settings as loaded, with where each came from.
#[derive(Debug)]
pub struct Loaded {
    /// The merged settings, legacy sections already applied.
    pub settings: Settings,
    /// Things to tell the operator once logging is up (deprecated names).
    pub warnings: Vec<String>,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    figment: Figment,
}

/// A provider that names its layer in error messages.
struct Named<P> {
    name: &'static str,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        self.inner.data()
    }
}

/// Environment variables kept under a short name, and the key each sets.
const ENV_SHORT_NAMES: [(&str, &str); 6] = [
    ("redis_url", "store.redis_url"),
    ("redis_ca", "store.redis_ca"),
    ("data", "store.data"),
    ("http", "http.listen"),
    ("http_token", "http.token"),
    ("gpu_probe", "gpu.probe"),
];

/// The `REBOUND_*` environment layer. `REBOUND_CONFIG` names the file and is not a setting.
pub fn environment() -> Env {
    Env::prefixed("REBOUND_").ignore(&["config"]).map(|key| {
        let lower = key.as_str().to_ascii_lowercase();
        match ENV_SHORT_NAMES.iter().find(|(short, _)| *short == lower) {
            Some((_, full)) => (*full).into(),
            None => lower.replace("__", ".").into(),
        }
    })
}

impl Loaded {
    /// Loads the layers: defaults, the file (`file`, else [`DEFAULT_FILE`] if present), the
    /// environment, then `flags` (a nested map of the flags given on the command line).
    pub fn load(file: Option<&Path>, flags: serde_json::Value) -> anyhow::Result<Loaded> {
        Loaded::load_with(file, environment(), flags)
    }

    /// [`Loaded::load`] with an explicit environment layer (for tests).
    pub fn load_with(
        file: Option<&Path>,
        env: Env,
        flags: serde_json::Value,
    ) -> anyhow::Result<Loaded> {
        let file = match file {
            Some(path) if !path.exists() => {
                anyhow::bail!("config file {} does not exist", path.display())
            }
            Some(path) => Some(path.to_owned()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|path| path.exists()),
        };
        let mut figment = Figment::new().merge(Named {
            name: "defaults",
            inner: Serialized::defaults(Settings::default()),
        });
        if let Some(path) = &file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env).merge(Named {
            name: "command-line flags",
            inner: Serialized::defaults(flags),
        });

        let mut settings: Settings = figment.extract().map_err(describe_errors)?;
        let mut loaded = Loaded {
            settings: Settings::default(),
            warnings: Vec::new(),
            file,
            figment,
        };
        loaded.apply_legacy(&mut settings)?;
        // Both stores named: the one set by the higher layer wins, so `--data` on the
        // command line is obeyed even when the file names a Redis server.
        if settings.store.data.is_some()
            && settings.store.redis_url.is_some()
            && loaded.rank("store.data") > loaded.rank("store.redis_url")
        {
            loaded.warnings.push(format!(
                "store.data (from {}) is over store.redis_url (from {}): using the embedded store",
                loaded.source_of("store.data"),
                loaded.source_of("store.redis_url")
            ));
            settings.store.redis_url = None;
        }
        if settings.http.token.is_some() && settings.http.listen.is_none() {
            loaded.warnings.push(
                "http.token is set but http.listen is not: the HTTP API is off (set http.listen \
                 or --http ADDR to serve it)"
                    .to_owned(),
            );
        }
        loaded.settings = settings;
        loaded.validate()?;
        Ok(loaded)
    }

    /// Where the value of `key` (e.g. `host.concurrency`) came from, in words.
    pub fn source_of(&self, key: &str) -> String {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        match self.figment.find_metadata(key) {
            Some(meta) => layer_name(meta, &path),
            None => "defaults".to_owned(),
        }
    }

    /// The layer `key` came from: 0 defaults (or unset), 1 the file, 2 the environment,
    /// 3 the command line.
    fn rank(&self, key: &str) -> u8 {
        match self.figment.find_metadata(key) {
            None => 0,
            Some(meta) if meta.name == "defaults" => 0,
            Some(meta) if meta.name == "command-line flags" => 3,
            Some(meta) if meta.name.contains("environment") => 2,
            Some(_) => 1,
        }
    }

    /// Whether `key` was set by a layer above the defaults.
    fn is_set(&self, key: &str) -> bool {
        self.figment
            .find_metadata(key)
            .is_some_and(|meta| meta.name != "defaults")
    }

    /// An error about `key`, naming where its value came from.
    fn bad(&self, key: &str, problem: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!(
            "invalid setting `{key}` (from {}): {problem}",
            self.source_of(key)
        )
    }

    /// Moves the old framework's settings onto the new keys that were not set themselves.
    fn apply_legacy(&mut self, settings: &mut Settings) -> anyhow::Result<()> {
        let moved = |old: &str, new: &str, warnings: &mut Vec<String>| -> bool {
            if self.is_set(new) {
                warnings.push(format!("`{old}` is ignored: `{new}` is set too"));
                false
            } else {
                warnings.push(format!("`{old}` is the old framework's name; use `{new}`"));
                true
            }
        };
        let mut warnings = Vec::new();
        if let Some(storage) = settings.storage.take() {
            match storage.kind.as_deref() {
                None | Some("redis") => {}
                Some(other) => {
                    return Err(self.bad(
                        "storage.type",
                        format!("`{other}` is not supported: Rebound stores tasks in Redis or its embedded store"),
                    ));
                }
            }
            if storage.charset.is_some() {
                warnings.push("`storage.charset` is ignored: it applied to MySQL".to_owned());
            }
            if let Some(host) = storage.host
                && moved("storage.host", "store.redis_url", &mut warnings)
            {
                // Percent-encoded, so a password with `@`, `:` or `/` survives the URL.
                let user = storage.username.as_deref().map(urlencoding::encode);
                let password = storage.password.as_deref().map(urlencoding::encode);
                let auth = match (user, password) {
                    (Some(user), Some(password)) => format!("{user}:{password}@"),
                    (None, Some(password)) => format!(":{password}@"),
                    (Some(user), None) => format!("{user}@"),
                    (None, None) => String::new(),
                };
                let port = storage.port.unwrap_or(6379);
                let db = storage.database.unwrap_or(0);
                settings.store.redis_url = Some(format!("redis://{auth}{host}:{port}/{db}"));
            }
        }
        if let Some(task) = settings.task.take() {
            if task.biz_prefix.is_some() {
                warnings.push(
                    "`task.biz_prefix` is ignored: a queue is named by its plugin (NAME.wasm)"
                        .to_owned(),
                );
            }
            if let Some(v) = task.batch_size
                && moved("task.batch_size", "host.batch_size", &mut warnings)
            {
                settings.host.batch_size = v;
            }
            if let Some(v) = task.max_retry_count
                && moved(
                    "task.max_retry_count",
                    "retry.max_retry_count",
                    &mut warnings,
                )
            {
                settings.retry.max_retry_count = v;
            }
            if let Some(v) = task.backoff_strategy
                && moved("task.backoff_strategy", "retry.backoff", &mut warnings)
            {
                settings.retry.backoff = v;
            }
            if let Some(v) = task.backoff_interval
                && moved(
                    "task.backoff_interval",
                    "retry.backoff_interval_ms",
                    &mut warnings,
                )
            {
                settings.retry.backoff_interval_ms =
                    self.seconds_as_ms("task.backoff_interval", v)?;
            }
            if let Some(v) = task.backoff_multiplier
                && moved(
                    "task.backoff_multiplier",
                    "retry.backoff_multiplier",
                    &mut warnings,
                )
            {
                settings.retry.backoff_multiplier = v;
            }
            let gpu_key = if task.min_gpu_memory_gb.is_some_and(|gb| gb > 0.0) {
                Some("task.min_gpu_memory_gb")
            } else if task.min_gpu_utilization.is_some_and(|u| u > 0.0) {
                Some("task.min_gpu_utilization")
            } else {
                None
            };
            if let Some(key) = gpu_key {
                return Err(self.bad(
                    key,
                    "GPU needs are per plugin in Rebound: set min_gpu_memory_gb and \
                     max_gpu_utilization under [plugins.NAME] or in the plugin's NAME.toml",
                ));
            }
        }
        if let Some(pool) = settings.threadpool.take() {
            if let Some(v) = pool.concurrency
                && moved("threadpool.concurrency", "host.concurrency", &mut warnings)
            {
                settings.host.concurrency = v;
            }
            if let Some(v) = pool.exec_timeout
                && moved(
                    "threadpool.exec_timeout",
                    "limits.exec_timeout_ms",
                    &mut warnings,
                )
            {
                settings.limits.exec_timeout_ms =
                    self.seconds_as_ms("threadpool.exec_timeout", v)?;
            }
            if pool.proc_mode.is_some() {
                warnings.push(
                    "`threadpool.proc_mode` is ignored: every attempt runs in its own sandbox"
                        .to_owned(),
                );
            }
        }
        if let Some(scheduler) = settings.scheduler.take()
            && let Some(v) = scheduler.interval
            && moved("scheduler.interval", "host.poll_interval_ms", &mut warnings)
        {
            settings.host.poll_interval_ms = self.seconds_as_ms("scheduler.interval", v)?;
        }
        self.warnings.extend(warnings);
        Ok(())
    }

    /// A legacy setting in seconds (the old framework's unit) as whole milliseconds.
    fn seconds_as_ms(&self, key: &str, seconds: f64) -> anyhow::Result<u64> {
        // Ten years in seconds: more is a mistake, not a setting.
        if !(0.0..=315_360_000.0).contains(&seconds) {
            return Err(self.bad(key, format!("{seconds} is not a number of seconds from 0")));
        }
        Ok((seconds * 1000.0).round() as u64)
    }

    /// Refuses values no command can run with, naming the key and its layer.
    fn validate(&self) -> anyhow::Result<()> {
        let s = &self.settings;
        let ranges: [(&str, u64, u64, u64); 13] = [
            (
                "host.concurrency",
                s.host.concurrency as u64,
                1,
                MAX_CONCURRENCY,
            ),
            ("host.batch_size", s.host.batch_size as u64, 1, MAX_BATCH),
            ("host.poll_interval_ms", s.host.poll_interval_ms, 1, HOUR_MS),
            (
                "host.shutdown_grace_ms",
                s.host.shutdown_grace_ms,
                0,
                DAY_MS,
            ),
            ("host.lease_ms", s.host.lease_ms, 100, DAY_MS),
            (
                "limits.exec_timeout_ms",
                s.limits.exec_timeout_ms,
                1,
                7 * DAY_MS,
            ),
            ("limits.memory_mb", s.limits.memory_mb, 1, MAX_MEMORY_MB),
            ("limits.max_output_kb", s.limits.max_output_kb, 1, 1 << 20),
            ("limits.max_log_kb", s.limits.max_log_kb, 1, 1 << 20),
            (
                "limits.max_log_lines_per_s",
                u64::from(s.limits.max_log_lines_per_s),
                1,
                1_000_000,
            ),
            (
                "limits.max_progress_per_s",
                u64::from(s.limits.max_progress_per_s),
                1,
                1_000_000,
            ),
            ("gpu.interval_ms", s.gpu.interval_ms, 10, HOUR_MS),
            (
                "host.retention_s",
                s.host.retention_s,
                0,
                10 * 366 * 24 * 3600,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(self.bad(key, format!("{value} is out of range: {min} to {max}")));
            }
        }
        if s.limits.fuel == Some(0) {
            return Err(self.bad(
                "limits.fuel",
                "must be more than zero (leave it out for no budget)",
            ));
        }
        if let Err(err) = s.retry.validate() {
            return Err(self.bad("retry", err));
        }
        if let Err(err) = check_log_level(&s.log.level) {
            return Err(self.bad("log.level", err));
        }
        if s.http
            .token
            .as_deref()
            .is_some_and(|token| token.trim().is_empty())
        {
            return Err(self.bad("http.token", "is empty; leave it out for no token"));
        }
        if let Some(url) = &s.store.redis_url {
            let scheme = url.split_once("://").map(|(scheme, _)| scheme);
            if !matches!(
                scheme,
                Some(
                    "redis"
                        | "rediss"
                        | "redis-cluster"
                        | "rediss-cluster"
                        | "redis-sentinel"
                        | "rediss-sentinel"
                )
            ) {
                return Err(self.bad(
                    "store.redis_url",
                    format!(
                        "`{}` is not a Redis URL (redis://, rediss://, redis-cluster://, redis-sentinel://)",
                        mask_url_password(url)
                    ),
                ));
            }
        }
        for (name, plugin) in &s.plugins {
            if let Err(err) = crate::task::validate_queue_name(name) {
                return Err(self.bad(&format!("plugins.{name}"), err));
            }
            if let Err(err) = plugin.requirement() {
                return Err(self.bad(&format!("plugins.{name}"), err));
            }
        }
        Ok(())
    }

    /// The host's settings.
    pub fn host_config(&self) -> HostConfig {
        let s = &self.settings;
        let kib = |kb: u64| usize::try_from(kb.saturating_mul(1024)).unwrap_or(usize::MAX);
        HostConfig {
            limits: SandboxLimits {
                exec_timeout: Duration::from_millis(s.limits.exec_timeout_ms),
                fuel: s.limits.fuel,
                memory_bytes: usize::try_from(s.limits.memory_mb.saturating_mul(1024 * 1024))
                    .unwrap_or(usize::MAX),
                // Sized when the plugin directory is known (`limits.pooling`).
                pool: None,
                boundary: BoundaryLimits {
                    output_bytes: kib(s.limits.max_output_kb),
                    log_bytes: kib(s.limits.max_log_kb),
                    log_lines_per_s: s.limits.max_log_lines_per_s,
                    progress_per_s: s.limits.max_progress_per_s,
                },
            },
            retry: s.retry.clone(),
            concurrency: s.host.concurrency,
            batch_size: s.host.batch_size,
            poll_interval: Duration::from_millis(s.host.poll_interval_ms),
            shutdown_grace: Duration::from_millis(s.host.shutdown_grace_ms),
            lease: Duration::from_millis(s.host.lease_ms),
            max_lease_losses: s.host.max_lease_losses,
            retention: Duration::from_secs(s.host.retention_s),
            gpu_probe: s.gpu.probe,
            gpu_interval: Duration::from_millis(s.gpu.interval_ms),
        }
    }

    /// The GPU requirement `[plugins.NAME]` sets for plugin `name`, if any.
    pub fn plugin_gpu(&self, name: &str) -> Option<GpuRequirement> {
        self.settings
            .plugins
            .get(name)?
            .requirement()
            .ok()
            .flatten()
    }

    /// The effective settings as TOML, with secrets (passwords in URLs, the HTTP token)
    /// masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.settings.clone();
        if let Some(url) = &shown.store.redis_url {
            shown.store.redis_url = Some(mask_url_password(url));
        }
        if shown.http.token.is_some() {
            shown.http.token = Some("********".to_owned());
        }
        toml::to_string_pretty(&shown).expect("settings always serialize")
    }
}

/// Checks a log filter: comma-separated directives, each a level (`info`) or
/// `target=level`. A bare word that is not a level is refused: the tracing syntax would take
/// it for a target and log nothing else.
fn check_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` is not a log level: use trace, debug, info, warn, error or off, \
                 optionally as target=level"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|err| format!("`{filter}` is not a log filter: {err}"))
}

/// Every figment error, one a line, each with its key and layer.
fn describe_errors(errors: figment::Error) -> anyhow::Error {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|err| {
            let key = err.path.join(".");
            let layer = match &err.metadata {
                Some(meta) => layer_name(meta, &err.path),
                None => "settings".to_owned(),
            };
            if key.is_empty() {
                format!("invalid settings (from {layer}): {}", err.kind)
            } else {
                format!("invalid setting `{key}` (from {layer}): {}", err.kind)
            }
        })
        .collect();
    anyhow::anyhow!(lines.join("\n"))
}

/// A layer in words: the file's path, or the environment variable that set `path`.
fn layer_name(meta: &Metadata, path: &[String]) -> String {
    if meta.name.contains("environment") && !path.is_empty() {
        let key = path.join(".");
        // The short name, when that is the variable that is set.
        let short = ENV_SHORT_NAMES
            .iter()
            .filter(|(_, full)| *full == key)
            .map(|(short, _)| format!("REBOUND_{}", short.to_uppercase()))
            .find(|name| std::env::var_os(name).is_some());
        let name = short.unwrap_or_else(|| format!("REBOUND_{}", path.join("__").to_uppercase()));
        return format!("environment variable {name}");
    }
    match &meta.source {
        Some(source) => format!("{} {source}", meta.name),
        None => meta.name.to_string(),
    }
}
