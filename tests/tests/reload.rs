//! Hot reload on a running host: a plugin that appears in the directory is served without a
//! restart; a changed file's running tasks finish on the version they started with while new
//! claims get the new one; a broken file leaves the old version serving and says why; a
//! removed file stops its queue.

use std::path::Path;
use std::time::{Duration, Instant};

use rebound::backoff::RetryPolicy;
use rebound::task::{NewTask, TaskState};
use rebound_tests::{
    Backend, HostSetup, TestHost, TestStore, plugin_wasm, test_config, wait_for_state,
    wait_until_final,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);

/// Waits until `check` holds for the host's plugins, failing after [`LIMIT`].
async fn until(host: &TestHost, what: &str, check: impl Fn(&rebound::runtime::PluginSet) -> bool) {
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
