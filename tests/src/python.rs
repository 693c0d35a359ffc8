//! The Python example plugins (`plugins/python/*.py`), built with the Python SDK.
//!
//! The first test that asks for them installs the SDK and componentize-py into a virtual
//! environment of the repository's own (`scripts/prerequisites.sh`, `install_python_sdk`)
//! and builds every plugin, once per change of their sources: the outputs are kept under
//! `target/python/` with a digest of what they were built from. A lock file keeps two test
//! processes from building at the same time.
//!
//! A Python component embeds CPython (about 18 MB) and takes seconds to compile, so test
//! hosts load them through one compiled-plugin cache ([`compiled_cache`]), the way
//! `rebound run` does, and one load at a time ([`LOADING`]): the first compiles, the rest
//! read the cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// The Python plugins, by file stem; each builds to `NAME.wasm` and serves the queue `NAME`,
/// as its Rust twin does (`lazy_stdlib` has none: it checks what only a Python build needs).
pub const PLUGINS: &[&str] = &["echo", "flaky", "sleepy", "hog", "lazy_stdlib"];

/// Serializes loads of Python plugins within a test process, so that concurrent tests wait
/// for the first compile to reach the cache instead of compiling the same component again.
pub static LOADING: Mutex<()> = Mutex::new(());

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
}

fn work_dir() -> PathBuf {
    repository().join("target").join("python")
}

/// Where test hosts cache the compiled Python plugins.
pub fn compiled_cache() -> PathBuf {
    work_dir().join("compiled")
}

/// The built Python plugin `name` (one of [`PLUGINS`]), building them all first if needed.
pub fn plugin_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        build_plugins().unwrap_or_else(|err| panic!("cannot build the Python plugins: {err:#}"))
    });
    dir.join(format!("{name}.wasm"))
}

/// Every file the plugins are built from, in a fixed order.
fn sources() -> anyhow::Result<Vec<PathBuf>> {
    let root = repository();
    let mut files = vec![
        root.join("wit/plugin.wit"),
        root.join("sdk/python/pyproject.toml"),
    ];
    for dir in ["sdk/python/src/rebound_sdk", "plugins/python"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .with_context(|| format!("cannot read {dir}"))?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "py"))
            .collect();
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// A digest of the sources' names and contents, 16 hex digits.
fn digest(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    for file in files {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.strip_prefix(repository()).unwrap_or(file);
        hash.update(name.to_string_lossy().as_bytes());
        hash.update([0]);
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    let hex: String = hash.finalize()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(hex)
}

fn build_plugins() -> anyhow::Result<PathBuf> {
    let work = work_dir();
    std::fs::create_dir_all(&work)?;
    let lock = std::fs::File::create(work.join("build.lock"))?;
    lock.lock()
        .context("cannot lock target/python/build.lock")?;

    let root = repository();
    let stamp = digest(&sources()?)?;
    let out = work.join("plugins").join(&stamp);
    if PLUGINS
        .iter()
        .all(|name| out.join(format!("{name}.wasm")).is_file())
    {
        return Ok(out);
    }

    let install = Command::new("bash")
        .arg("-c")
        .arg("source scripts/prerequisites.sh && install_python_sdk")
        .current_dir(root)
        .status()
        .context("cannot run bash to install the Python SDK")?;
    if !install.success() {
        bail!("installing the Python SDK failed (scripts/prerequisites.sh, install_python_sdk)");
    }
    let python = root.join("target/python-sdk/bin/python");
    let partial = work.join("plugins").join(format!("{stamp}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    // componentize-py keeps to one core most of the time: build them side by side.
    std::thread::scope(|scope| {
        let builds: Vec<_> = PLUGINS
            .iter()
            .map(|name| {
                let (python, partial) = (&python, &partial);
                scope.spawn(move || {
                    let app = root.join("plugins/python").join(format!("{name}.py"));
                    let done = Command::new(python)
                        .args(["-m", "rebound_sdk", "build"])
                        .arg(&app)
                        .arg("-o")
                        .arg(partial.join(format!("{name}.wasm")))
                        .output()
                        .context("cannot run the SDK's build command")?;
                    if !done.status.success() {
                        bail!(
                            "building {} failed:\n{}",
                            app.display(),
                            String::from_utf8_lossy(&done.stderr)
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        builds
            .into_iter()
            .try_for_each(|build| build.join().expect("a build thread panicked"))
    })?;
    // Builds of older sources are of no more use.
    for old in std::fs::read_dir(work.join("plugins"))?.flatten() {
        if old.path() != partial {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    std::fs::rename(&partial, &out)?;
    Ok(out)
}
