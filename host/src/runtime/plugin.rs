//! Handler plugins: components loaded from a plugin directory, compiled and pre-linked once.
//!
//! `DIR/NAME.wasm` becomes the plugin `NAME`, which serves the queue `NAME`; `DIR/NAME.toml`,
//! when present, is its manifest ([`super::manifest`]). A file that is not a component of the
//! `rebound:plugin/handler` world, or whose manifest is invalid, is refused with an error
//! naming the file, and the other plugins load regardless.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use wasmtime::component::Component;

use super::Runtime;
use super::bindings::HandlerPre;
use super::manifest::Manifest;
use super::sandbox::AttemptState;
use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::task::{Task, validate_queue_name};

/// A loaded plugin, ready to instantiate.
pub struct Plugin {
    name: String,
    path: PathBuf,
    pre: HandlerPre<AttemptState>,
    retry: RetryPolicy,
    manifest: Manifest,
    /// The GPU requirement the host's configuration gives (`[plugins.NAME]`); the
    /// manifest's fields win over it.
    host_gpu: Option<GpuRequirement>,
}

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

impl Plugin {
    /// Compiles the component at `path` and links it against the host's imports. The plugin
    /// is named after the file; `retry` is its queue's policy for tasks that bring none.
    pub fn load(runtime: &Runtime, path: &Path, retry: RetryPolicy) -> anyhow::Result<Self> {
        let name = plugin_name(path)?;
        let manifest = Manifest::for_plugin(path).with_context(|| format!("plugin {name}"))?;
        let component = Component::from_file(runtime.engine(), path)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("plugin {}: not a loadable component", path.display()))?;
        runtime
            .check_fits(&component)
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
            name,
            path: path.to_owned(),
            pre,
            retry,
            manifest,
            host_gpu: None,
        })
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

    /// The plugin's name, which is also the queue it serves.
    pub fn name(&self) -> &str {
        &self.name
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

/// The plugin name for a `NAME.wasm` path, checked to be a valid queue name.
fn plugin_name(path: &Path) -> anyhow::Result<String> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .ok_or_else(|| anyhow!("plugin {}: file name is not UTF-8", path.display()))?;
    validate_queue_name(stem).map_err(|err| anyhow!("plugin {}: {err}", path.display()))?;
    Ok(stem.to_owned())
}

/// The plugins loaded from one directory, by name.
#[derive(Default, Clone)]
pub struct PluginSet {
    plugins: BTreeMap<String, Arc<Plugin>>,
}

impl PluginSet {
    /// Loads every `*.wasm` file in `dir`, giving plugin `NAME` the GPU requirement
    /// `host_gpu[NAME]` under its manifest's. Returns the plugins that loaded and,
    /// separately, a [`LoadError`] for each file that did not; only an unreadable directory
    /// is an error.
    pub fn load_dir(
        runtime: &Runtime,
        dir: &Path,
        retry: &RetryPolicy,
        host_gpu: &BTreeMap<String, GpuRequirement>,
    ) -> anyhow::Result<(PluginSet, Vec<anyhow::Error>)> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the plugin directory {}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
            .collect();
        paths.sort();

        let mut set = PluginSet::default();
        let mut errors = Vec::new();
        for path in paths {
            match Plugin::load(runtime, &path, retry.clone()) {
                Ok(mut plugin) => {
                    plugin.set_host_gpu(host_gpu.get(plugin.name()).copied());
                    set.plugins
                        .insert(plugin.name().to_owned(), Arc::new(plugin));
                }
                Err(cause) => errors.push(anyhow::Error::new(LoadError { path, cause })),
            }
        }
        Ok((set, errors))
    }

    /// Adds (or replaces) one plugin.
    pub fn insert(&mut self, plugin: Plugin) {
        self.plugins
            .insert(plugin.name().to_owned(), Arc::new(plugin));
    }

    /// The plugin serving `queue`.
    pub fn get(&self, queue: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(queue)
    }

    /// All plugins, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.values()
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
