//! Faults against real processes: hosts killed with SIGKILL or stopped with SIGTERM, Redis
//! killed and restarted. The promise checked each time: no task is lost, none runs twice,
//! and a crash is not charged to a task's retry budget.
//!
//! Executions are counted from the hosts' own logs (one `attempt started` event each time a
//! handler instance is started for a task), not inferred from final states.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rebound::store::Store;
use rebound::store::redis::RedisStore;
use rebound::task::NewTask;
use rebound_tests::process::{HostProcess, Rebound, executions};
use rebound_tests::{RedisServer, plugin_dir};

const BIN: &str = env!("CARGO_BIN_EXE_rebound-under-test");

/// Adds the executions counted in each log.
fn total_executions(logs: &[String]) -> HashMap<String, u32> {
    let mut total = HashMap::new();
    for log in logs {
        for (id, n) in executions(log) {
            *total.entry(id).or_insert(0) += n;
        }
    }
    total
}

/// Waits until `host` holds leases on at least `n` of `ids`, and returns those ids.
fn leased_by(rebound: &Rebound, host: &HostProcess, ids: &[String], n: usize) -> Vec<String> {
    let suffix = format!("-{}", host.pid());
    let started = Instant::now();
    loop {
        let held: Vec<String> = ids
            .iter()
            .filter(|id| {
                let task = rebound.task(id);
                task["lease"]["owner"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(&suffix)
            })
            .cloned()
            .collect();
        if held.len() >= n {
            return held;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "host never ran {n} tasks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_hosts_run_2000_tasks_exactly_once() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["echo"]);

    // Submitted through the library: 2000 CLI processes would test process start-up.
    let ids: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = RedisStore::connect(&redis.url()).await.unwrap();
        let mut ids = Vec::new();
        for n in 0..2000 {
            let task = NewTask::new("echo", format!(r#"{{"n":{n}}}"#));
            ids.push(store.create(task).await.unwrap().id);
        }
        ids
    });
    let flags = ["--concurrency", "16"];
    let started = Instant::now();
    let a = rebound.start_host(plugins.path(), &flags);
    let b = rebound.start_host(plugins.path(), &flags);
    loop {
        let stats: serde_json::Value =
            serde_json::from_str(&rebound.ok(&["stats", "--json"])).unwrap();
        if stats["queues"]["echo"]["completed"] == 2000 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    let logs = [a.stop(), b.stop()];

    let runs = total_executions(&logs);
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "tasks not run exactly once: {twice:?}");
    assert_eq!(runs.len(), 2000);
    assert!(ids.iter().all(|id| runs.get(id) == Some(&1)));
    let by_host: Vec<usize> = logs.iter().map(|log| executions(log).len()).collect();
    assert!(
        by_host.iter().all(|n| *n > 0),
        "both hosts worked: {by_host:?}"
    );
    eprintln!("2000 tasks, 2 hosts: {took:?}, split {by_host:?}, 0 duplicates");
}

#[test]
fn tasks_of_a_killed_host_are_taken_over_uncharged() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["sleepy"]);
    let flags = ["--lease-ms", "600", "--concurrency", "2"];

    // No retries: a task charged for the crash would end failed.
    let ids: Vec<String> = (0..6)
        .map(|_| rebound.submit("sleepy", r#"{"ms":1000}"#, &["--max-retries", "0"]))
        .collect();
    let doomed = rebound.start_host(plugins.path(), &flags);
    let survivor = rebound.start_host(plugins.path(), &flags);
    let orphans = leased_by(&rebound, &doomed, &ids, 2);
    let doomed_log = doomed.kill();
    let killed_at = Instant::now();

    for id in &ids {
        let task = rebound.wait_final(id);
        assert_eq!(task["state"], "completed", "{task}");
        assert_eq!(task["attempt"], 1, "{task}");
        let losses = u64::from(orphans.contains(id));
        assert_eq!(task["lease_losses"], losses, "{task}");
    }
    let recovered = killed_at.elapsed();
    let survivor_log = survivor.stop();

    // The orphans ran twice (once cut short by the kill), every other task once.
    let runs = total_executions(&[doomed_log, survivor_log]);
    for id in &ids {
        let expected = if orphans.contains(id) { 2 } else { 1 };
        assert_eq!(runs.get(id), Some(&expected), "{id}");
    }
    assert!(
        recovered < Duration::from_secs(10),
        "recovery took {recovered:?}"
    );
    eprintln!("killed host's 2 tasks finished by the other {recovered:?} after the kill");
}

/// Kills the only host while it runs two tasks, restarts it, and checks that it finishes them
/// uncharged.
fn lone_host_recovers_after_a_kill(rebound: &Rebound, store: &str) {
    let plugins = plugin_dir(&["sleepy"]);
    let flags = ["--lease-ms", "600", "--concurrency", "2"];

    let ids: Vec<String> = (0..2)
        .map(|_| rebound.submit("sleepy", r#"{"ms":800}"#, &["--max-retries", "0"]))
        .collect();
    let host = rebound.start_host(plugins.path(), &flags);
    leased_by(rebound, &host, &ids, 2);
    let first_log = host.kill();
    let killed_at = Instant::now();

    let restarted = rebound.start_host(plugins.path(), &flags);
    for id in &ids {
        let task = rebound.wait_final(id);
        assert_eq!(task["state"], "completed", "{task}");
        let counts = (task["attempt"].as_u64(), task["lease_losses"].as_u64());
        assert_eq!(counts, (Some(1), Some(1)), "{task}\n{}", restarted.log());
    }
    let recovered = killed_at.elapsed();
    let runs = total_executions(&[first_log, restarted.stop()]);
    assert!(ids.iter().all(|id| runs.get(id) == Some(&2)), "{runs:?}");
    eprintln!(
        "lone host on {store}: 2 tasks, 4 executions (2 cut short), recovered {recovered:?} after the kill"
    );
}

#[test]
fn a_lone_host_restarted_after_a_kill_recovers_its_own_tasks_on_redis() {
    let redis = RedisServer::start().unwrap();
    lone_host_recovers_after_a_kill(&Rebound::new(BIN, &["--redis", &redis.url()]), "redis");
}

#[test]
fn a_lone_host_restarted_after_a_kill_recovers_its_own_tasks_on_the_embedded_store() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let rebound = Rebound::new(BIN, &["--data", db.to_str().unwrap()]);
    lone_host_recovers_after_a_kill(&rebound, "embedded");
}

#[test]
fn canceling_a_task_on_a_host_process_stops_it_within_a_second() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["sleepy"]);
    let a = rebound.start_host(plugins.path(), &[]);
    let b = rebound.start_host(plugins.path(), &[]);

    // Ten minutes of spinning, with retries to spare: only the cancel can end it.
    let id = rebound.submit("sleepy", r#"{"ms":600000}"#, &["--max-retries", "5"]);
    let started = Instant::now();
    while rebound.task(&id)["state"] != "running" {
        assert!(started.elapsed() < Duration::from_secs(20), "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    assert!(rebound.ok(&["cancel", &id]).contains("is running"));
    let done = rebound.wait_final(&id);
    let took = asked.elapsed();
    assert_eq!(done["state"], "canceled", "{done}");
    // wait_final polls every 50 ms and runs a process per poll: the stop itself is quicker.
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");

    std::thread::sleep(Duration::from_millis(500));
    let runs = total_executions(&[a.stop(), b.stop()]);
    assert_eq!(runs.get(&id), Some(&1), "never run again");
    assert_eq!(rebound.task(&id)["state"], "canceled");
    eprintln!("cancel of a running task on a host process: canceled {took:?} after the request");
}

#[test]
fn hosts_ride_out_a_redis_crash_without_losing_or_repeating_tasks() {
    let mut redis = RedisServer::start_durable().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["sleepy"]);

    let ids: Vec<String> = (0..40)
        .map(|_| rebound.submit("sleepy", r#"{"ms":100}"#, &["--max-retries", "0"]))
        .collect();
    let flags = ["--concurrency", "2"];
    let a = rebound.start_host(plugins.path(), &flags);
    let b = rebound.start_host(plugins.path(), &flags);

    // Crash Redis while both hosts are busy, and bring it back a second later.
    std::thread::sleep(Duration::from_millis(600));
    redis.kill();
    std::thread::sleep(Duration::from_secs(1));
    redis.restart().unwrap();

    for id in &ids {
        let task = rebound.wait_final(id);
        assert_eq!(task["state"], "completed", "{task}");
    }
    let logs = [a.stop(), b.stop()];
    let runs = total_executions(&logs);
    let completed_twice: Vec<_> = ids
        .iter()
        .filter(|id| rebound.task(id)["attempt"].as_u64() != Some(1))
        .collect();
    assert!(
        completed_twice.is_empty(),
        "charged twice: {completed_twice:?}"
    );
    let repeated: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "redis crash: {} tasks completed, {} started more than once (cut short by the crash)",
        ids.len(),
        repeated.len()
    );
}

#[test]
fn sigterm_lets_tasks_finish_or_hands_them_back_uncharged() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["sleepy"]);

    // One task finishes within the grace period, one cannot.
    let short = rebound.submit("sleepy", r#"{"ms":300}"#, &["--max-retries", "0"]);
    let long = rebound.submit("sleepy", r#"{"ms":5000}"#, &["--max-retries", "0"]);
    let flags = ["--concurrency", "2", "--shutdown-grace-ms", "1000"];
    let host = rebound.start_host(plugins.path(), &flags);
    leased_by(&rebound, &host, &[short.clone(), long.clone()], 2);
    host.stop_with("TERM", Duration::from_secs(10));

    assert_eq!(rebound.task(&short)["state"], "completed");
    let handed_back = rebound.task(&long);
    assert_eq!(handed_back["state"], "pending", "{handed_back}");
    assert_eq!(handed_back["attempt"], 0, "{handed_back}");

    let next = rebound.start_host(plugins.path(), &[]);
    let done = rebound.wait_final(&long);
    assert_eq!(
        (done["state"].as_str(), done["attempt"].as_u64()),
        (Some("completed"), Some(1))
    );
    next.stop();
}

#[test]
fn a_second_ctrl_c_ends_the_grace_period_at_once() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["sleepy"]);

    let id = rebound.submit("sleepy", r#"{"ms":60000}"#, &["--max-retries", "0"]);
    let host = rebound.start_host(plugins.path(), &[]);
    leased_by(&rebound, &host, std::slice::from_ref(&id), 1);

    // The default grace is 30 s; the second signal cuts it short.
    host.signal("INT");
    std::thread::sleep(Duration::from_millis(300));
    let log = host.stop_with("INT", Duration::from_secs(5));
    assert!(log.contains("interrupting running tasks now"), "{log}");
    let task = rebound.task(&id);
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_u64()),
        (Some("pending"), Some(0))
    );
}

#[test]
fn a_task_delayed_past_the_lease_runs_once_with_two_hosts() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["echo"]);
    let flags = ["--lease-ms", "300"];

    let id = rebound.submit("echo", "{}", &["--delay-ms", "1000"]);
    let a = rebound.start_host(plugins.path(), &flags);
    let b = rebound.start_host(plugins.path(), &flags);
    let done = rebound.wait_final(&id);
    assert_eq!(
        (done["state"].as_str(), done["attempt"].as_u64()),
        (Some("completed"), Some(1))
    );
    // Let several lease periods pass: nothing may pick it up again.
    std::thread::sleep(Duration::from_millis(700));
    let runs = total_executions(&[a.stop(), b.stop()]);
    assert_eq!(runs.get(&id), Some(&1));
    eprintln!("task delayed 1 s past a 300 ms lease, two hosts: 1 execution");
}

/// SIGTERM while the host is still starting (its plugins loaded, its workers not yet
/// running) stops it cleanly once it has started, rather than killing it by the signal's
/// default action.
#[test]
fn sigterm_during_start_up_stops_the_host_cleanly() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["echo", "sleepy"]);
    let host = rebound.start_host(plugins.path(), &[]);
    let started = std::time::Instant::now();
    while !host.log().contains("plugin loaded") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = host.stop_with("TERM", Duration::from_secs(15));
    assert!(log.contains("shutting down"), "{log}");
}
