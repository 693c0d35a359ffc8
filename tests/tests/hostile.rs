//! The hostile-plugin suite: plugins that try to take the host down, starve it, read what
//! they were not granted or run past their limits, each beside a twin just inside the limit.
//! For every case the task ends with the right reason, the host goes on serving echo, and
//! once all of them have run the host's resident set is back near where it was after the
//! twins. One test, alone in its binary, so the memory figures are its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use rebound::backoff::RetryPolicy;
use rebound::config::HostConfig;
use rebound::runtime::{PluginSet, Runtime, SandboxLimits};
use rebound::task::{NewTask, Task, TaskState};
use rebound_tests::{
    Backend, HostSetup, TestHost, TestStore, plugin_dir, rss_mib, test_config, wait_until_final,
};
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

/// A small HTTP server of the test's own: `/ok` answers 200, `/busy-once` answers 503 the
/// first time and 200 after; it counts the requests it got.
struct ModelServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn model_server() -> ModelServer {
    let hits = Arc::new(AtomicUsize::new(0));
    let busy_once = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/ok",
            get({
                let hits = hits.clone();
                move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    "ready"
                }
            }),
        )
        .route(
            "/busy-once",
            get({
                let hits = hits.clone();
                move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if busy_once.fetch_add(1, Ordering::SeqCst) == 0 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy")
                    } else {
                        (StatusCode::OK, "done")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    ModelServer { addr, hits }
}

/// Submits `params` to `queue` with `retries` retries, and waits until the task has ended.
async fn run(store: &TestStore, queue: &str, params: Value, retries: u32) -> Task {
    let task = NewTask {
        retry: Some(RetryPolicy {
            max_retry_count: retries,
            ..RetryPolicy::default()
        }),
        ..NewTask::new(queue, params.to_string())
    };
    let id = store.store.create(task).await.unwrap().id;
    wait_until_final(store.store.as_ref(), &id, Duration::from_secs(60))
        .await
        .unwrap()
}

/// The task completed; its result, parsed.
fn completed(task: &Task) -> Value {
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    serde_json::from_str(task.result.as_deref().unwrap()).unwrap()
}

/// The task failed; its error.
fn failed(task: &Task) -> &str {
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    task.last_error.as_deref().unwrap()
}

/// Asserts that the task failed with the sandbox's `reason` and an error containing `detail`.
fn assert_stopped(task: &Task, reason: &str, detail: &str) {
    let error = failed(task);
    assert!(
        error.starts_with(&format!("{reason}:")),
        "expected {reason}, got: {error}"
    );
    assert!(error.contains(detail), "expected {detail:?} in: {error}");
}

/// The host still serves: an echo task completes with its parameters.
async fn still_serving(store: &TestStore, after: &str) {
    let task = run(store, "echo", json!({ "after": after }), 0).await;
    assert_eq!(completed(&task), json!({ "after": after }), "after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_end_with_the_right_reason_and_the_host_recovers() {
    rebound_tests::init_logging();
    let server = model_server().await;
    let granted = server.addr;
    // Another server, listening but not granted: a request to it must never arrive.
    let other = model_server().await;

    // A variable set on this host but not granted to the plugin.
    let denied_var = ["HOME", "CARGO", "PWD", "USER"]
        .into_iter()
        .find(|name| std::env::var_os(name).is_some())
        .expect("one of HOME, CARGO, PWD, USER is set");

    let store = TestStore::new(Backend::Embedded).await.unwrap();
    let config = HostConfig {
        limits: SandboxLimits {
            // Room for a 100 MB result inside the guest, so the host's output limit is
            // what stops it.
            memory_bytes: 512 * MIB,
            ..test_config().limits
        },
        ..test_config()
    };
    let hostile_manifest = format!(
        "[limits]\nmemory_mb = 512\n\n[capabilities]\nenv = [\"PATH\"]\nhttp = [\"{granted}\"]\n"
    );
    let manifests = [
        ("hostile", hostile_manifest.as_str()),
        ("sleepy", "[limits]\nexec_timeout_ms = 1000\n"),
        ("hog", "[limits]\nmemory_mb = 96\n"),
    ];
    let host = TestHost::start_with(
        store.store.clone(),
        &["hostile", "sleepy", "hog", "echo"],
        config,
        HostSetup {
            manifests: &manifests,
            ..HostSetup::default()
        },
    );

    // The twins, just inside each limit: all complete, and warm the host up before its
    // memory is measured.
    let twin = completed(&run(&store, "sleepy", json!({ "ms": 300 }), 0).await);
    assert_eq!(twin["spun_ms"], 300);
    let twin = completed(&run(&store, "sleepy", json!({ "ms": 300, "sleep": true }), 0).await);
    assert_eq!(twin["slept_ms"], 300);
    assert_eq!(
        completed(&run(&store, "hog", json!({ "mb": 80 }), 0).await)["held_mb"],
        80
    );
    let hostile = |what: &str, n: u64| json!({ "do": what, "n": n });
    assert_eq!(
        completed(&run(&store, "hostile", hostile("recurse", 1_000), 0).await)["depth"],
        1_000
    );
    assert_eq!(
        completed(&run(&store, "hostile", hostile("panic", 0), 0).await)["panicked"],
        false
    );
    let output = completed(&run(&store, "hostile", hostile("output", 512 * 1024), 0).await);
    assert_eq!(output.as_str().map(str::len), Some(512 * 1024));
    assert_eq!(
        completed(&run(&store, "hostile", hostile("log", 500), 0).await)["logged"],
        500
    );
    assert_eq!(
        completed(&run(&store, "hostile", hostile("progress", 100), 0).await)["reported"],
        100
    );
    let path_value = std::env::var("PATH").expect("PATH is set");
    let env = completed(&run(&store, "hostile", json!({ "do": "env", "name": "PATH" }), 0).await);
    assert_eq!(env["value"], path_value.as_str(), "the granted variable");
    let url = format!("http://{granted}/ok");
    let http = completed(&run(&store, "hostile", json!({ "do": "http", "url": url }), 0).await);
    assert_eq!(http, json!({ "status": 200, "body": "ready" }));
    // A 503 from a granted server: the handler asks for a retry a second later, and the
    // second attempt gets its answer.
    let url = format!("http://{granted}/busy-once");
    let started = Instant::now();
    let busy = run(&store, "hostile", json!({ "do": "http", "url": url }), 1).await;
    assert_eq!(completed(&busy)["body"], "done");
    assert_eq!(busy.attempt, 2);
    assert!(started.elapsed() >= Duration::from_secs(1), "{busy:#?}");
    still_serving(&store, "the twins").await;
    let baseline = rss_mib();

    // The hostile cases.
    let spin = run(&store, "sleepy", json!({ "ms": 60_000 }), 0).await;
    assert_stopped(&spin, "timeout", "exec_timeout");
    still_serving(&store, "an endless loop").await;

    let sleep = run(&store, "sleepy", json!({ "ms": 60_000, "sleep": true }), 0).await;
    assert_stopped(&sleep, "timeout", "exec_timeout");
    still_serving(&store, "an endless WASI sleep").await;

    let hog = run(&store, "hog", json!({ "mb": 10_000 }), 0).await;
    assert_stopped(&hog, "memory_limit", "over the cap");
    still_serving(&store, "unbounded memory growth").await;

    let deep = run(&store, "hostile", hostile("recurse", 100_000_000), 0).await;
    assert_stopped(&deep, "stack_overflow", "");
    still_serving(&store, "deep recursion").await;

    let panic = run(&store, "hostile", hostile("panic", 1), 0).await;
    // The guest's panic message, from its stderr, is in the task's error.
    assert_stopped(
        &panic,
        "guest_panic",
        "hostile plugin panics as asked (n = 1)",
    );
    still_serving(&store, "a panic").await;

    let huge = run(&store, "hostile", hostile("output", 100_000_000), 0).await;
    assert_stopped(&huge, "host_limit", "max_output_kb");
    still_serving(&store, "a 100 MB output").await;

    let flood = run(&store, "hostile", hostile("log", 1_000_000), 0).await;
    assert_stopped(&flood, "host_limit", "log");
    still_serving(&store, "a log flood").await;

    let flood = run(&store, "hostile", hostile("progress", 1_000_000), 0).await;
    assert_stopped(&flood, "host_limit", "progress");
    still_serving(&store, "a progress flood").await;

    // Nothing of the host's file system is reachable: the read fails inside the guest,
    // which reports it as its own failure.
    let read = run(
        &store,
        "hostile",
        json!({ "do": "read_file", "path": "/etc/passwd" }),
        0,
    )
    .await;
    let error = failed(&read);
    assert!(error.contains("cannot read /etc/passwd"), "{error}");
    still_serving(&store, "reading a file").await;

    let env = run(
        &store,
        "hostile",
        json!({ "do": "env", "name": denied_var }),
        0,
    )
    .await;
    let error = failed(&env);
    assert!(
        error.contains(&format!("cannot read ${denied_var}")),
        "{error}"
    );
    still_serving(&store, "reading an ungranted variable").await;

    let url = format!("http://{}/ok", other.addr);
    let call = run(&store, "hostile", json!({ "do": "http", "url": url }), 0).await;
    let error = failed(&call);
    assert!(error.contains(&format!("GET {url}")), "{error}");
    assert!(error.contains("denied"), "{error}");
    assert_eq!(
        other.hits.load(Ordering::SeqCst),
        0,
        "the request never left"
    );
    still_serving(&store, "an HTTP call off the allow-list").await;

    // All of it given back: the host holds about what it held after the twins.
    let after = rss_mib();
    tracing::info!(
        baseline,
        after,
        "resident set (MiB) after the twins and after the hostile cases"
    );
    assert!(
        after < baseline + 48,
        "resident set {after} MiB after the hostile cases, {baseline} MiB after the twins"
    );
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
    host.shutdown().await;
}

/// A component built for another version of the WIT package is refused at load with an
/// error naming the file and what it lacks, and the plugins beside it load and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_for_another_wit_version_is_refused_and_the_others_serve() {
    rebound_tests::init_logging();
    let dir = plugin_dir(&["echo", "wrong_version"]);
    let runtime = Arc::new(Runtime::new(test_config().limits).unwrap());
    let (set, errors) = PluginSet::load_dir(
        &runtime,
        dir.path(),
        &RetryPolicy::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = format!("{:#}", errors[0]);
    assert!(error.contains("wrong_version.wasm"), "{error}");
    assert!(
        error.contains("rebound:plugin/handler@0.1.0"),
        "names the missing export: {error}"
    );
    assert_eq!(set.queues().collect::<Vec<_>>(), ["echo"]);
    assert_eq!(set.failures().count(), 1);

    // A host started on what did load serves it.
    let store = TestStore::new(Backend::Embedded).await.unwrap();
    let host = TestHost::serve(
        store.store.clone(),
        dir,
        runtime,
        set,
        test_config(),
        HostSetup::default(),
    );
    still_serving(&store, "the refused plugin").await;
    host.shutdown().await;
}
