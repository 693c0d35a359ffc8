//! Handler plugins: components loaded from a plugin directory, compiled and pre-linked once.
//!
//! `DIR/NAME.wasm` becomes the plugin `NAME`, which serves the queue `NAME` unless its
//! manifest names another; `DIR/NAME.toml`, when present, is its manifest
//! ([`super::manifest`]). A file that is not a component of the `rebound:plugin/handler`
//! world, or whose manifest is invalid, is refused with an error naming the file, and the
//! other plugins load regardless.
//!
//! A plugin's version is the start of the SHA-256 of its file, so logs and metrics can tell
//! which build ran an attempt; a reload ([`crate::reload`]) that finds a new version replaces
//! the plugin for new claims, while running attempts keep the version they started with.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wasmtime::component::Component;

use super::bindings::HandlerPre;
use super::manifest::Manifest;
use super::sandbox::AttemptState;
use super::{Grants, Runtime, SandboxLimits};
use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::task::{Task, validate_queue_name};

/// Hex digits of the content hash that name a plugin's version.
const VERSION_DIGITS: usize = 12;

/// A loaded plugin, ready to instantiate.
pub struct Plugin {
    name: String,
    queue: String,
    version: String,
    path: PathBuf,
    pre: HandlerPre<AttemptState>,
    retry: RetryPolicy,
    limits: SandboxLimits,
    grants: Grants,
    manifest: Manifest,
    /// The GPU requirement the host's configuration gives (`[plugins.NAME]`); the
    /// manifest's fields win over it.
    host_gpu: Option<GpuRequirement>,
    /// How long loading took: seconds for a large component compiled afresh (a Python
    /// plugin embeds CPython), milliseconds from the compiled-plugin cache.
    load_time: Duration,
}

/// From this size on a component takes long enough to compile (seconds, uncached) that the
/// host says it is loading it before it starts.
const SLOW_COMPILE_BYTES: usize = 4 << 20;

/// A plugin file that did not load, and why.
#[derive(Debug)]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, naming the file.
    pub cause: anyhow::Error,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.cause)
    }
}

impl std::error::Error for LoadError {}

impl LoadError {
    /// Whether the plugin was refused only because another file's plugin serves its queue,
    /// which may change once that file is removed or reloaded.
    pub fn queue_taken(&self) -> bool {
        self.cause.downcast_ref::<QueueTaken>().is_some()
    }
}

/// A plugin whose queue another file's plugin serves already.
#[derive(Debug, thiserror::Error)]
#[error("plugin {}: queue {queue} is served by {} already", .path.display(), .other.display())]
pub struct QueueTaken {
    /// The plugin refused.
    pub path: PathBuf,
    /// The queue both would serve.
    pub queue: String,
    /// The file of the plugin serving it.
    pub other: PathBuf,
}

