//! Hot reload: follows the plugin directory and loads what changes, without a restart.
//!
//! A new or changed `NAME.wasm` (or its `NAME.toml`) is compiled off the async runtime and
//! replaces the plugin in [`LivePlugins`]: new claims use the new version, while attempts
//! that already started finish on the version they started with (they hold it). A file that
//! does not load leaves the version already serving in place, and the reason is logged and
//! shown by `/readyz`. A removed `NAME.wasm` stops its queue's claims; its running attempts
//! finish.
//!
//! Changes are gathered for [`SETTLE`] after the last event before anything is loaded, so
//! a file being copied in is read once it is whole. Writing the new file elsewhere and
//! renaming it into the directory avoids reading a half-written file at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::backoff::RetryPolicy;
use crate::gpu::GpuRequirement;
use crate::metrics;
use crate::runtime::plugin::{LivePlugins, LoadError};
use crate::runtime::{Plugin, Runtime};

/// How long the directory must be quiet before changes are loaded.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What a reload needs to load a plugin the way the host loaded it at start-up.
#[derive(Clone)]
pub struct Loader {
    /// The engine and the host's limits.
    pub runtime: Arc<Runtime>,
    /// The host's retry policy, under the manifests' `[retry]`.
    pub retry: RetryPolicy,
    /// The GPU requirements of `[plugins.NAME]`, under the manifests' `[gpu]`.
    pub host_gpu: BTreeMap<String, GpuRequirement>,
}

/// Follows a plugin directory until dropped.
pub struct DirectoryWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DirectoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts following `dir`: every change to a plugin file there is loaded into `live`.
pub fn watch_dir(dir: &Path, loader: Loader, live: LivePlugins) -> anyhow::Result<DirectoryWatch> {
    let (events, mut changes) = mpsc::unbounded_channel::<PathBuf>();
    let given = dir.to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) if changes_content(&event.kind) => {
                for path in event.paths {
                    // A plugin is known by its path under the directory as it was given
                    // (say, relative), while events may name it otherwise (absolute).
                    if let Some(name) = path.file_name() {
                        // The receiver is gone only when the host is stopping.
                        let _ = events.send(given.join(name));
                    }
                }
            }
            Ok(_) => {}
            Err(err) => warn!(error = %err, "watching the plugin directory failed"),
        }
    })
    .context("cannot watch the plugin directory")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch the plugin directory {}", dir.display()))?;

    let task = tokio::spawn(async move {
        while let Some(first) = changes.recv().await {
            let mut touched = BTreeSet::from([first]);
            // Gather until the directory has been quiet for SETTLE.
            while let Ok(Some(path)) = tokio::time::timeout(SETTLE, changes.recv()).await {
                touched.insert(path);
            }
            let plugins: BTreeSet<PathBuf> =
                touched.iter().filter_map(|p| plugin_file(p)).collect();
            // Removals first, so that a plugin renamed with its queue finds the queue free;
            // then loads, and once more the loads refused for a queue served by another
            // file, which another load of the same change may have moved off that queue.
            let (gone, changed): (Vec<PathBuf>, Vec<PathBuf>) =
                plugins.into_iter().partition(|wasm| !wasm.exists());
            for wasm in gone {
                reload_one(&loader, &live, wasm, Attempt::Last).await;
            }
            let mut waiting = Vec::new();
            for wasm in changed {
                let outcome = reload_one(&loader, &live, wasm.clone(), Attempt::First).await;
                if let Reloaded::QueueTaken = outcome {
                    waiting.push(wasm);
                }
            }
            for wasm in waiting {
                reload_one(&loader, &live, wasm, Attempt::Last).await;
            }
        }
    });
    Ok(DirectoryWatch {
        _watcher: watcher,
        task,
    })
}

