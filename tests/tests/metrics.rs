//! Metrics as Prometheus sees them: a real host process runs real tasks, `promtool` checks
//! its `/metrics`, and a private Prometheus server scrapes it and answers a query.
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus` package, which the test command
//! installs).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebound_tests::process::{HostProcess, Rebound, http_get, try_http_get};
use rebound_tests::{free_port, plugin_dir};
use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_rebound-under-test");

/// A host on a fresh embedded store serving echo, flaky and sleepy, with HTTP on a free
/// port, and the tasks it ran: echo completions, a retry, a fatal failure and a timeout.
fn host_with_history() -> (TempDir, Rebound, HostProcess, TempDir) {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("tasks.db");
    let rebound = Rebound::new(BIN, &["--data", db.to_str().unwrap()]);
    let plugins = plugin_dir(&["echo", "flaky", "sleepy"]);
    let host = rebound.start_host(
        plugins.path(),
        &[
            "--http",
            "127.0.0.1:0",
            "--exec-timeout-ms",
            "300",
            "--fuel",
            "100000000000",
            "--gpu-probe",
            "none",
        ],
    );
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(rebound.submit("echo", &format!(r#"{{"n":{n}}}"#), &[]));
    }
    let retry = [
        "--max-retries",
        "2",
        "--backoff",
        "fixed",
        "--backoff-interval-ms",
        "10",
    ];
    ids.push(rebound.submit("flaky", r#"{"succeed_at":2}"#, &retry));
    ids.push(rebound.submit("flaky", r#"{"fatal":true}"#, &[]));
    ids.push(rebound.submit("sleepy", r#"{"ms":5000}"#, &["--max-retries", "0"]));
    for id in &ids {
        rebound.wait_final(id);
    }
    (data, rebound, host, plugins)
}

/// The value of the one sample of `series` (exact name and labels as rendered).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_real_scrape_passes_promtool_and_counts_what_ran() {
    let (_data, _rebound, host, _plugins) = host_with_history();
    let addr = host.http_address();
    // Queue depth is refreshed once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = http_get(&addr, "/metrics");
    host.stop();

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), scrape.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{scrape}"
    );

    let expect = [
        (
            r#"rebound_attempts_total{queue="echo",outcome="completed"}"#,
            5.0,
        ),
        (
            r#"rebound_attempts_total{queue="flaky",outcome="retry"}"#,
            1.0,
        ),
        (
            r#"rebound_attempts_total{queue="flaky",outcome="completed"}"#,
            1.0,
        ),
        (
            r#"rebound_attempts_total{queue="flaky",outcome="failed"}"#,
            1.0,
        ),
        (
            r#"rebound_attempts_total{queue="sleepy",outcome="timeout"}"#,
            1.0,
        ),
        (
            r#"rebound_queue_depth_tasks{queue="echo",state="completed"}"#,
            5.0,
        ),
        (
            r#"rebound_queue_depth_tasks{queue="sleepy",state="failed"}"#,
            1.0,
        ),
        (r#"rebound_running_instances{queue="echo"}"#, 0.0),
        (r#"rebound_task_duration_seconds_count{queue="echo"}"#, 5.0),
        (r#"rebound_instantiation_seconds_count{queue="echo"}"#, 5.0),
        (r#"rebound_queue_wait_seconds_count{queue="echo"}"#, 5.0),
    ];
    for (series, value) in expect {
        assert_eq!(
            sample(&scrape, series),
            Some(value),
            "{series} in\n{scrape}"
        );
    }
    // One load of echo, labelled with its version: 12 hex digits of its file's hash.
    let loads: Vec<&str> = scrape
        .lines()
        .filter_map(|line| {
            line.strip_prefix(r#"rebound_plugin_loads_total{plugin="echo",version=""#)
        })
        .collect();
    assert_eq!(loads.len(), 1, "{scrape}");
    let (version, count) = loads[0].split_once(r#""} "#).expect("a version label");
    assert!(
        version.len() == 12 && version.chars().all(|c| c.is_ascii_hexdigit()),
        "{version}"
    );
    assert_eq!(count, "1");
    let fuel = sample(&scrape, r#"rebound_fuel_consumed_total{queue="echo"}"#);
    assert!(fuel.is_some_and(|fuel| fuel > 0.0), "{scrape}");
    assert!(!scrape.contains("task_id"), "no task ids in labels");
}

/// A Prometheus server of the test's own, scraping one target every 500 ms.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: rebound\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs (apt-get install prometheus)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query, through Prometheus's HTTP API; `Null` while the
    /// server is not up yet.
    fn query(&self, promql: &str) -> Value {
        let addr = format!("127.0.0.1:{}", self.port);
        match try_http_get(&addr, &format!("/api/v1/query?query={}", encode(promql))) {
            Ok(body) => serde_json::from_str(&body).unwrap(),
            Err(_) => Value::Null,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_the_host_and_answers_a_query() {
    let (_data, _rebound, host, _plugins) = host_with_history();
    let prometheus = Prometheus::start(&host.http_address());

    let query = r#"rebound_attempts_total{queue="echo",outcome="completed"}"#;
    let started = Instant::now();
    let value = loop {
        // Prometheus answers once it is up, and has the series after its first scrape.
        let answer = prometheus.query(query);
        if let Some(value) = answer["data"]["result"][0]["value"][1].as_str() {
            break value.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Prometheus never had {query}; its log:\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "Prometheus answered {query} = {value} after {:?}",
        started.elapsed()
    );
    assert_eq!(value, "5");
    host.stop();
}