impl Plugin {
    /// Compiles the component at `path` and links it against the host's imports. The plugin
    /// is named after the file; `retry` is the host's policy for tasks that bring none,
    /// which the manifest's `[retry]` keys refine.
    pub fn load(runtime: &Runtime, path: &Path, retry: &RetryPolicy) -> anyhow::Result<Self> {
        let began = Instant::now();
        let name = plugin_name(path)?;
        let mut manifest = Manifest::for_plugin(path).with_context(|| format!("plugin {name}"))?;
        if manifest.queue.is_none() {
            validate_queue_name(&name).map_err(|err| {
                anyhow!(
                    "plugin {}: {err} (set `queue` in its manifest {} to serve another queue)",
                    path.display(),
                    manifest_path(path)
                )
            })?;
        }
        let manifest_error = || format!("plugin {name}: manifest {}", manifest_path(path));
        let retry = manifest.retry_policy(retry).with_context(manifest_error)?;
        let limits = manifest
            .sandbox_limits(runtime.limits())
            .with_context(manifest_error)?;
        let (grants, missing) = Grants::resolve(&manifest.capabilities);
        // Logged, and shown by `rebound plugins`, with the manifest's own warnings.
        for variable in missing {
            manifest.warnings.push(format!(
                "granted environment variable {variable} is not set on this host; the plugin \
                 will not see it"
            ));
        }

        let bytes = std::fs::read(path)
            .with_context(|| format!("plugin {}: cannot read the file", path.display()))?;
        let version = version_of(&bytes);
        // Compiling a large component (a Python one embeds CPython) takes seconds, unless
        // the compiled-plugin cache has it: say so before the wait, not only after.
        let size_kb = bytes.len() / 1024;
        if bytes.len() >= SLOW_COMPILE_BYTES {
            tracing::info!(
                plugin = %name,
                %version,
                size_kb,
                "loading plugin: compiling a component this large takes seconds, unless the \
                 compiled-plugin cache has it"
            );
        } else {
            tracing::debug!(plugin = %name, %version, size_kb, "loading plugin");
        }
        let component = Component::new(runtime.engine(), &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {}: not a loadable component", path.display()))?;
        runtime
            .check_fits(&component, &limits)
            .with_context(|| format!("plugin {}: does not fit the sandbox", path.display()))?;
        let instance_pre = runtime
            .linker()
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "plugin {}: imports something the host does not provide",
                    path.display()
                )
            })?;
        let pre = HandlerPre::new(instance_pre)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "plugin {}: does not implement the world rebound:plugin/handler@0.1.0",
                    path.display()
                )
            })?;
        Ok(Plugin {
            queue: manifest.queue.clone().unwrap_or_else(|| name.clone()),
            name,
            version,
            path: path.to_owned(),
            pre,
            retry,
            limits,
            grants,
            manifest,
            host_gpu: None,
            load_time: began.elapsed(),
        })
    }

    /// How long loading the plugin took (compiling it, or reading it from the cache).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Sets the GPU requirement the host's configuration gives this plugin; the manifest's
    /// fields win over it.
    pub fn set_host_gpu(&mut self, requirement: Option<GpuRequirement>) {
        self.host_gpu = requirement;
    }

    /// What the plugin's tasks need of a GPU: its manifest's fields over the host
    /// configuration's; `None` when neither asks for one.
    pub fn gpu(&self) -> Option<GpuRequirement> {
        GpuRequirement::effective(self.manifest.gpu, self.host_gpu)
    }

    /// The plugin's manifest (the default when it has none).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The plugin's name: its file name without `.wasm`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue it serves: its manifest's `queue`, else its name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its version: the first hex digits of the SHA-256 of its file.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The limits its attempts run under: its manifest's over the host's.
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Attempts it may run at once on this host, if its manifest says; else the host's
    /// setting applies.
    pub fn concurrency(&self) -> Option<usize> {
        self.manifest.concurrency
    }

    /// What it may reach beyond the host's imports.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The retry policy that applies to `task`: its own, or the queue's.
    pub fn policy_for<'a>(&'a self, task: &'a Task) -> &'a RetryPolicy {
        task.retry.as_ref().unwrap_or(&self.retry)
    }

    /// The most attempts `task` may get.
    pub fn max_attempts(&self, task: &Task) -> u32 {
        self.policy_for(task).max_attempts()
    }

    pub(super) fn pre(&self) -> &HandlerPre<AttemptState> {
        &self.pre
    }
}

/// The version of a plugin whose file holds `bytes`.
fn version_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(VERSION_DIGITS);
    for byte in digest.iter().take(VERSION_DIGITS / 2) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The manifest path of `wasm`, for messages.
fn manifest_path(wasm: &Path) -> String {
    super::manifest::manifest_path(wasm).display().to_string()
}

/// The plugin name for a `NAME.wasm` path (also its queue, unless the manifest names one).
fn plugin_name(path: &Path) -> anyhow::Result<String> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .ok_or_else(|| anyhow!("plugin {}: file name is not UTF-8", path.display()))?;
    Ok(stem.to_owned())
}

/// The plugins loaded from one directory, by the queue each serves, and the files there that
/// failed to load.
#[derive(Default, Clone)]
pub struct PluginSet {
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// Why each file that did not load was refused, naming the file.
    failed: BTreeMap<PathBuf, String>,
}

/// Warns of each `NAME.toml` in `dir` without a `NAME.wasm` beside it: a misspelt manifest
/// would otherwise be ignored without a word.
fn warn_of_lone_manifests(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|entry| entry.ok().map(|entry| entry.path())) {
        if path.extension().is_some_and(|ext| ext == "toml")
            && !path.with_extension("wasm").exists()
        {
            tracing::warn!(
                manifest = %path.display(),
                "manifest without a plugin beside it (no {}); it is not used",
                path.with_extension("wasm").display()
            );
        }
    }
}

/// The `*.wasm` files of `dir`, sorted.
pub fn plugin_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the plugin directory {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    paths.sort();
    Ok(paths)
}

impl PluginSet {
    /// Loads every `*.wasm` file in `dir`, giving plugin `NAME` the GPU requirement
    /// `host_gpu[NAME]` under its manifest's. Returns the plugins that loaded and,
    /// separately, a [`LoadError`] for each file that did not (also kept in the set, see
    /// [`PluginSet::failures`]); only an unreadable directory is an error.
    pub fn load_dir(
        runtime: &Runtime,
        dir: &Path,
        retry: &RetryPolicy,
        host_gpu: &BTreeMap<String, GpuRequirement>,
    ) -> anyhow::Result<(PluginSet, Vec<anyhow::Error>)> {
        let mut set = PluginSet::default();
        let mut errors = Vec::new();
        warn_of_lone_manifests(dir);
        for path in plugin_files(dir)? {
            if let Err(err) = set.load_file(runtime, &path, retry, host_gpu) {
                errors.push(err);
            }
        }
        Ok((set, errors))
    }

