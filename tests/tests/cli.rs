//! The `rebound` command as a user runs it: a real process, real plugins, the embedded store
//! on disk or a private `redis-server`.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rebound_tests::{RedisServer, plugin_dir};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rebound-under-test");

/// Runs `rebound` with the store flags `store` and `args`, and waits for it.
fn rebound(store: &[&str], args: &[&str]) -> Output {
    Command::new(BIN)
        .args(store)
        .args(args)
        .env_remove("REBOUND_REDIS_URL")
        .env_remove("REBOUND_DATA")
        .output()
        .expect("the rebound binary runs")
}

/// Like [`rebound`], but the command must succeed; returns its stdout.
fn rebound_ok(store: &[&str], args: &[&str]) -> String {
    let out = rebound(store, args);
    assert!(
        out.status.success(),
        "rebound {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `rebound run` in the background.
fn start_host(store: &[&str], plugins: &Path) -> Child {
    start_host_with(store, plugins, &[])
}

/// Starts `rebound run` in the background with extra flags.
fn start_host_with(store: &[&str], plugins: &Path, flags: &[&str]) -> Child {
    Command::new(BIN)
        .args(store)
        .args(["run", "--plugins"])
        .arg(plugins)
        .args(["--poll-ms", "10"])
        .args(flags)
        .env_remove("REBOUND_REDIS_URL")
        .env_remove("REBOUND_DATA")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rebound run starts")
}

/// Sends Ctrl-C's signal to the host, checks that it exits cleanly and soon, and returns
/// what it logged.
fn stop_host(mut host: Child) -> String {
    let status = Command::new("kill")
        .args(["-INT", &host.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = host.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            host.stderr.take().unwrap().read_to_string(&mut stderr).ok();
            assert!(status.success(), "host exited with {status}: {stderr}");
            assert!(stderr.contains("host stopped"), "{stderr}");
            return stderr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "host did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `rebound get ID --json` until the task reaches a final state.
fn wait_final(store: &[&str], id: &str) -> Value {
    let started = Instant::now();
    loop {
        let task: Value = serde_json::from_str(&rebound_ok(store, &["get", id, "--json"])).unwrap();
        let state = task["state"].as_str().unwrap().to_owned();
        if ["completed", "failed", "canceled"].contains(&state.as_str()) {
            return task;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "task {id} still {state}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn submit(store: &[&str], queue: &str, params: &str, extra: &[&str]) -> String {
    let mut args = vec!["submit", queue, "--params", params];
    args.extend_from_slice(extra);
    rebound_ok(store, &args).trim().to_owned()
}

#[test]
fn embedded_store_keeps_tasks_across_host_restarts() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let store = ["--data", db.to_str().unwrap()];
    let plugins = plugin_dir(&["echo", "flaky"]);

    // Submitted before any host runs; the first host finishes them.
    let first = submit(&store, "echo", r#"{"n":1}"#, &["--id", "first"]);
    assert_eq!(first, "first");
    let flaky = submit(
        &store,
        "flaky",
        r#"{"succeed_at":2}"#,
        &[
            "--max-retries",
            "3",
            "--backoff",
            "fixed",
            "--backoff-interval-ms",
            "50",
        ],
    );
    let host = start_host(&store, plugins.path());
    assert_eq!(wait_final(&store, &first)["result"], r#"{"n":1}"#);
    let flaky_done = wait_final(&store, &flaky);
    assert_eq!(flaky_done["state"], "completed");
    assert_eq!(flaky_done["attempt"], 2);
    stop_host(host);

    // Submitted while no host runs: it waits on disk for the next host.
    let second = submit(&store, "echo", r#"{"n":2}"#, &[]);
    let human = rebound_ok(&store, &["get", &second]);
    assert!(human.contains("pending"), "{human}");
    let host = start_host(&store, plugins.path());
    assert_eq!(wait_final(&store, &second)["state"], "completed");
    stop_host(host);

    // Everything finished earlier is still there after both restarts.
    assert_eq!(wait_final(&store, &first)["state"], "completed");
    let stats: Value = serde_json::from_str(&rebound_ok(&store, &["stats", "--json"])).unwrap();
    assert_eq!(stats["echo"]["completed"], 2);
    assert_eq!(stats["flaky"]["completed"], 1);
}

#[test]
fn redis_host_runs_submitted_tasks() {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let store = ["--redis", url.as_str()];
    let plugins = plugin_dir(&["echo"]);

    let host = start_host(&store, plugins.path());
    let ids: Vec<String> = (0..5)
        .map(|n| submit(&store, "echo", &format!(r#"{{"n":{n}}}"#), &[]))
        .collect();
    for id in &ids {
        assert_eq!(wait_final(&store, id)["state"], "completed");
    }
    stop_host(host);
    let stats = rebound_ok(&store, &["stats"]);
    assert!(
        stats
            .lines()
            .any(|line| line.starts_with("echo") && line.contains(" 5 ")),
        "{stats}"
    );
}

#[test]
fn tasks_of_a_killed_host_are_taken_over_uncharged() {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let store = ["--redis", url.as_str()];
    let plugins = plugin_dir(&["sleepy"]);
    let lease = ["--lease-ms", "600", "--concurrency", "2"];

    // No retries: a task charged for the crash would end failed.
    let ids: Vec<String> = (0..4)
        .map(|_| submit(&store, "sleepy", r#"{"ms":1200}"#, &["--max-retries", "0"]))
        .collect();
    let doomed = start_host_with(&store, plugins.path(), &lease);
    let doomed_id = format!("-{}", doomed.id());

    // Wait until the doomed host runs two tasks, then kill it without warning.
    let started = Instant::now();
    let mut orphans = Vec::new();
    while orphans.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "host never ran tasks"
        );
        orphans.clear();
        for id in &ids {
            let task: Value =
                serde_json::from_str(&rebound_ok(&store, &["get", id, "--json"])).unwrap();
            let owner = task["lease"]["owner"].as_str().unwrap_or("");
            if owner.ends_with(&doomed_id) {
                orphans.push(id.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut doomed = doomed;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let killed_at = Instant::now();

    let survivor = start_host_with(&store, plugins.path(), &lease);
    for id in &ids {
        let task = wait_final(&store, id);
        assert_eq!(task["state"], "completed", "{task}");
        assert_eq!(task["attempt"], 1, "{task}");
        let expected_losses = u64::from(orphans.contains(id));
        assert_eq!(task["lease_losses"], expected_losses, "{task}");
    }
    let recovered = killed_at.elapsed();
    stop_host(survivor);
    assert!(
        recovered < Duration::from_secs(10),
        "took {recovered:?} to finish the orphaned tasks"
    );
}

#[test]
fn bad_input_is_refused_with_a_message_that_names_it() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let store = ["--data", db.to_str().unwrap()];

    let cases: [(&[&str], &str); 5] = [
        (
            &["submit", "echo", "--params", "{nope"],
            "params is not valid JSON",
        ),
        (
            &["submit", "no/slash", "--params", "{}"],
            "queue name `no/slash` is invalid",
        ),
        (
            &["submit", "echo", "--backoff", "sometimes"],
            "unknown backoff strategy",
        ),
        (&["get", "missing-task"], "task `missing-task` not found"),
        (&["run", "--plugins", "/no/such/dir"], "/no/such/dir"),
    ];
    for (args, expected) in cases {
        let out = rebound(&store, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    // Read-only commands do not create a store where there is none.
    let elsewhere = data.path().join("typo").join("tasks.db");
    let out = rebound(&["--data", elsewhere.to_str().unwrap()], &["stats"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task store at"));
    assert!(!elsewhere.exists());

    // The duplicate id is refused and the original task is untouched.
    submit(&store, "echo", "{}", &["--id", "dup"]);
    let out = rebound(
        &store,
        &["submit", "echo", "--params", r#"{"x":1}"#, "--id", "dup"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("task `dup` already exists"));
    let task: Value = serde_json::from_str(&rebound_ok(&store, &["get", "dup", "--json"])).unwrap();
    assert_eq!(task["params"], "{}");
}

#[test]
fn cancel_and_retry_from_the_command_line() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let store = ["--data", db.to_str().unwrap()];

    let id = submit(&store, "echo", "{}", &["--delay-ms", "60000"]);
    assert!(rebound_ok(&store, &["cancel", &id]).contains("is canceled"));
    let out = rebound(&store, &["cancel", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot cancel task") && stderr.contains("it is canceled"),
        "{stderr}"
    );

    assert!(rebound_ok(&store, &["retry", &id]).contains("is pending again"));
    let out = rebound(&store, &["retry", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only failed or canceled"));

    // Back in the queue: a host runs it now.
    let plugins = plugin_dir(&["echo"]);
    let host = start_host(&store, plugins.path());
    assert_eq!(wait_final(&store, &id)["state"], "completed");
    stop_host(host);
}

#[test]
fn a_broken_plugin_file_is_named_and_the_others_still_load() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let store = ["--data", db.to_str().unwrap()];
    let plugins = plugin_dir(&["echo"]);
    std::fs::write(plugins.path().join("broken.wasm"), b"not a component").unwrap();

    let id = submit(&store, "echo", r#"{"still":"works"}"#, &[]);
    let host = start_host(&store, plugins.path());
    assert_eq!(wait_final(&store, &id)["state"], "completed");
    let log = stop_host(host);
    assert!(log.contains("broken.wasm"), "{log}");
}
