//! Tasks through their whole life on a real host: real compiled plugins, a real store. Every
//! case runs on a private `redis-server`, a private Redis Cluster and the embedded store. The
//! cases that are about what a plugin does run against the Python twins of the example
//! plugins too (`plugins/python/`), which take the same parameters.

use std::time::Duration;

use rebound::backoff::{RetryPolicy, Strategy};
use rebound::config::HostConfig;
use rebound::runtime::SandboxLimits;
use rebound::task::{NewTask, Task, TaskState};
use rebound_tests::{
    Backend, Lang, TestHost, TestStore, test_config, wait_for_state, wait_until_final,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

fn fixed(interval_ms: u64, max_retry_count: u32) -> RetryPolicy {
    RetryPolicy {
        backoff: Strategy::Fixed,
        backoff_interval_ms: interval_ms,
        max_retry_count,
        ..RetryPolicy::default()
    }
}

/// Submits a task straight to the store.
async fn submit(store: &TestStore, queue: &str, params: Value, retry: Option<RetryPolicy>) -> Task {
    let task = NewTask {
        retry,
        ..NewTask::new(queue, params.to_string())
    };
    store.store.create(task).await.unwrap()
}

/// Waits until the task has finished, and returns it.
async fn finished(store: &TestStore, id: &str) -> Task {
    wait_until_final(store.store.as_ref(), id, LIMIT)
        .await
        .unwrap()
}

/// Waits until the task is in `state`, and returns it.
async fn reached(store: &TestStore, id: &str, state: TaskState) -> Task {
    wait_for_state(store.store.as_ref(), id, state, LIMIT)
        .await
        .unwrap()
}

async fn echo_completes_with_its_params(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["echo"], test_config());

    let params = json!({"text": "hello", "n": [1, 2, 3]});
    let created = submit(&store, "echo", params.clone(), None).await;
    let done = finished(&store, &created.id).await;

    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.attempt, 1);
    let result: Value = serde_json::from_str(done.result.as_deref().unwrap()).unwrap();
    assert_eq!(result, params);
    assert!(done.lease.is_none(), "a finished task holds no lease");
    host.shutdown().await;
}

async fn flaky_retries_with_fixed_backoff_then_completes(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["flaky"], test_config());

    let created = submit(
        &store,
        "flaky",
        json!({"succeed_at": 3}),
        Some(fixed(100, 5)),
    )
    .await;

    // Watch the task and note when each attempt starts.
    let mut starts: Vec<(u32, u64)> = Vec::new();
    let done = loop {
        let seen = store.store.get(&created.id).await.unwrap().unwrap();
        let new_attempt = starts.last().map(|(attempt, _)| *attempt) != Some(seen.attempt);
        if let Some(started) = seen.started_ms.filter(|_| new_attempt) {
            starts.push((seen.attempt, started));
        }
        if seen.state.is_final() {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    assert_eq!(done.state, TaskState::Completed, "{done:#?}");
    assert_eq!(done.attempt, 3);
    assert_eq!(done.errors.len(), 2, "two failed attempts before success");
    let attempts: Vec<u32> = starts.iter().map(|(attempt, _)| *attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "every attempt was seen starting");
    for pair in starts.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= 100,
            "attempts {pair:?} are {gap} ms apart, less than the backoff"
        );
    }
    host.shutdown().await;
}

async fn exhausted_retries_fail_and_run_the_hook_once(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["flaky"], test_config());

    let created = submit(
        &store,
        "flaky",
        json!({"succeed_at": 10}),
        Some(fixed(10, 2)),
    )
    .await;
    let done = finished(&store, &created.id).await;

    assert_eq!(done.state, TaskState::Failed);
    assert_eq!(
        done.attempt, 3,
        "max_retry_count 2 means exactly 3 attempts"
    );
    assert_eq!(done.exhausted_hook_runs, 1);
    assert!(
        done.last_error
            .as_deref()
            .unwrap()
            .contains("attempt 3 of 3"),
        "{:?}",
        done.last_error
    );
    host.shutdown().await;
}

async fn fatal_failure_is_not_retried(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["flaky"], test_config());

    let created = submit(&store, "flaky", json!({"fatal": true}), Some(fixed(10, 5))).await;
    let done = finished(&store, &created.id).await;

    assert_eq!(done.state, TaskState::Failed);
    assert_eq!(done.attempt, 1);
    assert_eq!(
        done.exhausted_hook_runs, 0,
        "a fatal failure is not exhaustion"
    );
    assert_eq!(done.last_error.as_deref(), Some("asked to fail fatally"));
    host.shutdown().await;
}

