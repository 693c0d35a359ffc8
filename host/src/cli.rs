//! The `rebound` command: run a host, and submit and inspect tasks.
//!
//! Every command works on the store directly, so none but `run` needs a running host. Without
//! `--redis` (or `REBOUND_REDIS_URL`, or `store.redis_url` in the config) all commands use the
//! embedded store at one default path (`--data`, `REBOUND_DATA`, or
//! `$XDG_DATA_HOME/rebound/tasks.db`, falling back to `~/.local/share/rebound/tasks.db`).
//!
//! Settings come in layers (see [`crate::settings`]): defaults, `rebound.toml` (or
//! `--config`), `REBOUND_*` variables, then the flags below.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::backoff::{Jitter, RetryPolicy, Strategy};
use crate::config::HostConfig;
use crate::gpu::{GpuGate, GpuRequirement, ProbeKind, format_gib, open_probe};
use crate::runtime::plugin::LivePlugins;
use crate::runtime::{PluginSet, Runtime};
use crate::scheduler::Scheduler;
use crate::settings::StoreSettings;
use crate::settings::{Loaded, LogFormat};
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::store::{HostReport, SharedStore, StoreError};
use crate::task::{NewTask, StateCounts, Task, TaskState};

/// Runs background tasks with retry and backoff in sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "rebound", version, about)]
pub struct Cli {
    /// Configuration file (TOML); `rebound.toml` in the working directory is read when
    /// present and this is not given.
    #[arg(long, global = true, env = "REBOUND_CONFIG")]
    config: Option<PathBuf>,

    #[command(flatten)]
    store: StoreArgs,

    /// Log format on stderr: text or json (`log.format`; text by default). The level is
    /// `log.level`, or RUST_LOG.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,

    #[command(subcommand)]
    command: Command,
}

/// Where tasks are stored; shared by every command.
#[derive(Debug, Args)]
struct StoreArgs {
    /// Redis URL: `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS,
    /// `redis-cluster://host:port?node=host:port&…` for a cluster,
    /// `redis-sentinel://sentinel:port[/db]?sentinelServiceName=NAME` behind Sentinel.
    /// Without it, the embedded store. (`store.redis_url`, `REBOUND_REDIS_URL`)
    #[arg(long, global = true)]
    redis: Option<String>,

    /// PEM file of the certificate authorities that signed the Redis server's TLS
    /// certificate, for a `rediss://` URL; the system's roots are used without it.
    /// (`store.redis_ca`, `REBOUND_REDIS_CA`)
    #[arg(long, global = true)]
    redis_ca: Option<PathBuf>,

