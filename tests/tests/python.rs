//! What only Python plugins do, on a real host. (The Python twins of the example plugins
//! also run the lifecycle cases, `lifecycle.rs`, the memory cap, `sandbox.rs`, and the
//! compiled-plugin cache, `plugin_cache.rs`.)

use std::time::Duration;

use rebound::backoff::{RetryPolicy, Strategy};
use rebound::runtime::sandbox::AttemptSignals;
use rebound::runtime::{AttemptOutcome, Plugin, Runtime, SandboxLimits};
use rebound::task::{NewTask, Task, TaskState};
use rebound_tests::{Backend, Lang, TestHost, TestStore, python, test_config, wait_until_final};

/// Every Python plugin loads on one host (the first load compiles each into the
/// tests' compiled-plugin cache; `scripts/test.sh` runs this file first so that the timed
/// cases elsewhere do not share the CPU with those compiles), and each serves its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_python_example_loads_and_serves_its_queue() {
    rebound_tests::init_logging();
    let store = TestStore::new(Backend::Embedded).await.unwrap();
    let host = TestHost::start_in(
        Lang::Python,
        store.store.clone(),
        python::PLUGINS,
        test_config(),
    );
    let cases = [
        ("echo", r#"{"n": 1}"#, r#"{"n":1}"#),
        ("flaky", "{}", r#"{"succeeded_at":1}"#),
        (
            "sleepy",
            r#"{"ms": 1, "sleep": true}"#,
            r#"{"slept_ms":1,"gpu":null}"#,
        ),
        ("hog", r#"{"mb": 2}"#, r#"{"held_mb":2,"checksum":3}"#),
        // Modules the standard library imports at a first call, not at import time.
        (
            "lazy_stdlib",
            r#"{"date": "02.01.2024", "format": "%d.%m.%Y", "hex": "636166e9", "encoding": "cp1252"}"#,
            r#"{"date":"2024-01-02","weekday":"Tuesday","text":"caf\u00e9"}"#,
        ),
    ];
    assert_eq!(cases.len(), python::PLUGINS.len());
    for (queue, params, result) in cases {
        let id = store
            .store
            .create(NewTask::new(queue, params))
            .await
            .unwrap()
            .id;
        let done = wait_until_final(store.store.as_ref(), &id, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(done.state, TaskState::Completed, "{queue}: {done:#?}");
        assert_eq!(done.result.as_deref(), Some(result), "{queue}");
    }
    host.shutdown().await;
}

/// An exception the handler did not expect is retried, as Python task queues do, and the
/// task's error names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_exception_is_retried_and_named_in_the_error() {
    rebound_tests::init_logging();
    let store = TestStore::new(Backend::Embedded).await.unwrap();
    let host = TestHost::start_in(Lang::Python, store.store.clone(), &["flaky"], test_config());

    // `attempt < "soon"` raises TypeError inside the handler.
    let task = NewTask {
        retry: Some(RetryPolicy {
            backoff: Strategy::Fixed,
            backoff_interval_ms: 10,
            max_retry_count: 2,
            ..RetryPolicy::default()
        }),
        ..NewTask::new("flaky", r#"{"succeed_at": "soon"}"#)
    };
    let id = store.store.create(task).await.unwrap().id;
    let done = wait_until_final(store.store.as_ref(), &id, Duration::from_secs(20))
        .await
        .unwrap();

    assert_eq!(done.state, TaskState::Failed, "{done:#?}");
    assert_eq!(done.attempt, 3, "an exception is retried like Retry");
    assert_eq!(done.exhausted_hook_runs, 1);
    let error = done.last_error.unwrap();
    assert!(
        error.starts_with("TypeError: '<' not supported"),
        "the error names the exception: {error}"
    );
    host.shutdown().await;
}

/// A pool fills with Python instances as it does with Rust ones: every slot can run one at
/// once, although a Python component holds about a dozen core instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_of_the_pool_can_run_a_python_attempt_at_once() {
    let limits = SandboxLimits {
        pool: Some(4),
        ..SandboxLimits::default()
    };
    let runtime = Runtime::with_cache(limits, Some(&python::compiled_cache())).unwrap();
    let plugin = {
        let _loading = python::LOADING.lock().unwrap();
        Plugin::load(
            &runtime,
            &Lang::Python.plugin_wasm("sleepy"),
            &Default::default(),
        )
        .unwrap()
    };
    let task = Task::submitted(
        "t".into(),
        NewTask::new("sleepy", r#"{"ms": 300, "sleep": true}"#),
        0,
    );
    let signals = AttemptSignals::new(0);
    let attempt = || runtime.run_attempt(&plugin, &task, None, &signals);
    let outcomes = tokio::join!(attempt(), attempt(), attempt(), attempt());
    for outcome in [outcomes.0, outcomes.1, outcomes.2, outcomes.3] {
        assert!(
            matches!(outcome, AttemptOutcome::Completed(_)),
            "{outcome:?}"
        );
    }
}
