//! The GPU gate on a real host: tasks that need a GPU start only when a (scripted) GPU has
//! the memory and idle capacity they ask for, wait without spending attempts, and do not
//! hold up other tasks. Every case runs on Redis, a Redis cluster and the embedded store.

use std::time::{Duration, Instant};

use rebound::config::HostConfig;
use rebound::gpu::{GpuGate, GpuRequirement};
use rebound::task::{NewTask, Task, TaskState};
use rebound_tests::gpu::{ScriptedProbe, gpu};
use rebound_tests::{
    Backend, HostSetup, TestHost, TestStore, test_config, wait_for, wait_until_final,
};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);
/// The gate's interval in these tests: short, so they run quickly.
const GATE_INTERVAL: Duration = Duration::from_millis(200);

/// A task for `sleepy` that blocks in a WASI sleep for `ms`, needing `gpu` (if any).
fn sleeper(id: &str, ms: u64, gpu: Option<GpuRequirement>) -> NewTask {
    NewTask {
        id: Some(id.to_owned()),
        gpu,
        ..NewTask::new("sleepy", json!({ "ms": ms, "sleep": true }).to_string())
    }
}

fn needs(gib: Option<f64>, utilization: Option<f64>) -> GpuRequirement {
    GpuRequirement::from_settings(gib, utilization).unwrap()
}

fn config() -> HostConfig {
    HostConfig {
        gpu_interval: GATE_INTERVAL,
        ..test_config()
    }
}

fn host(ts: &TestStore, plugins: &[&str], gate: GpuGate, manifests: &[(&str, &str)]) -> TestHost {
    let setup = HostSetup {
        gate: Some(gate),
        manifests,
        ..HostSetup::default()
    };
    TestHost::start_with(ts.store.clone(), plugins, config(), setup)
}

async fn finished(ts: &TestStore, id: &str) -> Task {
    wait_until_final(ts.store.as_ref(), id, LIMIT)
        .await
        .unwrap()
}

fn result(task: &Task) -> Value {
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    serde_json::from_str(task.result.as_deref().unwrap()).unwrap()
}