/// Whether an event may have changed what a file holds: it was created, written (closed
/// after writing, which `touch` does too), renamed or removed. Reads and opens do not count
/// (loading a plugin reads its file), nor do changes of permissions or times alone.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// The plugin file a changed path belongs to: itself for `NAME.wasm`, `NAME.wasm` for its
/// manifest `NAME.toml`; `None` for anything else.
fn plugin_file(path: &Path) -> Option<PathBuf> {
    match path.extension()?.to_str()? {
        "wasm" => Some(path.to_owned()),
        "toml" => Some(path.with_extension("wasm")),
        _ => None,
    }
}

/// Whether a refused load may be tried again in the same batch of changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    Last,
}

/// What became of one changed plugin file.
enum Reloaded {
    /// Loaded, replaced or dropped; or refused, and the reason logged.
    Settled,
    /// Refused on a first attempt because another file's plugin serves its queue; not
    /// logged, since another change of the same batch may free the queue.
    QueueTaken,
}

/// Loads, replaces or drops the plugin of `wasm` after a change.
async fn reload_one(
    loader: &Loader,
    live: &LivePlugins,
    wasm: PathBuf,
    attempt: Attempt,
) -> Reloaded {
    if !wasm.exists() {
        if let Some(gone) = live.update(|set| set.remove_file(&wasm)) {
            info!(
                plugin = gone.name(),
                queue = gone.queue(),
                version = gone.version(),
                "plugin file removed: its queue takes no new tasks here"
            );
        }
        return Reloaded::Settled;
    }
    let before = live.current();
    let previous = before.iter().find(|plugin| plugin.path() == wasm).cloned();

    // Compiling is CPU work that would stall the async runtime; the set is changed after.
    let compiled = {
        let loader = loader.clone();
        let wasm = wasm.clone();
        tokio::task::spawn_blocking(move || {
            Plugin::load(&loader.runtime, &wasm, &loader.retry).map(|mut plugin| {
                plugin.set_host_gpu(loader.host_gpu.get(plugin.name()).copied());
                plugin
            })
        })
        .await
    };
    let loaded = match compiled {
        Ok(loaded) => loaded,
        Err(panic) => Err(anyhow::anyhow!(
            "plugin {}: loading panicked: {panic}",
            wasm.display()
        )),
    };
    let result = live.update(|set| set.insert_loaded(&wasm, loaded));
    match result {
        Ok(plugin) => {
            let unchanged = previous.as_ref().is_some_and(|old| {
                old.version() == plugin.version() && old.manifest() == plugin.manifest()
            });
            if unchanged {
                debug!(
                    plugin = plugin.name(),
                    version = plugin.version(),
                    "plugin file touched, not changed"
                );
                return Reloaded::Settled;
            }
            metrics::plugin_loaded(plugin.name(), plugin.version());
            let load_ms = plugin.load_time().as_millis() as u64;
            match previous {
                Some(old) if old.version() == plugin.version() => info!(
                    plugin = plugin.name(),
                    queue = plugin.queue(),
                    version = plugin.version(),
                    load_ms,
                    "plugin manifest reloaded: new tasks run under it"
                ),
                Some(old) => info!(
                    plugin = plugin.name(),
                    queue = plugin.queue(),
                    version = plugin.version(),
                    previous = old.version(),
                    load_ms,
                    "plugin reloaded: new tasks run the new version"
                ),
                None => info!(
                    plugin = plugin.name(),
                    queue = plugin.queue(),
                    version = plugin.version(),
                    load_ms,
                    "plugin loaded"
                ),
            }
            for warning in &plugin.manifest().warnings {
                warn!(plugin = plugin.name(), "{warning}");
            }
            Reloaded::Settled
        }
        Err(err) => {
            let queue_taken = err
                .downcast_ref::<LoadError>()
                .is_some_and(LoadError::queue_taken);
            if queue_taken && attempt == Attempt::First {
                debug!("{err:#}; trying again after the other changes");
                return Reloaded::QueueTaken;
            }
            metrics::plugin_load_failed();
            match previous {
                Some(old) => error!(
                    version = old.version(),
                    "{err:#}; the version already loaded keeps serving"
                ),
                None => error!("{err:#}"),
            }
            Reloaded::Settled
        }
    }
}
