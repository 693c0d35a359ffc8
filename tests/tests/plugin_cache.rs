//! The compiled-plugin cache: a second engine loads a plugin (Rust or Python) from the cache
//! instead of compiling it, and a corrupt entry is compiled again rather than trusted.

use std::path::Path;
use std::time::Instant;

use rebound::runtime::sandbox::AttemptSignals;
use rebound::runtime::{AttemptOutcome, Plugin, Runtime, SandboxLimits};
use rebound::task::{NewTask, Task};
use rebound_tests::Lang;

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Loads echo in `lang` on a fresh engine caching in `dir`, runs one task, and says how long
/// the load took.
async fn load_and_run(dir: &Path, lang: Lang) -> std::time::Duration {
    let runtime = Runtime::with_cache(SandboxLimits::default(), Some(dir)).unwrap();
    let began = Instant::now();
    let plugin = Plugin::load(&runtime, &lang.plugin_wasm("echo"), &Default::default()).unwrap();
    let took = began.elapsed();
    let task = Task::submitted("t".into(), NewTask::new("echo", r#"{"cached":true}"#), 0);
    let outcome = runtime
        .run_attempt(&plugin, &task, None, &AttemptSignals::new(0))
        .await;
    match outcome {
        AttemptOutcome::Completed(output) => assert_eq!(output, r#"{"cached":true}"#),
        other => panic!("echo did not complete: {other:?}"),
    }
    took
}

/// Loads echo in `lang` twice through a fresh cache: the first load compiles and writes the
/// cache, the second reads it. Returns the cache's entries.
async fn compiled_once_then_cached(dir: &Path, lang: Lang) -> Vec<std::path::PathBuf> {
    let cold = load_and_run(dir, lang).await;
    let entries = files_under(dir);
    assert!(
        !entries.is_empty(),
        "the first load wrote the compiled plugin"
    );
    let warm = load_and_run(dir, lang).await;
    eprintln!("{lang:?} echo: compiled in {cold:?}, loaded from the cache in {warm:?}");
    assert_eq!(
        files_under(dir).len(),
        entries.len(),
        "the second load added nothing"
    );
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_compiled_plugins_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("plugins");
    let entries = compiled_once_then_cached(&dir, Lang::Rust).await;

    // A corrupt entry is not trusted: the plugin is compiled again and still runs.
    for entry in &entries {
        std::fs::write(entry, b"definitely not machine code").unwrap();
    }
    load_and_run(&dir, Lang::Rust).await;
}

/// A Python plugin embeds CPython: compiling it takes seconds, which a restart must not pay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_a_python_plugin_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    compiled_once_then_cached(&cache.path().join("plugins"), Lang::Python).await;
}