async fn retry_after_waits_the_handlers_delay(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["flaky"], test_config());

    // The policy says 10 ms; the handler asks for 400 ms, which must win.
    let params = json!({"succeed_at": 2, "retry_after_ms": 400});
    let created = submit(&store, "flaky", params, Some(fixed(10, 3))).await;
    let retrying = reached(&store, &created.id, TaskState::Retrying).await;
    let done = finished(&store, &created.id).await;

    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.attempt, 2);
    let first_started = retrying.started_ms.unwrap();
    let second_started = done.started_ms.unwrap();
    assert!(
        second_started - first_started >= 400,
        "second attempt began {} ms after the first",
        second_started - first_started
    );
    host.shutdown().await;
}

async fn spinning_task_times_out_while_others_run(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let config = rebound::config::HostConfig {
        limits: SandboxLimits {
            exec_timeout: Duration::from_secs(1),
            ..SandboxLimits::default()
        },
        ..test_config()
    };
    let host = TestHost::start_in(lang, store.store.clone(), &["sleepy", "echo"], config);

    let spin = submit(&store, "sleepy", json!({"ms": 10_000}), Some(fixed(10, 0))).await;
    reached(&store, &spin.id, TaskState::Running).await;
    let submitted = std::time::Instant::now();

    // While sleepy spins, an echo task still gets a worker and completes.
    let echo = submit(&store, "echo", json!({"while": "spinning"}), None).await;
    let echoed = finished(&store, &echo.id).await;
    assert_eq!(echoed.state, TaskState::Completed);
    let spun = store.store.get(&spin.id).await.unwrap().unwrap();
    assert_eq!(
        spun.state,
        TaskState::Running,
        "echo finished while sleepy spun"
    );

    let failed = finished(&store, &spin.id).await;
    let took = submitted.elapsed();
    assert_eq!(failed.state, TaskState::Failed);
    let error = failed.last_error.unwrap();
    assert!(error.contains("timed out"), "{error}");
    assert!(error.starts_with("timeout:"), "{error}");
    let ran = failed.finished_ms.unwrap() - failed.started_ms.unwrap();
    assert!(
        ran < 2000,
        "the attempt ran {ran} ms, past the 1 s timeout by too much"
    );
    assert!(took < Duration::from_secs(3), "took {took:?} to fail");
    host.shutdown().await;
}

async fn deadline_stops_a_guest_blocked_in_a_wasi_sleep(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let config = rebound::config::HostConfig {
        limits: SandboxLimits {
            exec_timeout: Duration::from_millis(500),
            ..SandboxLimits::default()
        },
        ..test_config()
    };
    let host = TestHost::start_in(lang, store.store.clone(), &["sleepy"], config);
    let created = submit(
        &store,
        "sleepy",
        json!({"ms": 3_600_000, "sleep": true}),
        Some(fixed(10, 0)),
    )
    .await;
    let failed = finished(&store, &created.id).await;
    assert_eq!(failed.state, TaskState::Failed);
    let error = failed.last_error.unwrap();
    assert!(error.starts_with("timeout:"), "{error}");
    let ran = failed.finished_ms.unwrap() - failed.started_ms.unwrap();
    assert!(ran < 1500, "a 500 ms deadline let the sleep run {ran} ms");
    // The host is not stuck on the dropped instance: it shuts down at once.
    tokio::time::timeout(Duration::from_secs(5), host.shutdown())
        .await
        .expect("the host shuts down");
}

async fn canceling_a_running_task_stops_it_for_good(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let host = TestHost::start_in(lang, store.store.clone(), &["sleepy"], test_config());
    for params in [json!({"ms": 60_000}), json!({"ms": 60_000, "sleep": true})] {
        let created = submit(&store, "sleepy", params, Some(fixed(10, 5))).await;
        reached(&store, &created.id, TaskState::Running).await;

        let asked = std::time::Instant::now();
        assert_eq!(
            store.store.cancel(&created.id).await.unwrap(),
            TaskState::Running
        );
        let done = finished(&store, &created.id).await;
        let took = asked.elapsed();
        assert_eq!(done.state, TaskState::Canceled, "{done:#?}");
        assert!(took < Duration::from_secs(1), "stopping took {took:?}");

        // Never run again, although it had retries left.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let later = store.store.get(&created.id).await.unwrap().unwrap();
        assert_eq!((later.state, later.attempt), (TaskState::Canceled, 1));
    }
    host.shutdown().await;
}