    /// Loads (or loads again) the plugin at `path` into the set, replacing the version
    /// there. When it does not load, the version already there stays, and the failure is
    /// kept and returned as a [`LoadError`].
    pub fn load_file(
        &mut self,
        runtime: &Runtime,
        path: &Path,
        retry: &RetryPolicy,
        host_gpu: &BTreeMap<String, GpuRequirement>,
    ) -> Result<Arc<Plugin>, anyhow::Error> {
        let loaded = Plugin::load(runtime, path, retry).map(|mut plugin| {
            plugin.set_host_gpu(host_gpu.get(plugin.name()).copied());
            plugin
        });
        self.insert_loaded(path, loaded)
    }

    /// Puts the outcome of loading the plugin at `path` into the set: the plugin replaces
    /// the version there (unless another file's plugin serves its queue), or the failure is
    /// kept while the version there stays. A failure comes back as a [`LoadError`].
    pub fn insert_loaded(
        &mut self,
        path: &Path,
        loaded: anyhow::Result<Plugin>,
    ) -> Result<Arc<Plugin>, anyhow::Error> {
        let checked = loaded.and_then(|plugin| {
            self.check_queue_is_free(&plugin)?;
            Ok(plugin)
        });
        match checked {
            Ok(plugin) => {
                self.failed.remove(path);
                // A manifest may have moved the plugin to another queue.
                self.plugins.retain(|_, old| old.path() != path);
                let plugin = Arc::new(plugin);
                self.plugins
                    .insert(plugin.queue().to_owned(), plugin.clone());
                Ok(plugin)
            }
            Err(cause) => {
                self.failed.insert(path.to_owned(), format!("{cause:#}"));
                Err(anyhow::Error::new(LoadError {
                    path: path.to_owned(),
                    cause,
                }))
            }
        }
    }

    /// Refuses a plugin whose queue another file's plugin serves already.
    fn check_queue_is_free(&self, plugin: &Plugin) -> Result<(), QueueTaken> {
        match self.plugins.get(plugin.queue()) {
            Some(other) if other.path() != plugin.path() => Err(QueueTaken {
                path: plugin.path().to_owned(),
                queue: plugin.queue().to_owned(),
                other: other.path().to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Drops the plugin loaded from `path` (its file was removed), and any failure of it.
    /// Returns the plugin dropped.
    pub fn remove_file(&mut self, path: &Path) -> Option<Arc<Plugin>> {
        self.failed.remove(path);
        let queue = self
            .plugins
            .iter()
            .find(|(_, plugin)| plugin.path() == path)
            .map(|(queue, _)| queue.clone())?;
        self.plugins.remove(&queue)
    }

    /// Adds (or replaces) one plugin.
    pub fn insert(&mut self, plugin: Plugin) {
        self.plugins
            .insert(plugin.queue().to_owned(), Arc::new(plugin));
    }

    /// The plugin serving `queue`.
    pub fn get(&self, queue: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(queue)
    }

    /// All plugins, by queue.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.values()
    }

    /// The queues served.
    pub fn queues(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    /// Why files of the directory failed to load, one message each (naming the file).
    pub fn failures(&self) -> impl Iterator<Item = &str> {
        self.failed.values().map(String::as_str)
    }

    /// How many plugins there are.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}

/// The plugins a host serves now. The scheduler follows it (a queue that appears gets a
/// worker, one that goes away stops claiming), the HTTP API shows it, and a reload replaces
/// it. Clones share the same set.
#[derive(Clone)]
pub struct LivePlugins {
    current: Arc<watch::Sender<PluginSet>>,
}

impl LivePlugins {
    /// Serves `set`.
    pub fn new(set: PluginSet) -> Self {
        LivePlugins {
            current: Arc::new(watch::Sender::new(set)),
        }
    }

    /// The set now (a cheap copy: plugins are shared).
    pub fn current(&self) -> PluginSet {
        self.current.borrow().clone()
    }

    /// The plugin serving `queue` now.
    pub fn get(&self, queue: &str) -> Option<Arc<Plugin>> {
        self.current.borrow().get(queue).cloned()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<PluginSet> {
        self.current.subscribe()
    }

    /// Changes the set with `change`, and tells every subscriber.
    pub fn update<R>(&self, change: impl FnOnce(&mut PluginSet) -> R) -> R {
        let mut result = None;
        self.current.send_modify(|set| result = Some(change(set)));
        result.expect("send_modify runs the closure")
    }
}

impl From<PluginSet> for LivePlugins {
    fn from(set: PluginSet) -> Self {
        LivePlugins::new(set)
    }
}
