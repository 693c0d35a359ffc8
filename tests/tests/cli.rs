//! The `rebound` command as a user runs it: a real process, real plugins, the embedded store
//! on disk or a private `redis-server`.

use rebound_tests::process::Rebound;
use rebound_tests::{RedisSentinel, RedisServer, plugin_dir};
use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_rebound-under-test");

/// `rebound` on an embedded store in a fresh temporary directory.
fn embedded() -> (TempDir, Rebound) {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let rebound = Rebound::new(BIN, &["--data", db.to_str().unwrap()]);
    (data, rebound)
}

#[test]
fn embedded_store_keeps_tasks_across_host_restarts() {
    let (_data, rebound) = embedded();
    let plugins = plugin_dir(&["echo", "flaky"]);

    // Submitted before any host runs; the first host finishes them.
    let first = rebound.submit("echo", r#"{"n":1}"#, &["--id", "first"]);
    assert_eq!(first, "first");
    let retry = [
        "--max-retries",
        "3",
        "--backoff",
        "fixed",
        "--backoff-interval-ms",
        "50",
    ];
    let flaky = rebound.submit("flaky", r#"{"succeed_at":2}"#, &retry);
    let host = rebound.start_host(plugins.path(), &[]);
    assert_eq!(rebound.wait_final(&first)["result"], r#"{"n":1}"#);
    let flaky_done = rebound.wait_final(&flaky);
    assert_eq!(flaky_done["state"], "completed");
    assert_eq!(flaky_done["attempt"], 2);
    host.stop();

    // Submitted while no host runs: it waits on disk for the next host.
    let second = rebound.submit("echo", r#"{"n":2}"#, &[]);
    let human = rebound.ok(&["get", &second]);
    assert!(human.contains("pending"), "{human}");
    let host = rebound.start_host(plugins.path(), &[]);
    assert_eq!(rebound.wait_final(&second)["state"], "completed");
    host.stop();

    // Everything finished earlier is still there after both restarts.
    assert_eq!(rebound.task(&first)["state"], "completed");
    let stats: Value = serde_json::from_str(&rebound.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["queues"]["echo"]["completed"], 2);
    assert_eq!(stats["queues"]["flaky"]["completed"], 1);

    // Listed page by page: one task a page, then the end.
    let list = |cursor: Option<&str>| -> Value {
        let mut args = vec![
            "list",
            "echo",
            "--state",
            "completed",
            "--limit",
            "1",
            "--json",
        ];
        if let Some(cursor) = cursor {
            args.extend(["--cursor", cursor]);
        }
        serde_json::from_str(&rebound.ok(&args)).unwrap()
    };
    let first_page = list(None);
    assert_eq!(first_page["tasks"][0]["id"], "first");
    let second_page = list(first_page["next"].as_str());
    assert_eq!(second_page["tasks"][0]["id"], second.as_str());
    let human = rebound.ok(&["list", "echo", "--state", "completed"]);
    assert!(
        human.contains("first") && human.contains(&second),
        "{human}"
    );
}

#[test]
fn redis_host_runs_submitted_tasks() {
    let redis = RedisServer::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &redis.url()]);
    let plugins = plugin_dir(&["echo"]);

    let host = rebound.start_host(plugins.path(), &[]);
    let ids: Vec<String> = (0..5)
        .map(|n| rebound.submit("echo", &format!(r#"{{"n":{n}}}"#), &[]))
        .collect();
    for id in &ids {
        assert_eq!(rebound.wait_final(id)["state"], "completed");
    }
    host.stop();
    let stats = rebound.ok(&["stats"]);
    let echo = stats.lines().find(|line| line.starts_with("echo")).unwrap();
    let counts: Vec<&str> = echo.split_whitespace().skip(1).collect();
    assert_eq!(counts, ["0", "0", "0", "5", "0", "0"], "{stats}");
}

#[test]
fn redis_behind_a_sentinel() {
    let sentinel = RedisSentinel::start().unwrap();
    let rebound = Rebound::new(BIN, &["--redis", &sentinel.url()]);
    let plugins = plugin_dir(&["echo"]);

    let host = rebound.start_host(plugins.path(), &[]);
    let id = rebound.submit("echo", r#"{"via":"sentinel"}"#, &[]);
    assert_eq!(rebound.wait_final(&id)["result"], r#"{"via":"sentinel"}"#);
    host.stop();
}

#[test]
fn redis_over_tls_with_a_private_certificate_authority() {
    let redis = RedisServer::start_tls().unwrap();
    let ca = redis.ca_file();
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let rebound = Rebound::new(BIN, &["--redis", &url, "--redis-ca", ca.to_str().unwrap()]);
    let plugins = plugin_dir(&["echo"]);

    let host = rebound.start_host(plugins.path(), &[]);
    let id = rebound.submit("echo", r#"{"over":"tls"}"#, &[]);
    assert_eq!(rebound.wait_final(&id)["result"], r#"{"over":"tls"}"#);
    host.stop();

    // Without the CA, the server's certificate is not trusted.
    let untrusting = Rebound::new(BIN, &["--redis", &url]);
    let out = untrusting.output(&["stats"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");

    // A password never reaches the error message.
    let port = rebound_tests::free_port().unwrap();
    let secret = Rebound::new(
        BIN,
        &["--redis", &format!("redis://:hunter2@127.0.0.1:{port}")],
    );
    let stderr = String::from_utf8_lossy(&secret.output(&["stats"]).stderr).into_owned();
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // A CA file with a plain redis:// URL is a mistake worth naming.
    let plain = RedisServer::start().unwrap();
    let confused = Rebound::new(
        BIN,
        &["--redis", &plain.url(), "--redis-ca", ca.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&confused.output(&["stats"]).stderr).into_owned();
    assert!(stderr.contains("not a rediss:// URL"), "{stderr}");
}

#[test]
fn bad_input_is_refused_with_a_message_that_names_it() {
    let (data, rebound) = embedded();
    let cases: [(&[&str], &str); 11] = [
        (
            &["submit", "echo", "--params", "{nope"],
            "params is not valid JSON",
        ),
        (&["submit", "no/slash"], "queue name `no/slash` is invalid"),
        (
            &["submit", "echo", "--backoff", "sometimes"],
            "unknown backoff strategy",
        ),
        (
            &["submit", "echo", "--delay-ms", "99999999999999"],
            "the longest wait before a task runs is 366 days",
        ),
        (&["get", "missing-task"], "task `missing-task` not found"),
        (&["run", "--plugins", "/no/such/dir"], "/no/such/dir"),
        (
            &["run", "--plugins", ".", "--memory-mb", "0"],
            "invalid setting `limits.memory_mb` (from command-line flags): 0 is out of range",
        ),
        (
            &["submit", "echo", "--run-at", "2026-12-24T18:00:00+25:00"],
            "is not an RFC 3339 time",
        ),
        (
            &["list", "echo", "--state", "done"],
            "unknown task state `done`",
        ),
        (
            &["list", "echo", "--state", "pending", "--limit", "0"],
            "--limit",
        ),
        (
            &["list", "echo", "--state", "pending", "--cursor=-1"],
            "cursor `-1` is not one a listing gave",
        ),
    ];
    for (args, expected) in cases {
        let out = rebound.output(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }

    // Read-only commands do not create a store where there is none.
    let elsewhere = data.path().join("typo").join("tasks.db");
    let typo = Rebound::new(BIN, &["--data", elsewhere.to_str().unwrap()]);
    let out = typo.output(&["stats"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task store at"));
    assert!(!elsewhere.exists());

    // The duplicate id is refused and the original task is untouched.
    rebound.submit("echo", "{}", &["--id", "dup"]);
    let out = rebound.output(&["submit", "echo", "--params", r#"{"x":1}"#, "--id", "dup"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("task `dup` already exists"));
    assert_eq!(rebound.task("dup")["params"], "{}");
}

#[test]
fn cancel_and_retry_from_the_command_line() {
    let (_data, rebound) = embedded();
    let id = rebound.submit("echo", "{}", &["--delay", "1m"]);
    let task = rebound.task(&id);
    let delay = task["run_at_ms"].as_u64().unwrap() - task["created_ms"].as_u64().unwrap();
    assert!((59_000..=60_000).contains(&delay), "{task}");
    // A time in the past runs at once; one beyond the longest delay is refused.
    let past = rebound.submit("echo", "{}", &["--run-at", "2020-01-01T00:00:00Z"]);
    let task = rebound.task(&past);
    assert_eq!(task["run_at_ms"], task["created_ms"], "{task}");
    let out = rebound.output(&["submit", "echo", "--run-at", "2099-01-01T00:00:00Z"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("366 days"));
    let out = rebound.output(&["submit", "echo", "--delay", "soon"]);
    assert!(!out.status.success());
    rebound.ok(&["cancel", &past]);
    assert!(rebound.ok(&["cancel", &id]).contains("is canceled"));
    let out = rebound.output(&["cancel", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot cancel task") && stderr.contains("it is canceled"),
        "{stderr}"
    );

    assert!(rebound.ok(&["retry", &id]).contains("is pending again"));
    let out = rebound.output(&["retry", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only failed or canceled"));

    // Back in the queue: a host runs it now.
    let plugins = plugin_dir(&["echo"]);
    let host = rebound.start_host(plugins.path(), &[]);
    assert_eq!(rebound.wait_final(&id)["state"], "completed");
    host.stop();
}

#[test]
fn a_broken_plugin_file_is_named_and_the_others_still_load() {
    let (_data, rebound) = embedded();
    let plugins = plugin_dir(&["echo"]);
    std::fs::write(plugins.path().join("broken.wasm"), b"not a component").unwrap();

    let id = rebound.submit("echo", r#"{"still":"works"}"#, &[]);
    let host = rebound.start_host(plugins.path(), &[]);
    assert_eq!(rebound.wait_final(&id)["state"], "completed");
    let log = host.stop();
    assert!(log.contains("broken.wasm"), "{log}");
}

#[test]
fn gpu_requirements_from_the_command_line_and_a_host_without_a_gpu() {
    let (_data, rebound) = embedded();
    let plugins = plugin_dir(&["sleepy", "echo"]);

    let task: Value = serde_json::from_str(&rebound.submit(
        "sleepy",
        r#"{"ms":10}"#,
        &["--id", "big", "--min-gpu-memory-gb", "1.5", "--json"],
    ))
    .unwrap();
    assert_eq!(task["gpu"]["memory_bytes"], 1_610_612_736u64);
    // The old framework's name still works, with a warning.
    let old = rebound.output(&[
        "submit",
        "sleepy",
        "--id",
        "old",
        "--min-gpu-utilization",
        "40",
        "--json",
    ]);
    assert!(old.status.success());
    assert!(String::from_utf8_lossy(&old.stderr).contains("deprecated"));
    let old: Value = serde_json::from_slice(&old.stdout).unwrap();
    assert_eq!(old["gpu"]["max_utilization"], 40);
    let bad = rebound.output(&["submit", "sleepy", "--min-gpu-memory-gb", "-2"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("min_gpu_memory_gb"));
    let plain = rebound.submit("echo", "{}", &[]);

    let host = rebound.start_host(
        plugins.path(),
        &[
            "--gpu-probe",
            "none",
            "--gpu-interval-ms",
            "100",
            "--http",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(rebound.wait_final(&plain)["state"], "completed");
    let addr = host.http_address();
    // Wait until the host has published a report that holds both GPU tasks.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let stats = loop {
        let stats = rebound.ok(&["stats"]);
        if stats.contains("held at the GPU gate: 2 task(s) of sleepy") {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(stats.contains("GPU gate closed: no GPU present"), "{stats}");
    let metrics = rebound_tests::process::http_get(&addr, "/metrics");
    assert!(
        metrics.contains(r#"rebound_gate_waiting_tasks{queue="sleepy"} 2"#),
        "{metrics}"
    );
    assert_eq!(
        rebound_tests::process::http_get(&addr, "/healthz").trim(),
        r#"{"status":"ok"}"#
    );
    let log = host.stop();
    assert!(log.contains("no GPU present"), "{log}");
    for id in ["big", "old"] {
        let task = rebound.task(id);
        assert_eq!(task["state"], "pending", "{task}");
        assert_eq!(task["attempt"], 0, "{task}");
    }
}

/// Every command's `--json` output parses back, with the fields scripts rely on.
#[test]
fn json_output_of_every_command_parses_back() {
    let (data, rebound) = embedded();
    let json = |args: &[&str]| -> Value {
        let out = rebound.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|err| panic!("{args:?}: {err}: {out}"))
    };

    let task = json(&["submit", "echo", "--id", "j1", "--delay", "1h", "--json"]);
    assert_eq!(task["id"], "j1");
    assert_eq!(json(&["get", "j1", "--json"])["state"], "pending");
    let page = json(&["list", "echo", "--state", "pending", "--json"]);
    assert_eq!(page["tasks"][0]["id"], "j1");
    assert_eq!(page["next"], Value::Null);
    assert_eq!(
        json(&["cancel", "j1", "--json"]),
        serde_json::json!({"id": "j1", "state": "canceled"})
    );
    assert_eq!(json(&["retry", "j1", "--json"])["state"], "pending");
    let stats = json(&["stats", "--json"]);
    assert_eq!(stats["queues"]["echo"]["pending"], 1);
    assert_eq!(stats["hosts"], serde_json::json!([]));
    let config = json(&["config", "--json"]);
    assert_eq!(config["settings"]["host"]["concurrency"], 8);

    let plugins = plugin_dir(&["echo"]);
    std::fs::write(plugins.path().join("broken.wasm"), b"not wasm").unwrap();
    let out = rebound.output(&[
        "plugins",
        "--plugins",
        plugins.path().to_str().unwrap(),
        "--json",
    ]);
    assert!(
        !out.status.success(),
        "a plugin that does not load fails the check"
    );
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checked = checked["plugins"].as_array().unwrap();
    assert_eq!(checked.len(), 2);
    assert!(
        checked[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("broken.wasm")
    );
    assert_eq!(checked[0]["loaded"], false);
    assert!(
        checked[0]["error"]
            .as_str()
            .unwrap()
            .contains("broken.wasm")
    );
    assert_eq!(checked[1]["name"], "echo");
    assert_eq!(checked[1]["loaded"], true);

    // A bulk submission: every good line becomes a task, a bad one is named by number.
    let lines = data.path().join("tasks.jsonl");
    std::fs::write(
        &lines,
        "{\"params\":{\"n\":1},\"id\":\"bulk-1\"}\n\n{\"params\":{\"n\":2},\"priority\":3}\n\
         {\"prams\":{}}\n{\"params\":{\"n\":4}}\n",
    )
    .unwrap();
    let out = rebound.output(&[
        "submit",
        "echo",
        "--file",
        lines.to_str().unwrap(),
        "--json",
    ]);
    assert!(!out.status.success());
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["ids"].as_array().unwrap().len(), 3, "{result}");
    assert_eq!(result["ids"][0], "bulk-1");
    let failed = result["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].as_str().unwrap().starts_with("line 4:"),
        "{failed:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 line(s)"));
    assert_eq!(json(&["stats", "--json"])["queues"]["echo"]["pending"], 4);

    // A byte-order mark is skipped; a line that is not UTF-8 or not an object is named alone.
    let mut bytes = b"\xef\xbb\xbf{\"id\":\"bom-1\"}\n".to_vec();
    bytes.extend_from_slice(b"{\"params\":\"caf\xe9\"}\n[{\"n\":1}]\n{\"id\":\"bom-4\"}\r\n");
    std::fs::write(&lines, bytes).unwrap();
    let out = rebound.output(&[
        "submit",
        "echo",
        "--file",
        lines.to_str().unwrap(),
        "--json",
    ]);
    assert!(!out.status.success());
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["ids"],
        serde_json::json!(["bom-1", "bom-4"]),
        "{result}"
    );
    let failed = result["failed"].to_string();
    assert!(failed.contains("line 2: not UTF-8"), "{failed}");
    assert!(
        failed.contains("line 3: expected a JSON object"),
        "{failed}"
    );

    // Flags that set what the lines carry are refused beside --file.
    let out = rebound.output(&[
        "submit",
        "echo",
        "--file",
        lines.to_str().unwrap(),
        "--priority",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