async fn fuel_budget_stops_long_work_and_lets_short_work_finish(backend: Backend, lang: Lang) {
    let store = TestStore::new(backend).await.unwrap();
    let config = rebound::config::HostConfig {
        limits: SandboxLimits {
            fuel: Some(200_000_000),
            ..SandboxLimits::default()
        },
        ..test_config()
    };
    let host = TestHost::start_in(lang, store.store.clone(), &["sleepy", "echo"], config);

    // Within the budget: echo, and a few milliseconds of spinning.
    let short = submit(&store, "sleepy", json!({"ms": 2}), None).await;
    let echo = submit(&store, "echo", json!({}), None).await;
    // Over it: ten seconds of spinning burns far more than 200 million units.
    let long = submit(&store, "sleepy", json!({"ms": 10_000}), Some(fixed(10, 0))).await;

    for id in [&short.id, &echo.id] {
        let done = finished(&store, id).await;
        assert_eq!(done.state, TaskState::Completed, "{done:#?}");
    }
    let short = store.store.get(&short.id).await.unwrap().unwrap();
    assert_eq!(short.progress, 100, "sleepy reports its progress");
    let failed = finished(&store, &long.id).await;
    assert_eq!(failed.state, TaskState::Failed);
    let error = failed.last_error.unwrap();
    assert!(error.starts_with("out_of_fuel:"), "{error}");
    host.shutdown().await;
}

async fn shutdown_hands_running_tasks_back_uncharged(backend: Backend) {
    let store = TestStore::new(backend).await.unwrap();
    let config = rebound::config::HostConfig {
        shutdown_grace: Duration::from_millis(100),
        ..test_config()
    };
    let host = TestHost::start(store.store.clone(), &["sleepy"], config);
    let created = submit(&store, "sleepy", json!({"ms": 1500}), Some(fixed(10, 0))).await;
    reached(&store, &created.id, TaskState::Running).await;

    // The grace period is shorter than the task: it is interrupted and handed back.
    host.shutdown().await;
    let handed_back = store.store.get(&created.id).await.unwrap().unwrap();
    assert_eq!(handed_back.state, TaskState::Pending, "{handed_back:#?}");
    assert_eq!(
        handed_back.attempt, 0,
        "the interrupted attempt is not charged"
    );

    // With no retries at all, the next host still runs it to completion.
    let next = TestHost::start(store.store.clone(), &["sleepy"], test_config());
    let done = finished(&store, &created.id).await;
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.attempt, 1);
    next.shutdown().await;
}

async fn two_hosts_never_run_a_task_twice(backend: Backend) {
    let store = TestStore::new(backend).await.unwrap();
    let other = store.reopen().await.unwrap();
    let first = TestHost::start(store.store.clone(), &["echo"], test_config());
    let second = TestHost::start(other, &["echo"], test_config());

    let mut ids = Vec::new();
    for n in 0..60 {
        let created = submit(&store, "echo", json!({ "n": n }), None).await;
        ids.push(created.id);
    }
    for id in &ids {
        let done = finished(&store, id).await;
        assert_eq!(done.state, TaskState::Completed);
        assert_eq!(done.attempt, 1, "task {id} ran more than once");
    }
    let counts = store.store.counts("echo").await.unwrap();
    assert_eq!(counts.completed, 60);
    assert_eq!(counts.unfinished(), 0);
    first.shutdown().await;
    second.shutdown().await;
}

async fn an_idle_host_starts_a_submitted_task_without_waiting_for_its_poll(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    // A poll interval far longer than the test: only the wake-up can start the tasks soon.
    let config = HostConfig {
        poll_interval: Duration::from_secs(60),
        ..test_config()
    };
    let host = TestHost::start(ts.store.clone(), &["echo"], config);
    // Let the host claim once, find nothing, and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut waits = Vec::new();
    for n in 0..5 {
        let task = submit(&ts, "echo", json!({ "n": n }), None).await;
        let done = wait_for_state(ts.store.as_ref(), &task.id, TaskState::Completed, LIMIT)
            .await
            .unwrap();
        waits.push(done.started_ms.unwrap() - done.created_ms);
        // Idle again before the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.shutdown().await;
    eprintln!("submit → start with a 60 s poll interval: {waits:?} ms");
    assert!(waits.iter().all(|ms| *ms < 5_000), "{waits:?}");
}

rebound_tests::in_both_languages!(
    echo_completes_with_its_params,
    flaky_retries_with_fixed_backoff_then_completes,
    exhausted_retries_fail_and_run_the_hook_once,
    fatal_failure_is_not_retried,
    retry_after_waits_the_handlers_delay,
    spinning_task_times_out_while_others_run,
    fuel_budget_stops_long_work_and_lets_short_work_finish,
    deadline_stops_a_guest_blocked_in_a_wasi_sleep,
    canceling_a_running_task_stops_it_for_good,
);

rebound_tests::on_both_stores!(
    an_idle_host_starts_a_submitted_task_without_waiting_for_its_poll,
    two_hosts_never_run_a_task_twice,
    shutdown_hands_running_tasks_back_uncharged,
);
