//! Hot reload on a running host: a plugin that appears in the directory is served without a
//! restart; a changed file's running tasks finish on the version they started with while new
//! claims get the new one; a broken file leaves the old version serving and says why; a
//! removed file stops its queue.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound::backoff::RetryPolicy;
use rebound::reload::{DirectoryWatch, Loader, SETTLE, watch_dir};
use rebound::runtime::plugin::LivePlugins;
use rebound::runtime::{PluginSet, Runtime};
use rebound::task::{NewTask, TaskState};
use rebound_tests::{
    Backend, HostSetup, TestHost, TestStore, plugin_wasm, test_config, wait_for_state,
    wait_until_final,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);

/// Waits until `check` holds for the host's plugins, failing after [`LIMIT`].
async fn until(host: &TestHost, what: &str, check: impl Fn(&PluginSet) -> bool) {
    let started = Instant::now();
    while !check(&host.plugins().current()) {
        assert!(started.elapsed() < LIMIT, "the host never {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts `plugin`'s compiled file into `dir` as `name.wasm` the way a deployment should: a
/// write beside it, then a rename over it.
fn install(dir: &Path, name: &str, plugin: &str) {
    let staged = dir.join(format!(".{name}.wasm.new"));
    std::fs::copy(plugin_wasm(plugin), &staged).unwrap();
    std::fs::rename(&staged, dir.join(format!("{name}.wasm"))).unwrap();
}

/// The plugins of `dir`, loaded as a host loads them and followed by a directory watch (no
/// scheduler: the tests look at the set itself).
fn watched(dir: &Path) -> (LivePlugins, DirectoryWatch) {
    let config = test_config();
    let runtime = Arc::new(Runtime::new(config.limits.clone()).unwrap());
    let (set, errors) =
        PluginSet::load_dir(&runtime, dir, &config.retry, &Default::default()).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let live = LivePlugins::new(set);
    let loader = Loader {
        runtime,
        retry: config.retry,
        host_gpu: Default::default(),
    };
    let watch = watch_dir(dir, loader, live.clone()).unwrap();
    (live, watch)
}

async fn submit(store: &TestStore, queue: &str, params: Value) -> String {
    let task = NewTask {
        retry: Some(RetryPolicy {
            max_retry_count: 0,
            ..RetryPolicy::default()
        }),
        ..NewTask::new(queue, params.to_string())
    };
    store.store.create(task).await.unwrap().id
}

async fn result(store: &TestStore, id: &str) -> Value {
    let task = wait_until_final(store.store.as_ref(), id, LIMIT)
        .await
        .unwrap();
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    serde_json::from_str(task.result.as_deref().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_change_under_a_running_host() {
    rebound_tests::init_logging();
    let store = TestStore::new(Backend::Embedded).await.unwrap();
    let host = TestHost::start_with(
        store.store.clone(),
        &["echo"],
        test_config(),
        HostSetup {
            reload: true,
            ..HostSetup::default()
        },
    );
    let dir = host.plugin_dir().to_owned();

    // A new plugin: queued work for it waits, then runs once the file appears.
    let early = submit(&store, "slow", json!({ "ms": 10 })).await;
    install(&dir, "slow", "sleepy");
    until(&host, "loaded the new plugin", |set| {
        set.get("slow").is_some()
    })
    .await;
    assert_eq!(result(&store, &early).await["spun_ms"], 10);
    let first = host.plugins().get("slow").unwrap().version().to_owned();

    // Reading a plugin file (a backup, a checksum, `rebound plugins`) changes nothing.
    let loaded = host.plugins().get("slow").unwrap();
    std::fs::read(dir.join("slow.wasm")).unwrap();
    tokio::time::sleep(SETTLE * 4).await;
    assert!(
        Arc::ptr_eq(&loaded, &host.plugins().get("slow").unwrap()),
        "a read reloaded the plugin"
    );

    // A changed file while an attempt runs: the attempt finishes on the old code, and the
    // next claim runs the new code (echo returns its parameters).
    let running = submit(&store, "slow", json!({ "ms": 4000 })).await;
    wait_for_state(store.store.as_ref(), &running, TaskState::Running, LIMIT)
        .await
        .unwrap();
    install(&dir, "slow", "echo");
    until(&host, "loaded the changed file", |set| {
        set.get("slow")
            .is_some_and(|plugin| plugin.version() != first)
    })
    .await;
    let second = host.plugins().get("slow").unwrap().version().to_owned();
    let task = store.store.get(&running).await.unwrap().unwrap();
    assert_eq!(
        task.state,
        TaskState::Running,
        "still on the old version: {task:#?}"
    );
    let after = submit(&store, "slow", json!({ "ms": 1500 })).await;
    assert_eq!(
        result(&store, &after).await,
        json!({ "ms": 1500 }),
        "the new version"
    );
    assert_eq!(
        result(&store, &running).await["spun_ms"],
        4000,
        "the old version"
    );

    // A broken file: the old version goes on serving, and the failure is kept, naming it.
    std::fs::write(dir.join("slow.wasm"), b"not a component").unwrap();
    until(&host, "noticed the broken file", |set| {
        set.failures().any(|failure| failure.contains("slow.wasm"))
    })
    .await;
    assert_eq!(host.plugins().get("slow").unwrap().version(), second);
    let still = submit(&store, "slow", json!({ "still": true })).await;
    assert_eq!(result(&store, &still).await, json!({ "still": true }));

    // Fixed again: the failure clears.
    install(&dir, "slow", "sleepy");
    until(&host, "loaded the fixed file", |set| {
        set.failures().next().is_none()
            && set
                .get("slow")
                .is_some_and(|plugin| plugin.version() == first)
    })
    .await;

    // A manifest changing the concurrency: new claims follow it, one attempt at a time.
    std::fs::write(dir.join("slow.toml"), "concurrency = 1\n").unwrap();
    until(&host, "loaded the manifest", |set| {
        set.get("slow")
            .is_some_and(|plugin| plugin.concurrency() == Some(1))
    })
    .await;
    let one = submit(&store, "slow", json!({ "ms": 300, "sleep": true })).await;
    let two = submit(&store, "slow", json!({ "ms": 300, "sleep": true })).await;
    result(&store, &one).await;
    result(&store, &two).await;
    let (one, two) = (
        store.store.get(&one).await.unwrap().unwrap(),
        store.store.get(&two).await.unwrap().unwrap(),
    );
    let (first_done, second_start) = if one.started_ms <= two.started_ms {
        (one.finished_ms.unwrap(), two.started_ms.unwrap())
    } else {
        (two.finished_ms.unwrap(), one.started_ms.unwrap())
    };
    assert!(
        second_start >= first_done,
        "ran side by side under concurrency = 1: {one:#?} {two:#?}"
    );

    // Removed: the queue is no longer served, and its tasks wait for a host that serves it.
    std::fs::remove_file(dir.join("slow.wasm")).unwrap();
    until(&host, "dropped the removed plugin", |set| {
        set.get("slow").is_none()
    })
    .await;
    let orphan = submit(&store, "slow", json!({ "ms": 10 })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let task = store.store.get(&orphan).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Pending, "{task:#?}");

    // Echo, untouched throughout, still serves.
    let echo = submit(&store, "echo", json!({ "echo": 1 })).await;
    assert_eq!(result(&store, &echo).await, json!({ "echo": 1 }));
    host.shutdown().await;
}

/// A plugin directory given as a relative path (as in `rebound run --plugins my-plugins`)
/// reloads in place: the watch's absolute paths are matched with the plugins' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_plugin_directory_reloads_in_place() {
    rebound_tests::init_logging();
    let absolute = tempfile::tempdir_in(".").unwrap();
    let relative = Path::new(absolute.path().file_name().unwrap());
    assert!(relative.is_relative());
    install(relative, "echo", "echo");
    let (live, _watch) = watched(relative);
    let first = live.get("echo").unwrap().version().to_owned();

    install(relative, "echo", "flaky");
    let started = Instant::now();
    while live
        .get("echo")
        .is_some_and(|plugin| plugin.version() == first)
    {
        assert!(
            started.elapsed() < LIMIT,
            "the changed file was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let set = live.current();
    assert_eq!(set.queues().collect::<Vec<_>>(), ["echo"]);
    assert_eq!(
        set.failures().count(),
        0,
        "{:?}",
        set.failures().collect::<Vec<_>>()
    );
    assert_eq!(set.get("echo").unwrap().path(), relative.join("echo.wasm"));

    std::fs::remove_file(relative.join("echo.wasm")).unwrap();
    let started = Instant::now();
    while live.get("echo").is_some() {
        assert!(
            started.elapsed() < LIMIT,
            "the removed file was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plugin renamed together with its manifest, which names its queue, goes on serving the
/// queue: the old file gives the queue up before the new one takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_renamed_with_its_queue_keeps_serving_it() {
    rebound_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    install(dir, "zz", "echo");
    std::fs::write(dir.join("zz.toml"), "queue = \"job\"\n").unwrap();
    let (live, _watch) = watched(dir);

    std::fs::rename(dir.join("zz.wasm"), dir.join("aa.wasm")).unwrap();
    std::fs::rename(dir.join("zz.toml"), dir.join("aa.toml")).unwrap();
    let started = Instant::now();
    while live
        .get("job")
        .is_none_or(|plugin| plugin.path() != dir.join("aa.wasm"))
    {
        assert!(
            started.elapsed() < LIMIT,
            "queue job: {:?}",
            live.get("job").map(|p| p.path().to_owned())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE * 2).await;
    let set = live.current();
    assert_eq!(set.queues().collect::<Vec<_>>(), ["job"]);
    assert_eq!(
        set.failures().count(),
        0,
        "{:?}",
        set.failures().collect::<Vec<_>>()
    );
}