    /// The embedded store's file, when no Redis URL is given. (`store.data`, `REBOUND_DATA`)
    #[arg(long, global = true)]
    data: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a host: load the plugins in a directory and run their queues' tasks until Ctrl-C.
    Run(RunArgs),
    /// Submit a task to a queue.
    Submit(SubmitArgs),
    /// Show one task.
    Get {
        /// The task's id.
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tasks of a queue in one state, a page at a time.
    List {
        /// The queue.
        queue: String,
        /// The state: pending, running, retrying, completed, failed or canceled.
        #[arg(long)]
        state: TaskState,
        /// Most tasks on the page (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        /// Where to start: the cursor printed at the end of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        /// Print the page as JSON: {"tasks": [...], "next": cursor or null}.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task: a waiting one at once, a running one is stopped by its host.
    Cancel {
        /// The task's id.
        id: String,
        /// Print {"id": ..., "state": ...} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a failed or canceled task again, with a fresh retry budget.
    Retry {
        /// The task's id.
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show how many tasks each queue has in each state, and the running hosts with their
    /// GPU gates.
    Stats {
        /// Print the counts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the plugins of a directory: load each as `rebound run` would, and say what
    /// each needs or why it does not load. Exits 1 when one does not.
    Plugins {
        /// The plugin directory (`host.plugins`).
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (every layer merged), secrets masked.
    Config {
        /// Print it as JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

/// Flags of `rebound run`. Each overrides the config key named in its help; unset flags
/// leave the lower layers (environment, file, defaults) in place.
#[derive(Debug, Args)]
struct RunArgs {
    /// Directory of plugins: `NAME.wasm` serves the queue `NAME`. (`host.plugins`)
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Attempts running at once, per queue [default 8]. (`host.concurrency`)
    #[arg(long)]
    concurrency: Option<usize>,
    /// Most tasks claimed per round trip to the store [default 16]. (`host.batch_size`)
    #[arg(long)]
    batch_size: Option<usize>,
    /// How long an idle queue waits before polling the store again, in ms [default 50].
    /// (`host.poll_interval_ms`)
    #[arg(long)]
    poll_ms: Option<u64>,
    /// Wall-clock limit of one attempt, in ms [default 60000]. (`limits.exec_timeout_ms`)
    #[arg(long)]
    exec_timeout_ms: Option<u64>,
    /// Fuel budget of one attempt (about one unit per WebAssembly instruction); no budget
    /// when unset. (`limits.fuel`)
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory cap of one instance, in MiB [default 256]. (`limits.memory_mb`)
    #[arg(long)]
    memory_mb: Option<u64>,
    /// How long running tasks may finish after Ctrl-C before they are interrupted and
    /// handed back, in ms [default 30000]. (`host.shutdown_grace_ms`)
    #[arg(long)]
    shutdown_grace_ms: Option<u64>,
    /// Lease length, in ms: running tasks of a host that died are taken back after this.
    /// Leases are renewed every third of it [default 30000]. (`host.lease_ms`)
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Lease losses after which a task is failed rather than run again [default 3].
    /// (`host.max_lease_losses`)
    #[arg(long)]
    max_lease_losses: Option<u32>,
    /// How long finished tasks are kept, in seconds [default 604800, 7 days].
    /// (`host.retention_s`)
    #[arg(long)]
    retention_s: Option<u64>,
    /// Retry policy for tasks submitted without one. (`retry.*`)
    #[command(flatten)]
    retry: RetryArgs,
    /// What reads the GPUs for the GPU gate: nvml (the NVIDIA driver; without it the host
    /// runs and tasks that need a GPU wait) or none [default nvml]. (`gpu.probe`,
    /// `REBOUND_GPU_PROBE`)
    #[arg(long)]
    gpu_probe: Option<ProbeKind>,
    /// How often the GPU gate reads the GPUs and retries held-back tasks, in ms
    /// [default 1000]. (`gpu.interval_ms`)
    #[arg(long)]
    gpu_interval_ms: Option<u64>,
    /// Serve the HTTP API, `/metrics` and health checks on this address, e.g.
    /// 127.0.0.1:9475; not served when unset. (`http.listen`, `REBOUND_HTTP`)
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Bearer token the HTTP API's `/v1` routes require. Prefer the environment
    /// (`REBOUND_HTTP_TOKEN`) or the config file (`http.token`): flags show in `ps`.
    #[arg(long)]
    http_token: Option<String>,
}

impl RunArgs {
    /// The flags given, as a nested map of config keys.
    fn settings(&self) -> serde_json::Value {
        let mut flags = Flags::default();
        flags.set("host.plugins", &self.plugins);
        flags.set("host.concurrency", &self.concurrency);
        flags.set("host.batch_size", &self.batch_size);
        flags.set("host.poll_interval_ms", &self.poll_ms);
        flags.set("limits.exec_timeout_ms", &self.exec_timeout_ms);
        flags.set("limits.fuel", &self.fuel);
        flags.set("limits.memory_mb", &self.memory_mb);
        flags.set("host.shutdown_grace_ms", &self.shutdown_grace_ms);
        flags.set("host.lease_ms", &self.lease_ms);
        flags.set("host.max_lease_losses", &self.max_lease_losses);
        flags.set("host.retention_s", &self.retention_s);
        flags.set("retry.max_retry_count", &self.retry.max_retries);
        flags.set("retry.backoff", &self.retry.backoff);
        flags.set("retry.backoff_interval_ms", &self.retry.backoff_interval_ms);
        flags.set("retry.backoff_multiplier", &self.retry.backoff_multiplier);
        flags.set("retry.backoff_max_ms", &self.retry.backoff_max_ms);
        flags.set("retry.jitter", &self.retry.jitter);
        flags.set("gpu.probe", &self.gpu_probe);
        flags.set("gpu.interval_ms", &self.gpu_interval_ms);
        flags.set("http.listen", &self.http);
        flags.set("http.token", &self.http_token);
        flags.0
    }
}

/// Flags collected into a nested JSON object, by dotted config key.
#[derive(Default)]
struct Flags(serde_json::Value);

impl Flags {
    fn set<T: serde::Serialize>(&mut self, key: &str, value: &Option<T>) {
        let Some(value) = value else { return };
        let value = serde_json::to_value(value).expect("flag values serialize");
        if !self.0.is_object() {
            self.0 = serde_json::json!({});
        }
        let mut node = &mut self.0;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            let map = node.as_object_mut().expect("only objects on the path");
            if parts.peek().is_none() {
                map.insert(part.to_owned(), value);
                return;
            }
            node = map.entry(part).or_insert_with(|| serde_json::json!({}));
        }
    }
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// The queue (the name of the plugin that runs the task).
    queue: String,
    /// Parameters, as JSON text.
    #[arg(long, default_value = "{}")]
    params: String,
    /// Submit many tasks: a JSON-lines file (`-` for stdin), one task a line, each an object
    /// with the HTTP API's fields (`params`, `id`, `priority`, `delay_ms`, `retry`,
    /// `min_gpu_memory_gb`, `max_gpu_utilization`). Shows a progress bar on a terminal;
    /// a bad line is reported with its number and the rest are still submitted. The lines
    /// carry every per-task setting, so the flags that set one are refused beside it.
    #[arg(long, conflicts_with_all = [
        "params", "id", "priority", "delay", "delay_ms", "run_at", "max_retries", "backoff",
        "backoff_interval_ms", "backoff_multiplier", "backoff_max_ms", "jitter",
        "min_gpu_memory_gb", "max_gpu_utilization", "min_gpu_utilization",
    ])]
    file: Option<PathBuf>,
    /// The task's id; a UUIDv7 is generated when absent.
    #[arg(long)]
    id: Option<String>,
    /// Higher runs first (-1000 to 1000).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Wait this long before the task may run, in ms.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["delay", "run_at"])]
    delay_ms: u64,
    /// Wait this long before the task may run, e.g. `90s`, `5m`, `1h 30m`.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "run_at")]
    delay: Option<Duration>,
    /// Run the task at this time (RFC 3339, e.g. `2026-12-24T18:00:00Z` or
    /// `2026-12-24T19:00:00+01:00`), as this machine's clock reads it; a time in the past
    /// runs it at once.
    #[arg(long, value_parser = parse_run_at)]
    run_at: Option<std::time::SystemTime>,
    /// Retry policy for this task; the host's policy applies when no flag is given.
    #[command(flatten)]
    retry: RetryArgs,
    /// Start only on a GPU with this much free memory, in GiB (fractions allowed); over the
    /// plugin's manifest.
    #[arg(long, allow_negative_numbers = true)]
    min_gpu_memory_gb: Option<f64>,
    /// Start only on a GPU at most this busy, in percent; over the plugin's manifest.
    #[arg(
        long,
        conflicts_with = "min_gpu_utilization",
        allow_negative_numbers = true
    )]
    max_gpu_utilization: Option<f64>,
    /// Deprecated name of --max-gpu-utilization, from the framework Rebound replaces.
    #[arg(long, hide = true, allow_negative_numbers = true)]
    min_gpu_utilization: Option<f64>,
    /// Print the created task as JSON.
    #[arg(long)]
    json: bool,
}

/// Retry policy flags. For `run` they set the policy of tasks submitted without one, and
/// unset flags take the defaults below. For `submit`, no flag at all leaves the task to the
/// host's policy; any flag gives the task a policy of its own, with the defaults below for
/// the flags not given.
#[derive(Debug, Args)]
struct RetryArgs {
    /// Retries after the first attempt (3 when unset).
    #[arg(long)]
    max_retries: Option<u32>,
    /// How the delay between attempts grows: fixed, linear or exponential (exponential
    /// when unset).
    #[arg(long)]
    backoff: Option<Strategy>,
    /// Base delay between attempts, in ms (1000 when unset).
    #[arg(long)]
    backoff_interval_ms: Option<u64>,
    /// Growth factor of the exponential strategy (2 when unset).
    #[arg(long)]
    backoff_multiplier: Option<f64>,
    /// Longest delay between attempts, in ms (no cap when unset).
    #[arg(long)]
    backoff_max_ms: Option<u64>,
    /// Randomises each delay d: none, full (0 to d) or equal (d/2 to d) (none when unset).
    #[arg(long)]
    jitter: Option<Jitter>,
}

impl RetryArgs {
    fn is_empty(&self) -> bool {
        self.max_retries.is_none()
            && self.backoff.is_none()
            && self.backoff_interval_ms.is_none()
            && self.backoff_multiplier.is_none()
            && self.backoff_max_ms.is_none()
            && self.jitter.is_none()
    }

    fn policy(&self) -> RetryPolicy {
        let defaults = RetryPolicy::default();
        RetryPolicy {
            backoff: self.backoff.unwrap_or(defaults.backoff),
            backoff_interval_ms: self
                .backoff_interval_ms
                .unwrap_or(defaults.backoff_interval_ms),
            backoff_multiplier: self
                .backoff_multiplier
                .unwrap_or(defaults.backoff_multiplier),
            backoff_max_ms: self.backoff_max_ms.or(defaults.backoff_max_ms),
            jitter: self.jitter.unwrap_or(defaults.jitter),
            max_retry_count: self.max_retries.unwrap_or(defaults.max_retry_count),
        }
    }
}

/// Parses the command line, runs the command, and turns an error into a message and exit
/// code 1 (2 for usage errors, from clap).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match Loaded::load(cli.config.as_deref(), cli.settings()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(loaded.settings.log.format, &loaded.settings.log.level);
    for warning in &loaded.warnings {
        tracing::warn!("config: {warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Guests run as futures that are always ready again (they yield at every epoch
        // tick, 10 ms). By default a busy worker looks at timers only every 61 polls, which
        // would hold back lease renewals by over half a second; every 4 polls keeps them
        // within about 40 ms.
        .event_interval(4)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli, loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one line of a command's output to stdout. A reader that went away (`rebound get …
/// | head -1`) is not an error: the command has nothing left to say to anyone.
fn emit(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// Logs to stderr in `format`, at `RUST_LOG`'s level or else `level`.
fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second initialisation (in tests) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

impl Cli {
    /// The global flags and the command's own, as a nested map of config keys.
    fn settings(&self) -> serde_json::Value {
        let mut flags = match &self.command {
            Command::Run(args) => Flags(args.settings()),
            Command::Plugins { plugins, .. } => {
                let mut flags = Flags::default();
                flags.set("host.plugins", plugins);
                flags
            }
            _ => Flags::default(),
        };
        flags.set("store.redis_url", &self.store.redis);
        flags.set("store.redis_ca", &self.store.redis_ca);
        flags.set("store.data", &self.store.data);
        let format = self.log_format.map(|format| match format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        });
        flags.set("log.format", &format);
        if flags.0.is_null() {
            flags.0 = serde_json::json!({});
        }
        flags.0
    }
}

/// Runs one parsed command with its settings.
pub async fn execute(cli: Cli, loaded: Loaded) -> anyhow::Result<()> {
    match cli.command {
        Command::Config { json } => return show_config(&loaded, json),
        Command::Plugins { json, .. } => return check_plugins(&loaded, json).await,
        _ => {}
    }
    // Only commands that add tasks, or a host that waits for them, create a new store: a
    // mistyped path given to `get` is an error, not an empty store.
    let creates = matches!(cli.command, Command::Run(_) | Command::Submit(_));
    let store = open_store(&loaded.settings.store, creates).await?;
    match cli.command {
        Command::Run(_) => run(store, &loaded).await,
        Command::Submit(args) => submit(store.as_ref(), args).await,
        Command::Get { id, json } => get(store.as_ref(), &id, json).await,
        Command::List {
            queue,
            state,
            limit,
            cursor,
            json,
        } => {
            let limit = usize::from(limit);
            list(
                store.as_ref(),
                &queue,
                state,
                limit,
                cursor.as_deref(),
                json,
            )
            .await
        }
        Command::Cancel { id, json } => cancel(store.as_ref(), &id, json).await,
        Command::Retry { id, json } => retry(store.as_ref(), &id, json).await,
        Command::Stats { json } => stats(store.as_ref(), json).await,
        Command::Config { .. } | Command::Plugins { .. } => unreachable!("handled above"),
    }
}

async fn open_store(args: &StoreSettings, create: bool) -> anyhow::Result<SharedStore> {
    if let Some(url) = &args.redis_url {
        let store = RedisStore::connect_with_ca(url, args.redis_ca.as_deref()).await?;
        return Ok(Arc::new(store));
    }
    let path = match &args.data {
        Some(path) => path.clone(),
        None => default_data_path()?,
    };
    if !create && !path.exists() {
        bail!(
            "no task store at {}: nothing was submitted there yet (--data or REBOUND_DATA \
             names another file, --redis a Redis server)",
            path.display()
        );
    }
    let store = EmbeddedStore::open(&path)?;
    Ok(Arc::new(store))
}

/// `$XDG_DATA_HOME/rebound/tasks.db`, or `~/.local/share/rebound/tasks.db`.
fn default_data_path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("neither --data, REBOUND_DATA, XDG_DATA_HOME nor HOME is set")?;
            PathBuf::from(home).join(".local/share")
        }
    };
    Ok(base.join("rebound").join("tasks.db"))
}

/// The plugin directory from the settings, or an error saying how to give one.
/// The plugin directory, made absolute (the directory watch reports absolute paths, and
/// a plugin is known by its path). One that cannot be resolved is returned as given, for
/// loading to say why it cannot be read.
fn plugin_dir(loaded: &Loaded) -> anyhow::Result<PathBuf> {
    let dir = loaded.settings.host.plugins.clone().context(
        "no plugin directory: pass --plugins DIR (or set host.plugins in the config file, \
         REBOUND_HOST__PLUGINS in the environment)",
    )?;
    Ok(std::fs::canonicalize(&dir).unwrap_or(dir))
}

/// Instances the pool keeps slots for: every plugin's concurrency (its manifest's, else the
/// host's) added up, and room for one more plugin of the host's concurrency, which a reload
/// may bring. Attempts beyond the pool wait for a slot.
fn pool_instances(dir: &std::path::Path, concurrency: usize) -> u32 {
    let files = crate::runtime::plugin::plugin_files(dir).unwrap_or_default();
    let total: usize = files
        .iter()
        .map(|wasm| {
            crate::runtime::manifest::Manifest::for_plugin(wasm)
                .ok()
                .and_then(|manifest| manifest.concurrency)
                .unwrap_or(concurrency)
        })
        .fold(concurrency, usize::saturating_add);
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// Loads (compiles) every plugin of the configured directory, off the async runtime.
async fn load_plugins(
    loaded: &Loaded,
    config: &HostConfig,
) -> anyhow::Result<(
    crate::reload::Loader,
    PathBuf,
    PluginSet,
    Vec<anyhow::Error>,
)> {
    let dir = plugin_dir(loaded)?;
    let cache = loaded.settings.cache.directory();
    let mut limits = config.limits.clone();
    if loaded.settings.limits.pooling {
        limits.pool = Some(pool_instances(&dir, config.concurrency));
    }
    let runtime = Arc::new(Runtime::with_cache(limits, cache.as_deref())?);
    match &cache {
        Some(dir) => tracing::debug!(cache = %dir.display(), "compiled plugins are cached"),
        None => tracing::debug!("compiled plugins are not cached"),
    }
    let host_gpu: BTreeMap<String, GpuRequirement> = loaded
        .settings
        .plugins
        .keys()
        .filter_map(|name| Some((name.clone(), loaded.plugin_gpu(name)?)))
        .collect();
    let loader = crate::reload::Loader {
        runtime,
        retry: config.retry.clone(),
        host_gpu,
    };
    let (plugins, errors) = {
        let loader = loader.clone();
        let dir = dir.clone();
        // Compiling components is CPU work that would stall the async runtime.
        tokio::task::spawn_blocking(move || {
            PluginSet::load_dir(&loader.runtime, &dir, &loader.retry, &loader.host_gpu)
        })
        .await
        .context("plugin loading panicked")??
    };
    for plugin in plugins.iter() {
        crate::metrics::plugin_loaded(plugin.name(), plugin.version());
    }
    for _ in &errors {
        crate::metrics::plugin_load_failed();
    }
    Ok((loader, dir, plugins, errors))
}

async fn run(store: SharedStore, loaded: &Loaded) -> anyhow::Result<()> {
    // From here on a signal stops the host cleanly (once it has started).
    let shutdown = shutdown_signal();
    let config = loaded.host_config();
    // The recorder goes in before anything records, so no early figure is lost.
    let metrics = match loaded.settings.http.listen {
        Some(_) => Some(crate::metrics::install()?),
        None => None,
    };
    let (loader, dir, plugins, errors) = load_plugins(loaded, &config).await?;
    for err in &errors {
        tracing::error!("{err:#}");
    }
    for plugin in plugins.iter() {
        let (name, queue, version) = (plugin.name(), plugin.queue(), plugin.version());
        let path = plugin.path().display();
        let load_ms = plugin.load_time().as_millis() as u64;
        match plugin.gpu() {
            Some(needs) => {
                tracing::info!(plugin = name, queue, version, %path, load_ms, gpu = %needs, "plugin loaded");
            }
            None => tracing::info!(plugin = name, queue, version, %path, load_ms, "plugin loaded"),
        }
        for warning in &plugin.manifest().warnings {
            tracing::warn!(plugin = plugin.name(), "{warning}");
        }
    }
    if plugins.is_empty() {
        if errors.is_empty() {
            bail!(
                "no plugins in {} (expected NAME.wasm components)",
                dir.display()
            );
        }
        bail!(
            "none of the {} plugin files in {} loaded (the errors above say why)",
            errors.len(),
            dir.display()
        );
    }

    let plugins = LivePlugins::new(plugins);
    // Changes to the directory are loaded from now on; without a watch, only a restart
    // picks them up.
    let _watch = match crate::reload::watch_dir(&dir, loader.clone(), plugins.clone()) {
        Ok(watch) => Some(watch),
        Err(err) => {
            tracing::warn!("{err:#}; plugin changes need a restart");
            None
        }
    };

    if let (Some(addr), Some(metrics)) = (loaded.settings.http.listen, metrics) {
        let api = crate::http::Api {
            store: store.clone(),
            plugins: plugins.clone(),
            metrics,
            token: loaded.settings.http.token.clone(),
        };
        let (local, server) = crate::http::serve(addr, api).await?;
        tracing::info!(address = %local, "serving the HTTP API, /metrics and /healthz");
        tokio::spawn(server);
    }

    let probe = {
        let kind = config.gpu_probe;
        tokio::task::spawn_blocking(move || open_probe(kind))
            .await
            .context("opening the GPU probe panicked")?
    };
    let gate = GpuGate::new(Arc::from(probe), config.gpu_interval);
    let host_id = format!("{}-{}", hostname(), std::process::id());
    let scheduler =
        Scheduler::new(store, loader.runtime, plugins, config, host_id).with_gpu_gate(gate);
    // A second Ctrl-C (or SIGTERM) ends the grace period at once.
    scheduler.run_until(shutdown, another_signal()).await;
    Ok(())
}

/// Listens for Ctrl-C and SIGTERM from the moment it is called, not from its first poll,
/// so that a signal arriving while the host starts is not lost to the default action (which
/// would kill the host without handing its tasks back). Completes on the first of them.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listening = signal(SignalKind::interrupt())
            .and_then(|interrupt| Ok((interrupt, signal(SignalKind::terminate())?)));
        async move {
            match listening {
                Ok((mut interrupt, mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Completes on a Ctrl-C or SIGTERM that arrives after its first poll (a second signal,
/// once shutdown has begun).
async fn another_signal() {
    shutdown_signal().await;
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

async fn submit(store: &dyn crate::store::Store, args: SubmitArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.file {
        return submit_file(store, &args.queue, file, args.json).await;
    }
    let retry = (!args.retry.is_empty()).then(|| args.retry.policy());
    let delay = match (args.delay, args.run_at) {
        (Some(delay), _) => delay,
        (None, Some(at)) => at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
        (None, None) => Duration::from_millis(args.delay_ms),
    };
    if delay > Duration::from_millis(crate::task::MAX_DELAY_MS) {
        bail!(
            "the task would wait {}: the longest wait before a task runs is 366 days",
            humantime::format_duration(Duration::from_secs(delay.as_secs()))
        );
    }
    if args.min_gpu_utilization.is_some() {
        eprintln!(
            "warning: --min-gpu-utilization is deprecated: it means \"start only while \
             utilization is at most this\"; use --max-gpu-utilization"
        );
    }
    let utilization = args.max_gpu_utilization.or(args.min_gpu_utilization);
    let gpu = match (args.min_gpu_memory_gb, utilization) {
        (None, None) => None,
        (memory, utilization) => Some(
            GpuRequirement::from_settings(memory, utilization)
                .map_err(|err| anyhow::anyhow!("invalid GPU requirement: {err}"))?,
        ),
    };
    let task = NewTask {
        queue: args.queue,
        id: args.id,
        params: args.params,
        priority: args.priority,
        delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        retry,
        gpu,
    };
    let task = store.create(task).await?;
    if args.json {
        emit(&serde_json::to_string(&task)?)?;
    } else {
        emit(&task.id)?;
    }
    Ok(())
}

async fn get(store: &dyn crate::store::Store, id: &str, json: bool) -> anyhow::Result<()> {
    let task = store
        .get(id)
        .await?
        .ok_or_else(|| StoreError::NotFound { id: id.to_owned() })?;
    if json {
        emit(&serde_json::to_string_pretty(&task)?)?;
    } else {
        emit(describe(&task).trim_end())?;
    }
    Ok(())
}

async fn list(
    store: &dyn crate::store::Store,
    queue: &str,
    state: TaskState,
    limit: usize,
    cursor: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let page = store.list(queue, state, limit, cursor).await?;
    if json {
        let value = serde_json::json!({ "tasks": page.tasks, "next": page.next });
        return emit(&value.to_string());
    }
    for task in &page.tasks {
        let detail = task
            .last_error
            .as_deref()
            .or(task.result.as_deref())
            .unwrap_or("");
        let detail: String = detail.chars().take(60).collect();
        emit(&format!(
            "{:<38} {:<9} attempt {:<3} {}  {detail}",
            task.id,
            task.state.as_str(),
            task.attempt,
            timestamp(task.updated_ms)
        ))?;
    }
    match page.next {
        Some(next) => emit(&format!("next page: --cursor {next}")),
        None if page.tasks.is_empty() && cursor.is_none() => {
            emit(&format!("no {state} tasks in queue {queue}"))
        }
        None if page.tasks.is_empty() => emit(&format!("no more {state} tasks in queue {queue}")),
        None => Ok(()),
    }
}

async fn cancel(store: &dyn crate::store::Store, id: &str, json: bool) -> anyhow::Result<()> {
    let state = store.cancel(id).await?;
    if json {
        return emit(&serde_json::json!({ "id": id, "state": state }).to_string());
    }
    match state {
        TaskState::Running => emit(&format!(
            "task {id} is running: the host running it stops it within about a second and it \
             ends canceled, or completed if its handler returns a result first (if that host \
             died, once its lease runs out and another host takes the task back)"
        )),
        state => emit(&format!("task {id} is {state}")),
    }
}

async fn retry(store: &dyn crate::store::Store, id: &str, json: bool) -> anyhow::Result<()> {
    let task = store.retry(id).await?;
    if json {
        return emit(&serde_json::to_string(&task)?);
    }
    emit(&format!("task {} is {} again", task.id, task.state))
}

/// Submits every line of a JSON-lines file as a task of `queue`, with a progress bar on a
/// terminal. Lines that fail are reported by number; the others are submitted regardless.
async fn submit_file(
    store: &dyn crate::store::Store,
    queue: &str,
    file: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Read;

    let bytes = if file == std::path::Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
        bytes
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    // A byte-order mark (some Windows editors write one) is not part of the first line.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    // Lines are split as bytes so one that is not UTF-8 is reported alone.
    let lines: Vec<(usize, Result<&str, std::str::Utf8Error>)> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(n, line)| (n + 1, std::str::from_utf8(line).map(str::trim)))
        .filter(|(_, line)| line.as_ref().map_or(true, |line| !line.is_empty()))
        .collect();

    let bar = indicatif::ProgressBar::new(lines.len() as u64);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tasks  {per_sec}  eta {eta}",
            )
            .expect("a valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut ids = Vec::with_capacity(lines.len());
    let mut failures: Vec<String> = Vec::new();
    for (number, line) in lines {
        let task = line
            .map_err(|err| format!("not UTF-8 text ({err})"))
            .and_then(|line| serde_json::from_str(line).map_err(|err| err.to_string()))
            .and_then(crate::http::SubmitRequest::from_json)
            .and_then(|request| request.into_new_task(queue));
        let created = match task {
            Ok(task) => create_with_retries(store, task).await,
            Err(err) => Err(err),
        };
        match created {
            Ok(id) => ids.push(id),
            Err(err) => failures.push(format!("line {number}: {err}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    if json {
        emit(&serde_json::json!({ "ids": ids, "failed": failures }).to_string())?;
    } else {
        for id in &ids {
            emit(id)?;
        }
    }
    if failures.is_empty() {
        eprintln!("submitted {} task(s) to {queue}", ids.len());
        return Ok(());
    }
    for failure in &failures {
        eprintln!("{failure}");
    }
    bail!(
        "{} line(s) of {} were not submitted (the other {} were)",
        failures.len(),
        file.display(),
        ids.len()
    )
}

/// Creates `task`, trying again when the store fails (a Redis restart, a timeout), and
/// returns its id. The id is chosen here when the line gives none, so a try whose reply was
/// lost but whose task was created shows up as that id existing in this queue, which counts
/// as created, not as a duplicate.
async fn create_with_retries(
    store: &dyn crate::store::Store,
    mut task: NewTask,
) -> Result<String, String> {
    const TRIES: u32 = 5;
    let id = task
        .id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    let mut delay = Duration::from_millis(200);
    let mut tries = 1;
    loop {
        match store.create(task.clone()).await {
            Ok(created) => return Ok(created.id),
            Err(StoreError::DuplicateId { queue, .. }) if tries > 1 && queue == task.queue => {
                return Ok(id);
            }
            Err(StoreError::Backend { .. }) if tries < TRIES => {
                tokio::time::sleep(delay).await;
                delay *= 2;
                tries += 1;
            }
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// An RFC 3339 time: UTC (`Z`, or no zone) or with a `+HH:MM` / `-HH:MM` offset.
fn parse_run_at(text: &str) -> Result<std::time::SystemTime, String> {
    let bad =
        |why: String| format!("`{text}` is not an RFC 3339 time like 2026-12-24T18:00:00Z ({why})");
    // An offset is the last six characters: a sign, two digits, a colon, two digits, after
    // the time of day (so the date's own dashes are not taken for one).
    let offset = text
        .len()
        .checked_sub(6)
        .filter(|&at| at > 10 && text.is_char_boundary(at))
        .and_then(|at| {
            let (time, zone) = text.split_at(at);
            let sign = match zone.as_bytes()[0] {
                b'+' => 1i64,
                b'-' => -1i64,
                _ => return None,
            };
            let (hours, minutes) = zone[1..].split_once(':')?;
            let hours: i64 = hours.parse().ok().filter(|h| (0..24).contains(h))?;
            let minutes: i64 = minutes.parse().ok().filter(|m| (0..60).contains(m))?;
            Some((time, sign * (hours * 3600 + minutes * 60)))
        });
    let (time, offset_s) = offset.unwrap_or((text, 0));
    let utc_reading = humantime::parse_rfc3339_weak(time).map_err(|err| bad(err.to_string()))?;
    // 10:00+01:00 is 09:00 UTC: subtract the offset.
    let shift = Duration::from_secs(offset_s.unsigned_abs());
    let at = if offset_s >= 0 {
        utc_reading.checked_sub(shift)
    } else {
        utc_reading.checked_add(shift)
    };
    at.ok_or_else(|| bad("out of range".to_owned()))
}

/// The human-readable form of a task, one field a line.
fn describe(task: &Task) -> String {
    let mut out = String::new();
    let mut line = |name: &str, value: &str| {
        out.push_str(&format!("{name:<10} {value}\n"));
    };
    line("id", &task.id);
    line("queue", &task.queue);
    line("state", task.state.as_str());
    let attempts = match &task.retry {
        Some(policy) => format!("{} of {}", task.attempt, policy.max_attempts()),
        None => task.attempt.to_string(),
    };
    line("attempts", &attempts);
    line("priority", &task.priority.to_string());
    line("progress", &format!("{}%", task.progress));
    line("params", &task.params);
    if let Some(gpu) = &task.gpu {
        line(
            "gpu",
            &format!("needs {gpu} (set at submission, overriding its plugin's manifest)"),
        );
    }
    line("created", &timestamp(task.created_ms));
    if matches!(task.state, TaskState::Pending | TaskState::Retrying) {
        line("runs at", &timestamp(task.run_at_ms));
    }
    if let Some(ms) = task.finished_ms {
        line("finished", &timestamp(ms));
    }
    if let Some(result) = &task.result {
        line("result", result);
    }
    if let Some(error) = &task.last_error {
        line("error", error);
    }
    if task.lease_losses > 0 {
        line(
            "leases",
            &format!("lost {} time(s) by hosts that died", task.lease_losses),
        );
    }
    if task.cancel_requested {
        line("cancel", "requested; its host is stopping it");
    }
    if task.exhausted_hook_runs > 0 {
        line(
            "exhausted",
            &format!("hook ran {} time(s)", task.exhausted_hook_runs),
        );
    }
    out
}

fn timestamp(ms: u64) -> String {
    // RFC 3339 has four-digit years; anything later is shown as it is stored.
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if ms >= YEAR_10000_MS {
        return format!("{ms} ms after the Unix epoch");
    }
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

async fn stats(store: &dyn crate::store::Store, json: bool) -> anyhow::Result<()> {
    if json {
        return emit(&crate::http::stats_json(store).await?.to_string());
    }
    let mut rows: Vec<(String, StateCounts)> = Vec::new();
    for queue in store.queues().await? {
        let counts = store.counts(&queue).await?;
        rows.push((queue, counts));
    }
    let hosts = store.hosts().await?;
    if rows.is_empty() {
        emit("no queues yet")?;
    } else {
        let mut header = format!("{:<20}", "queue");
        for state in TaskState::ALL {
            header.push_str(&format!(" {:>10}", state.as_str()));
        }
        emit(&header)?;
        for (queue, counts) in rows {
            let mut row = format!("{queue:<20}");
            for state in TaskState::ALL {
                row.push_str(&format!(" {:>10}", counts.get(state)));
            }
            emit(&row)?;
        }
    }
    emit("")?;
    if hosts.is_empty() {
        return emit("no host is running");
    }
    for host in &hosts {
        emit(&describe_host(host))?;
    }
    Ok(())
}

/// A running host as `rebound stats` shows it: its queues and its GPU gate.
fn describe_host(host: &HostReport) -> String {
    let mut out = format!(
        "host {}  (up since {}; queues: {})\n",
        host.host,
        timestamp(host.started_ms),
        host.queues.join(", ")
    );
    let gate = &host.gate;
    out.push_str(&format!("  GPU probe: {}\n", gate.probe));
    if let Some(error) = &gate.error {
        out.push_str(&format!(
            "  GPU gate closed: the last reading failed: {error}\n"
        ));
    } else if gate.gpus.is_empty() {
        out.push_str("  GPU gate closed: no GPU present\n");
    }
    for gpu in &gate.gpus {
        let reserved = gate.reserved_bytes.get(&gpu.index).copied().unwrap_or(0);
        out.push_str(&format!(
            "  gpu {}  {}  free {} GiB of {} GiB, {} GiB reserved, utilization {}%\n",
            gpu.index,
            gpu.name,
            format_gib(gpu.free_bytes),
            format_gib(gpu.total_bytes),
            format_gib(reserved),
            gpu.utilization_percent
        ));
    }
    for (queue, held) in &host.held_at_gate {
        out.push_str(&format!(
            "  held at the GPU gate: {held} task(s) of {queue}\n"
        ));
    }
    out.trim_end().to_owned()
}

fn show_config(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
    let file = match &loaded.file {
        Some(path) => path.display().to_string(),
        None => "none".to_owned(),
    };
    if json {
        let toml_text = loaded.to_masked_toml();
        let value: toml::Value = toml::from_str(&toml_text)?;
        let value = serde_json::json!({ "file": loaded.file, "settings": value });
        return emit(&serde_json::to_string_pretty(&value)?);
    }
    emit(&format!("# configuration file: {file}"))?;
    emit("# layers: defaults < file < REBOUND_* environment < flags; secrets masked\n")?;
    emit(loaded.to_masked_toml().trim_end())
}

/// One plugin's load check, as `rebound plugins --json` prints it.
#[derive(Debug, serde::Serialize)]
struct PluginCheck {
    name: Option<String>,
    /// The queue it serves, and its version (content hash prefix), when it loaded.
    queue: Option<String>,
    version: Option<String>,
    path: PathBuf,
    loaded: bool,
    gpu: Option<GpuRequirement>,
    error: Option<String>,
    warnings: Vec<String>,
}

async fn check_plugins(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
    let config = loaded.host_config();
    let (_loader, dir, plugins, errors) = load_plugins(loaded, &config).await?;
    let mut checks: Vec<PluginCheck> = plugins
        .iter()
        .map(|plugin| PluginCheck {
            name: Some(plugin.name().to_owned()),
            queue: Some(plugin.queue().to_owned()),
            version: Some(plugin.version().to_owned()),
            path: plugin.path().to_owned(),
            loaded: true,
            gpu: plugin.gpu(),
            error: None,
            warnings: plugin.manifest().warnings.clone(),
        })
        .collect();
    for err in &errors {
        let (path, message) = match err.downcast_ref::<crate::runtime::plugin::LoadError>() {
            Some(load) => (load.path.clone(), format!("{:#}", load.cause)),
            None => (dir.clone(), format!("{err:#}")),
        };
        checks.push(PluginCheck {
            name: None,
            queue: None,
            version: None,
            path,
            loaded: false,
            gpu: None,
            error: Some(message),
            warnings: Vec::new(),
        });
    }
    checks.sort_by(|a, b| a.path.cmp(&b.path));
    if json {
        emit(&serde_json::to_string_pretty(
            &serde_json::json!({ "plugins": checks }),
        )?)?;
    } else if checks.is_empty() {
        emit(&format!(
            "no plugins (NAME.wasm files) in {}",
            dir.display()
        ))?;
    } else {
        for check in &checks {
            let line = match (&check.error, &check.gpu) {
                (Some(error), _) => format!("FAILED {}: {error}", check.path.display()),
                (None, gpu) => {
                    let name = check.name.as_deref().unwrap_or("");
                    let queue = check.queue.as_deref().unwrap_or("");
                    let serves = if queue == name {
                        String::new()
                    } else {
                        format!("  (serves queue {queue})")
                    };
                    let needs = gpu
                        .map(|gpu| format!("  (needs a GPU: {gpu})"))
                        .unwrap_or_default();
                    format!(
                        "ok     {name:<20} {}  {}{serves}{needs}",
                        check.version.as_deref().unwrap_or(""),
                        check.path.display()
                    )
                }
            };
            emit(&line)?;
            for warning in &check.warnings {
                emit(&format!("       warning: {warning}"))?;
            }
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} of {} plugin(s) did not load",
            errors.len(),
            checks.len()
        );
    }
    if checks.is_empty() {
        bail!("no plugins to check in {}", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::parse_run_at;

    #[test]
    fn run_at_takes_utc_and_offsets() {
        let noon = UNIX_EPOCH + Duration::from_secs(1_798_372_800); // 2026-12-27T12:00:00Z
        for text in [
            "2026-12-27T12:00:00Z",
            "2026-12-27T12:00:00",
            "2026-12-27T13:30:00+01:30",
            "2026-12-27T07:00:00-05:00",
            "2026-12-27T12:00:00+00:00",
        ] {
            assert_eq!(parse_run_at(text), Ok(noon), "{text}");
        }
        for text in [
            "2026-12-27",
            "2026-12-27T12:00:00+25:00",
            "noon",
            "2026-12-27T12:00:00+1",
        ] {
            let err = parse_run_at(text).unwrap_err();
            assert!(err.contains(text), "{err}");
        }
    }
}