/// The most tasks whose [started, finished) spans overlap at one moment.
fn most_at_once(tasks: &[Task]) -> usize {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for task in tasks {
        edges.push((task.started_ms.unwrap(), 1));
        // Ends sort before starts at the same millisecond: a task starting as another
        // ends did not run beside it.
        edges.push((task.finished_ms.unwrap(), -1));
    }
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

async fn two_of_three_tasks_fit_and_the_third_waits_for_one_to_end(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (_probe, gate) = ScriptedProbe::gate(vec![gpu(0, 10.0, 0)], GATE_INTERVAL);
    let host = host(&ts, &["sleepy"], gate, &[]);

    for id in ["a", "b", "c"] {
        let task = sleeper(id, 1500, Some(needs(Some(4.0), None)));
        ts.store.create(task).await.unwrap();
    }
    let mut tasks = Vec::new();
    for id in ["a", "b", "c"] {
        tasks.push(finished(&ts, id).await);
    }
    host.shutdown().await;

    assert_eq!(
        most_at_once(&tasks),
        2,
        "10 GiB holds two 4 GiB tasks: {tasks:#?}"
    );
    tasks.sort_by_key(|task| task.started_ms);
    let first_end = tasks[..2].iter().map(|t| t.finished_ms.unwrap()).min();
    let third = &tasks[2];
    assert!(
        third.started_ms >= first_end,
        "the third started before one ended"
    );
    let waited = third.started_ms.unwrap() - first_end.unwrap();
    eprintln!("third task started {waited} ms after the first one ended");
    assert!(
        waited < 2000,
        "the third started {waited} ms after a slot freed up"
    );
    for task in &tasks {
        assert_eq!(
            task.attempt, 1,
            "waiting at the gate costs no attempt: {task:#?}"
        );
        assert_eq!(result(task)["gpu"], 0);
    }
}

async fn busy_gpu_admits_nothing_until_utilization_drops(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (probe, gate) = ScriptedProbe::gate(vec![gpu(0, 40.0, 90)], GATE_INTERVAL);
    // The requirement comes from the plugin's manifest, in the old framework's units.
    let manifest = "[gpu]\nmin_gpu_memory_gb = 1.5\nmax_gpu_utilization = 50\n";
    let host = host(&ts, &["sleepy"], gate, &[("sleepy", manifest)]);

    for id in ["x", "y"] {
        ts.store.create(sleeper(id, 50, None)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in ["x", "y"] {
        let task = ts.store.get(id).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Pending, "{task:#?}");
        assert_eq!(task.attempt, 0, "held tasks are not charged: {task:#?}");
    }

    let dropped = Instant::now();
    probe.set(vec![gpu(0, 40.0, 10)]);
    for id in ["x", "y"] {
        finished(&ts, id).await;
    }
    let took = dropped.elapsed();
    host.shutdown().await;
    eprintln!(
        "tasks finished {took:?} after utilization dropped (gate interval {GATE_INTERVAL:?})"
    );
    // One gate interval to see the drop, one for the held task to be claimable again, plus
    // the run itself and slack for a loaded machine.
    assert!(
        took < GATE_INTERVAL * 2 + Duration::from_secs(2),
        "{took:?}"
    );
}

async fn tasks_go_to_the_idle_gpu_and_the_plugin_sees_its_index(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let gpus = vec![gpu(0, 1.0, 97), gpu(1, 70.0, 3)];
    let (_probe, gate) = ScriptedProbe::gate(gpus, GATE_INTERVAL);
    let host = host(&ts, &["sleepy"], gate, &[]);

    let ids = ["g1", "g2", "g3"];
    for id in ids {
        let task = sleeper(id, 20, Some(needs(Some(8.0), Some(80.0))));
        ts.store.create(task).await.unwrap();
    }
    for id in ids {
        let task = finished(&ts, id).await;
        assert_eq!(result(&task)["gpu"], 1, "{task:#?}");
    }
    host.shutdown().await;
}

async fn without_a_gpu_gpu_tasks_wait_and_the_rest_run(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    let (_probe, gate) = ScriptedProbe::gate(Vec::new(), GATE_INTERVAL);
    let host = host(&ts, &["sleepy", "echo"], gate, &[]);

    // More held tasks than the host has slots, all of higher priority than the others.
    let mut gated = Vec::new();
    for n in 0..20 {
        let task = NewTask {
            priority: 5,
            ..sleeper(&format!("needs-gpu-{n}"), 10, Some(needs(Some(1.0), None)))
        };
        gated.push(ts.store.create(task).await.unwrap());
    }
    // Tasks behind them in the same queue, and in another queue, run regardless.
    let mut others = Vec::new();
    for n in 0..5 {
        others.push(
            ts.store
                .create(sleeper(&format!("cpu-{n}"), 10, None))
                .await
                .unwrap(),
        );
        let echo = NewTask::new("echo", json!({ "n": n }).to_string());
        others.push(ts.store.create(echo).await.unwrap());
    }
    for task in &others {
        let done = finished(&ts, &task.id).await;
        assert_eq!(done.state, TaskState::Completed, "{done:#?}");
        if done.queue == "sleepy" {
            assert_eq!(result(&done)["gpu"], Value::Null, "it needed no GPU");
        }
    }

    tokio::time::sleep(Duration::from_secs(5)).await;
    for held in &gated {
        // Every gate interval the host claims a held task again and hands it back at once,
        // so a read may catch it in between; it must come back to pending, uncharged.
        let task = wait_for(
            ts.store.as_ref(),
            &held.id,
            Duration::from_secs(2),
            |task| task.state == TaskState::Pending,
        )
        .await
        .unwrap();
        assert_eq!(
            task.attempt, 0,
            "5 s at a closed gate cost nothing: {task:#?}"
        );
        assert_eq!(task.errors, Vec::<String>::new());
    }

    // The host tells `rebound stats` why the task waits.
    let hosts = ts.store.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1, "{hosts:#?}");
    assert!(hosts[0].gate.gpus.is_empty());
    assert_eq!(hosts[0].held_at_gate.get("sleepy"), Some(&20), "{hosts:#?}");
    host.shutdown().await;
}

async fn reservations_are_returned_however_a_task_ends(backend: Backend) {
    let ts = TestStore::new(backend).await.unwrap();
    // Room for one 4 GiB task at a time.
    let (_probe, gate) = ScriptedProbe::gate(vec![gpu(0, 4.0, 0)], GATE_INTERVAL);
    let watch = gate.clone();
    let manifest = "[gpu]\nmin_gpu_memory_gb = 4\n";
    let host = host(
        &ts,
        &["flaky", "sleepy"],
        gate,
        &[("flaky", manifest), ("sleepy", manifest)],
    );

    // A fatal failure, a cancellation mid-run, then a task that completes:
    // each needs the whole GPU, so each runs only if the one before gave its memory back.
    let fatal = NewTask {
        id: Some("fatal".into()),
        ..NewTask::new("flaky", json!({ "fatal": true }).to_string())
    };
    ts.store.create(fatal).await.unwrap();
    assert_eq!(finished(&ts, "fatal").await.state, TaskState::Failed);
    let canceled = ts
        .store
        .create(sleeper("canceled", 60_000, None))
        .await
        .unwrap();
    rebound_tests::wait_for_state(ts.store.as_ref(), &canceled.id, TaskState::Running, LIMIT)
        .await
        .unwrap();
    ts.store.cancel(&canceled.id).await.unwrap();
    assert_eq!(finished(&ts, "canceled").await.state, TaskState::Canceled);
    ts.store.create(sleeper("last", 10, None)).await.unwrap();
    assert_eq!(finished(&ts, "last").await.state, TaskState::Completed);

    host.shutdown().await;
    let snapshot = watch.snapshot();
    assert_eq!(snapshot.reservations, 0, "{snapshot:#?}");
    assert_eq!(snapshot.reserved_bytes.get(&0), Some(&0), "{snapshot:#?}");
}

rebound_tests::on_both_stores!(
    two_of_three_tasks_fit_and_the_third_waits_for_one_to_end,
    busy_gpu_admits_nothing_until_utilization_drops,
    tasks_go_to_the_idle_gpu_and_the_plugin_sees_its_index,
    without_a_gpu_gpu_tasks_wait_and_the_rest_run,
    reservations_are_returned_however_a_task_ends,
);
