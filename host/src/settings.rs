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
use crate::runtime::SandboxLimits;

/// The file read when no `--config` is given, if it exists in the working directory.
pub const DEFAULT_FILE: &str = "rebound.toml";

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
    /// Seconds.
    backoff_interval: Option<u64>,
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
    /// Seconds.
    exec_timeout: Option<u64>,
}

/// The old framework's `scheduler`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyScheduler {
    /// Seconds.
    interval: Option<u64>,
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
                let auth = match (storage.username, storage.password) {
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
                settings.retry.backoff_interval_ms = v.saturating_mul(1000);
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
            if task.min_gpu_memory_gb.is_some_and(|gb| gb > 0.0)
                || task.min_gpu_utilization.is_some_and(|u| u > 0.0)
            {
                return Err(self.bad(
                    "task.min_gpu_memory_gb",
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
                settings.limits.exec_timeout_ms = v.saturating_mul(1000);
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
            settings.host.poll_interval_ms = v.saturating_mul(1000);
        }
        self.warnings.extend(warnings);
        Ok(())
    }

    /// Refuses values no command can run with, naming the key and its layer.
    fn validate(&self) -> anyhow::Result<()> {
        let s = &self.settings;
        if s.host.concurrency == 0 {
            return Err(self.bad("host.concurrency", "must be at least 1"));
        }
        if s.host.batch_size == 0 {
            return Err(self.bad("host.batch_size", "must be at least 1"));
        }
        if s.host.lease_ms < 100 {
            return Err(self.bad("host.lease_ms", "must be at least 100"));
        }
        if s.limits.exec_timeout_ms == 0 {
            return Err(self.bad("limits.exec_timeout_ms", "must be more than zero"));
        }
        if s.limits.fuel == Some(0) {
            return Err(self.bad(
                "limits.fuel",
                "must be more than zero (leave it out for no budget)",
            ));
        }
        if s.limits.memory_mb == 0 {
            return Err(self.bad("limits.memory_mb", "must be at least 1"));
        }
        if s.gpu.interval_ms < 10 {
            return Err(self.bad("gpu.interval_ms", "must be at least 10"));
        }
        if let Err(err) = s.retry.validate() {
            return Err(self.bad("retry", err));
        }
        if let Err(err) = EnvFilterCheck::check(&s.log.level) {
            return Err(self.bad("log.level", err));
        }
        for (name, plugin) in &s.plugins {
            if let Err(err) = crate::task::validate_queue_name(name) {
                return Err(self.bad(&format!("plugins.{name}"), err));
            }
            if let Err(err) =
                GpuRequirement::from_settings(plugin.min_gpu_memory_gb, plugin.max_gpu_utilization)
            {
                return Err(self.bad(&format!("plugins.{name}"), err));
            }
        }
        Ok(())
    }

    /// The host's settings.
    pub fn host_config(&self) -> HostConfig {
        let s = &self.settings;
        HostConfig {
            limits: SandboxLimits {
                exec_timeout: Duration::from_millis(s.limits.exec_timeout_ms),
                fuel: s.limits.fuel,
                memory_bytes: usize::try_from(s.limits.memory_mb.saturating_mul(1024 * 1024))
                    .unwrap_or(usize::MAX),
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
        let plugin = self.settings.plugins.get(name)?;
        if plugin.min_gpu_memory_gb.is_none() && plugin.max_gpu_utilization.is_none() {
            return None;
        }
        GpuRequirement::from_settings(plugin.min_gpu_memory_gb, plugin.max_gpu_utilization).ok()
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

/// Checks a tracing filter without installing it.
struct EnvFilterCheck;

impl EnvFilterCheck {
    fn check(filter: &str) -> Result<(), String> {
        tracing_subscriber::EnvFilter::try_new(filter)
            .map(|_| ())
            .map_err(|err| format!("`{filter}` is not a log filter: {err}"))
    }
}

/// `redis://user:secret@host` as `redis://user:********@host`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:********@{host}"),
        None => url.to_owned(),
    }
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
        return format!(
            "environment variable REBOUND_{}",
            path.join("__").to_uppercase()
        );
    }
    match &meta.source {
        Some(source) => format!("{} {source}", meta.name),
        None => meta.name.to_string(),
    }
}
