//! The `rebound` command run as processes, the way users and operators run it.
//!
//! A test names the binary (its `CARGO_BIN_EXE_rebound-under-test`) and the store flags once,
//! in a [`Rebound`], then submits, inspects and runs hosts through it. A host's log goes to a
//! file, never to a pipe that nobody reads (a chatty host would block on a full pipe).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// How long a task may take to finish before a test gives up on it.
const TASK_LIMIT: Duration = Duration::from_secs(60);

/// The `rebound` binary with a fixed set of store flags.
#[derive(Debug, Clone)]
pub struct Rebound {
    bin: PathBuf,
    store: Vec<String>,
}

impl Rebound {
    /// Runs `bin` with `store` flags (`--redis URL` or `--data PATH`) before every command.
    pub fn new(bin: impl Into<PathBuf>, store: &[&str]) -> Self {
        Rebound {
            bin: bin.into(),
            store: store.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The command, with none of the caller's `REBOUND_*` settings: a test sees only the
    /// settings it gives.
    fn command(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command.args(&self.store);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REBOUND_") {
                command.env_remove(name);
            }
        }
        // Compiled plugins are cached in a folder of this test process, not the user's.
        command.env("XDG_CACHE_HOME", test_cache_home());
        command
    }

    /// Runs a command and waits for it.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("the rebound binary runs")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "rebound {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("output is UTF-8")
    }

    /// Submits a task and returns its id.
    pub fn submit(&self, queue: &str, params: &str, extra: &[&str]) -> String {
        let mut args = vec!["submit", queue, "--params", params];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_owned()
    }

    /// The task as `rebound get ID --json` shows it.
    pub fn task(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", id, "--json"])).expect("get --json is JSON")
    }

    /// Polls the task until it reaches a final state, and returns it.
    pub fn wait_final(&self, id: &str) -> Value {
        let started = Instant::now();
        loop {
            let task = self.task(id);
            let state = task["state"].as_str().unwrap_or_default();
            if ["completed", "failed", "canceled"].contains(&state) {
                return task;
            }
            assert!(
                started.elapsed() < TASK_LIMIT,
                "task {id} still {state} after {TASK_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `rebound run` on `plugins` with extra `flags`, polling every 10 ms.
    pub fn start_host(&self, plugins: &Path, flags: &[&str]) -> HostProcess {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("host.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command()
            .args(["--log-format", "json", "run", "--plugins"])
            .arg(plugins)
            .args(["--poll-ms", "10"])
            .args(flags)
            .env("RUST_LOG", "info,rebound::scheduler=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("rebound run starts");
        HostProcess {
            child,
            log,
            _dir: dir,
        }
    }
}

/// A `rebound run` process. Killed if still running when dropped.
pub struct HostProcess {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl HostProcess {
    /// The process id, which ends the host's id in leases.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the host logged so far (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (`INT`, `TERM`) and returns at once.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Sends `signal` (`INT`, `TERM`), checks that the host exits cleanly within `limit`, and
    /// returns its log.
    pub fn stop_with(mut self, signal: &str, limit: Duration) -> String {
        self.signal(signal);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                break status;
            }
            assert!(
                started.elapsed() < limit,
                "host did not stop within {limit:?} of SIG{signal}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(status.success(), "host exited with {status}:\n{log}");
        assert!(log.contains("host stopped"), "{log}");
        log
    }

    /// The address the host serves HTTP on (`--http 127.0.0.1:0` picks a free port), from
    /// its log; waits up to 20 s for it.
    pub fn http_address(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let line = log
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|line| {
                    line["fields"]["message"] == "serving the HTTP API, /metrics and /healthz"
                });
            if let Some(line) = line {
                return line["fields"]["address"].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "no HTTP address in {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ctrl-C: see [`HostProcess::stop_with`].
    pub fn stop(self) -> String {
        self.stop_with("INT", Duration::from_secs(15))
    }

    /// Kills the host with SIGKILL, as a crash or the OOM killer would.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many times each task's handler was started, from a host's JSON log
/// (`attempt started` events, which carry the attempt span's task id).
pub fn executions(log: &str) -> std::collections::HashMap<String, u32> {
    let mut counts = std::collections::HashMap::new();
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["fields"]["message"] != "attempt started" {
            continue;
        }
        if let Some(id) = event["span"]["task_id"].as_str() {
            *counts.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// The `XDG_CACHE_HOME` of the `rebound` processes tests start: a folder in the system's
/// temporary directory, shared by test runs (it only holds compiled plugins), so tests never
/// write to the user's own cache.
fn test_cache_home() -> PathBuf {
    std::env::temp_dir().join("rebound-tests-cache")
}

/// `GET path` from `addr` over plain HTTP/1.0; the body of a 200 answer (anything else
/// fails the test).
pub fn http_get(addr: &str, path: &str) -> String {
    try_http_get(addr, path).unwrap_or_else(|err| panic!("{err}"))
}

/// `GET path` from `addr` over plain HTTP/1.0; the body of a 200 answer, or what went wrong.
pub fn try_http_get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)
        .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|err| format!("GET {path}: {err}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|err| format!("GET {path}: {err}"))?;
    let status = response.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {response}"));
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}
