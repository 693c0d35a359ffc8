#![allow(clippy::print_stdout)] // A report tool: its output is the point.

//! Rebound's benchmarks: prints a table of figures, each the median [min–max] of the runs.
//!
//! ```sh
//! cargo run --release -p rebound-tests --bin bench -- --help
//! bash scripts/bench.sh            # the default set, as BENCHMARKS.md reports it
//! ```
//!
//! Every scenario starts its own `redis-server` (or a fresh embedded store file) and runs an
//! in-process host on the compiled example plugins, so the figures include the store round
//! trips, the sandbox and the scheduling, but not a process start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rebound::backoff::{RetryPolicy, Strategy};
use rebound::config::HostConfig;
use rebound::runtime::sandbox::AttemptSignals;
use rebound::runtime::{Plugin, PluginSet, Runtime, SandboxLimits};
use rebound::scheduler::Scheduler;
use rebound::store::{SharedStore, Store};
use rebound::task::{NewTask, Task, TaskState};
use rebound_tests::{Backend, Lang, TestStore};
use tokio::sync::oneshot;

/// Rebound's benchmarks.
#[derive(Debug, Parser)]
struct Args {
    /// Scenarios to run: throughput, pickup, retry, sandbox, memory, scale.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,pickup,retry,sandbox,memory,scale"
    )]
    scenarios: Vec<String>,
    /// Task counts for the throughput scenario.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    n: Vec<usize>,
    /// Concurrencies (attempts at once per queue) for the throughput scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Stores: redis, embedded.
    #[arg(long, value_delimiter = ',', default_value = "redis,embedded")]
    stores: Vec<String>,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Backlogs (pending tasks in Redis) for the scale scenario.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    backlog: Vec<usize>,
    /// Allocate every instance's memory on demand instead of from a pool (the pool is
    /// what `rebound run` uses by default).
    #[arg(long)]
    no_pooling: bool,
    /// The language of the plugins that hosts run (the throughput, pickup, retry, memory
    /// and scale scenarios): rust, or python for the Python twins (`plugins/python/`).
    #[arg(long, default_value = "rust", value_parser = parse_lang)]
    lang: Lang,
    /// After each Redis throughput run, print Redis's per-command counts (where the round
    /// trips go).
    #[arg(long)]
    commandstats: bool,
    /// Also write every figure to this file as JSON (for scripts/bench.sh's ratios).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Every figure printed, kept for `--json`.
#[derive(Default)]
struct Report {
    rows: Vec<serde_json::Value>,
}

impl Report {
    fn record(&mut self, scenario: &str, mut row: serde_json::Value) {
        row["scenario"] = scenario.into();
        self.rows.push(row);
    }
}

/// Median, min and max, as JSON.
fn stats(values: &[f64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.as_slice() {
        [] => serde_json::Value::Null,
        all => serde_json::json!({
            "median": all[all.len() / 2],
            "min": all[0],
            "max": all[all.len() - 1],
        }),
    }
}

/// Median, min and max of some figures.
fn summary(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return "n/a".to_owned();
    }
    let median = values[values.len() / 2];
    let (min, max) = (values[0], values[values.len() - 1]);
    format!("{} [{}–{}]", round(median), round(min), round(max))
}

fn round(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The `q`-quantile (0–1) of `values`.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index]
}

fn backend(name: &str) -> anyhow::Result<Backend> {
    match name {
        "redis" => Ok(Backend::Redis),
        "embedded" => Ok(Backend::Embedded),
        other => bail!("unknown store `{other}`: redis or embedded"),
    }
}

/// Whether hosts take instances from a pool (`--no-pooling` turns it off).
static POOLING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// The language of the plugins hosts run (`--lang`).
static LANG: std::sync::OnceLock<Lang> = std::sync::OnceLock::new();

fn parse_lang(name: &str) -> Result<Lang, String> {
    match name {
        "rust" => Ok(Lang::Rust),
        "python" => Ok(Lang::Python),
        other => Err(format!("unknown plugin language `{other}`: rust or python")),
    }
}

/// A host running in this process until the returned sender fires.
fn start_host(
    store: SharedStore,
    plugins: &[&str],
    mut config: HostConfig,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    if POOLING.load(std::sync::atomic::Ordering::Relaxed) {
        // Sized as `rebound run` sizes it: concurrency × plugins.
        config.limits.pool = Some((config.concurrency * plugins.len()) as u32);
    }
    let lang = LANG.get().copied().unwrap_or_default();
    let cache = lang.compiled_cache();
    let runtime =
        Arc::new(Runtime::with_cache(config.limits.clone(), cache.as_deref()).expect("engine"));
    let mut set = PluginSet::default();
    for name in plugins {
        let plugin =
            Plugin::load(&runtime, &lang.plugin_wasm(name), &config.retry).expect("plugin loads");
        set.insert(plugin);
    }
    let scheduler = Scheduler::new(store, runtime, set, config, "bench-host".to_owned());
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

async fn stop_host(host: (oneshot::Sender<()>, tokio::task::JoinHandle<()>)) {
    let _ = host.0.send(());
    let _ = host.1.await;
}

/// Creates `n` tasks from 16 concurrent producers; returns how long it took.
async fn enqueue(store: &SharedStore, queue: &str, n: usize, params: &str) -> Duration {
    let started = Instant::now();
    let producers = 16;
    let mut joins = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        let queue = queue.to_owned();
        let params = params.to_owned();
        joins.push(tokio::spawn(async move {
            for _ in (p..n).step_by(producers) {
                store
                    .create(NewTask::new(queue.as_str(), params.as_str()))
                    .await
                    .expect("create");
            }
        }));
    }
    for join in joins {
        join.await.expect("producer");
    }
    started.elapsed()
}

/// Waits until `queue` has `n` completed tasks; the time it happened.
async fn wait_completed(store: &dyn Store, queue: &str, n: u64, limit: Duration) -> Instant {
    let started = Instant::now();
    loop {
        let counts = store.counts(queue).await.expect("counts");
        if counts.completed >= n {
            return Instant::now();
        }
        assert!(
            started.elapsed() < limit,
            "only {} of {n} completed after {limit:?}: {counts:?}",
            counts.completed
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn throughput(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    println!("\n## Throughput: N no-op (echo) tasks enqueued first, then one host started\n");
    println!(
        "| store | N | concurrency | enqueue s | start→last done s | tasks/s | Redis commands per task |"
    );
    println!("|---|---|---|---|---|---|---|");
    for store_name in &args.stores {
        for &n in &args.n {
            for &concurrency in &args.concurrency {
                let (mut enq, mut took, mut rate, mut commands) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..args.runs {
                    let ts = TestStore::new(backend(store_name)?).await?;
                    enq.push(
                        enqueue(&ts.store, "echo", n, r#"{"x":1}"#)
                            .await
                            .as_secs_f64(),
                    );
                    let config = HostConfig {
                        concurrency,
                        ..HostConfig::default()
                    };
                    let url = ts.redis.as_ref().map(|redis| redis.url());
                    let commands_before = match &url {
                        Some(url) => redis_info(url, "stats", "total_commands_processed")?,
                        None => 0.0,
                    };
                    let started = Instant::now();
                    let host = start_host(ts.store.clone(), &["echo"], config);
                    let done = wait_completed(
                        ts.store.as_ref(),
                        "echo",
                        n as u64,
                        Duration::from_secs(900),
                    )
                    .await;
                    let seconds = (done - started).as_secs_f64();
                    // Counted until the last completion is seen; includes this process's
                    // polling of the counts (one command every 5 ms).
                    if let Some(url) = &url {
                        let after = redis_info(url, "stats", "total_commands_processed")?;
                        commands.push((after - commands_before) / n as f64);
                        if args.commandstats {
                            print_commandstats(url, n)?;
                        }
                    }
                    stop_host(host).await;
                    took.push(seconds);
                    rate.push(n as f64 / seconds);
                }
                report.record(
                    "throughput",
                    serde_json::json!({
                        "store": store_name, "n": n, "concurrency": concurrency,
                        "enqueue_s": stats(&enq), "start_to_done_s": stats(&took),
                        "tasks_per_s": stats(&rate), "redis_commands_per_task": stats(&commands),
                    }),
                );
                println!(
                    "| {store_name} | {n} | {concurrency} | {} | {} | {} | {} |",
                    summary(enq),
                    summary(took),
                    summary(rate),
                    if commands.is_empty() {
                        "–".to_owned()
                    } else {
                        summary(commands)
                    }
                );
            }
        }
    }
    Ok(())
}

async fn pickup(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    println!("\n## Pickup latency: one task at a time to an idle host (200 tasks a run)\n");
    println!("| store | submit→start p50 ms | p99 ms | submit→completed p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for store_name in &args.stores {
        let mut figures: [Vec<f64>; 4] = Default::default();
        for _ in 0..args.runs {
            let ts = TestStore::new(backend(store_name)?).await?;
            let host = start_host(ts.store.clone(), &["echo"], HostConfig::default());
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (mut start, mut done) = (Vec::new(), Vec::new());
            for _ in 0..200 {
                let task = ts.store.create(NewTask::new("echo", "{}")).await?;
                let finished = wait_final(ts.store.as_ref(), &task.id).await?;
                let created = finished.created_ms as f64;
                start.push(finished.started_ms.context("started")? as f64 - created);
                done.push(finished.finished_ms.context("finished")? as f64 - created);
            }
            stop_host(host).await;
            figures[0].push(quantile(&mut start, 0.5));
            figures[1].push(quantile(&mut start, 0.99));
            figures[2].push(quantile(&mut done, 0.5));
            figures[3].push(quantile(&mut done, 0.99));
        }
        let [a, b, c, d] = figures;
        report.record(
            "pickup",
            serde_json::json!({
                "store": store_name, "start_p50_ms": stats(&a), "start_p99_ms": stats(&b),
                "done_p50_ms": stats(&c), "done_p99_ms": stats(&d),
            }),
        );
        println!(
            "| {store_name} | {} | {} | {} | {} |",
            summary(a),
            summary(b),
            summary(c),
            summary(d)
        );
    }
    Ok(())
}

async fn wait_final(store: &dyn Store, id: &str) -> anyhow::Result<Task> {
    let started = Instant::now();
    loop {
        if let Some(task) = store.get(id).await?
            && task.state.is_final()
        {
            return Ok(task);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("task {id} did not finish");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn retry_timing(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    println!("\n## Retry timing: 1000 flaky tasks, fixed 200 ms backoff, success at attempt 2\n");
    println!("| store | retry start − due p50 ms | p99 ms | max ms | all done s |");
    println!("|---|---|---|---|---|");
    for store_name in &args.stores {
        let mut figures: [Vec<f64>; 4] = Default::default();
        for _ in 0..args.runs {
            let ts = TestStore::new(backend(store_name)?).await?;
            let policy = RetryPolicy {
                backoff: Strategy::Fixed,
                backoff_interval_ms: 200,
                max_retry_count: 3,
                ..RetryPolicy::default()
            };
            let mut ids = Vec::new();
            for _ in 0..1000 {
                let task = NewTask {
                    retry: Some(policy.clone()),
                    ..NewTask::new("flaky", r#"{"succeed_at":2}"#)
                };
                ids.push(ts.store.create(task).await?.id);
            }
            let config = HostConfig {
                concurrency: 64,
                ..HostConfig::default()
            };
            let started = Instant::now();
            let host = start_host(ts.store.clone(), &["flaky"], config);
            wait_completed(ts.store.as_ref(), "flaky", 1000, Duration::from_secs(300)).await;
            let all_done = started.elapsed().as_secs_f64();
            stop_host(host).await;
            // The store sets run_at to the failure time plus the backoff, exactly; the
            // second attempt's start minus that is how late the retry started.
            let mut late = Vec::new();
            for id in &ids {
                let task = ts.store.get(id).await?.context("task")?;
                anyhow::ensure!(task.state == TaskState::Completed && task.attempt == 2);
                late.push(task.started_ms.context("started")? as f64 - task.run_at_ms as f64);
            }
            figures[0].push(quantile(&mut late, 0.5));
            figures[1].push(quantile(&mut late, 0.99));
            figures[2].push(quantile(&mut late, 1.0));
            figures[3].push(all_done);
        }
        let [a, b, c, d] = figures;
        report.record(
            "retry",
            serde_json::json!({
                "store": store_name, "late_p50_ms": stats(&a), "late_p99_ms": stats(&b),
                "late_max_ms": stats(&c), "all_done_s": stats(&d),
            }),
        );
        println!(
            "| {store_name} | {} | {} | {} | {} |",
            summary(a),
            summary(b),
            summary(c),
            summary(d)
        );
    }
    Ok(())
}

async fn sandbox(args: &Args) -> anyhow::Result<()> {
    println!(
        "\n## Sandbox: echo, one attempt at a time (new store, WASI, instantiate, call, drop)\n"
    );
    println!("| measure | µs |");
    println!("|---|---|");
    for lang in [Lang::Rust, Lang::Python] {
        let wasm = lang.plugin_wasm("echo");
        for (label, pool) in [("not pooled", None), ("pooled", Some(64))] {
            let runtime = Runtime::new(SandboxLimits {
                pool,
                ..SandboxLimits::default()
            })?;
            let plugin = Plugin::load(&runtime, &wasm, &RetryPolicy::default())?;
            let task = Task::submitted("t".into(), NewTask::new("echo", r#"{"x":1}"#), 0);
            let (mut p50, mut p99) = (Vec::new(), Vec::new());
            for _ in 0..args.runs {
                let mut times = Vec::with_capacity(5000);
                for _ in 0..5000 {
                    let began = Instant::now();
                    let outcome = runtime
                        .run_attempt(&plugin, &task, None, &AttemptSignals::new(0))
                        .await;
                    times.push(began.elapsed().as_secs_f64() * 1e6);
                    anyhow::ensure!(matches!(
                        outcome,
                        rebound::runtime::AttemptOutcome::Completed(_)
                    ));
                }
                p50.push(quantile(&mut times, 0.5));
                p99.push(quantile(&mut times, 0.99));
            }
            println!(
                "| instantiate+call p50 ({lang:?}, {label}) | {} |",
                summary(p50)
            );
            println!(
                "| instantiate+call p99 ({lang:?}, {label}) | {} |",
                summary(p99)
            );
        }
    }

    println!("\n| plugin load (echo) | size | ms |");
    println!("|---|---|---|");
    for lang in [Lang::Rust, Lang::Python] {
        let wasm = lang.plugin_wasm("echo");
        let size = format!("{:.1} MB", std::fs::metadata(&wasm)?.len() as f64 / 1e6);
        let (mut cold, mut cached) = (Vec::new(), Vec::new());
        let cache = tempfile::tempdir()?;
        for _ in 0..args.runs {
            let runtime = Runtime::new(SandboxLimits::default())?;
            let began = Instant::now();
            Plugin::load(&runtime, &wasm, &RetryPolicy::default())?;
            cold.push(began.elapsed().as_secs_f64() * 1e3);
        }
        Runtime::with_cache(SandboxLimits::default(), Some(cache.path()))
            .and_then(|r| Plugin::load(&r, &wasm, &RetryPolicy::default()))?;
        for _ in 0..args.runs {
            let runtime = Runtime::with_cache(SandboxLimits::default(), Some(cache.path()))?;
            let began = Instant::now();
            Plugin::load(&runtime, &wasm, &RetryPolicy::default())?;
            cached.push(began.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "| {lang:?}: compiled (no cache) | {size} | {} |",
            summary(cold)
        );
        println!(
            "| {lang:?}: from the on-disk cache | {size} | {} |",
            summary(cached)
        );
    }
    Ok(())
}

/// This process's resident set, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

async fn memory(_args: &Args) -> anyhow::Result<()> {
    println!("\n## Host memory (resident set of this process, which also holds the producer)\n");
    let ts = TestStore::new(Backend::Redis).await?;
    let before = rss_mib();
    let config = HostConfig {
        concurrency: 256,
        ..HostConfig::default()
    };
    let host = start_host(ts.store.clone(), &["echo", "flaky", "sleepy"], config);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_mib();
    for _ in 0..512 {
        ts.store
            .create(NewTask::new("sleepy", r#"{"ms":2000,"sleep":true}"#))
            .await?;
    }
    let mut busy: f64 = 0.0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let running = ts.store.counts("sleepy").await?.running;
        if running >= 256 {
            busy = busy.max(rss_mib());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_host(host).await;
    let mut table = BTreeMap::new();
    table.insert("1 before the host", before);
    table.insert("2 idle, three plugins loaded", idle);
    table.insert("3 256 instances running (sleepy)", busy);
    println!("| when | RSS MiB |");
    println!("|---|---|");
    for (when, mib) in table {
        println!("| {} | {mib:.1} |", &when[2..]);
    }
    Ok(())
}

/// Bytes the Redis server at `url` holds (`used_memory`).
fn redis_used_memory(url: &str) -> anyhow::Result<f64> {
    redis_info(url, "memory", "used_memory")
}

/// One numeric field of `INFO section` of the Redis server at `url`.
fn redis_info(url: &str, section: &str, field: &str) -> anyhow::Result<f64> {
    let port = url
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .context("a port in the Redis URL")?;
    let out = std::process::Command::new("redis-cli")
        .args(["-p", port, "info", section])
        .output()
        .context("redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("{field} in INFO {section}"))
}

/// Calls of each Redis command so far (enqueue included), per task, largest first.
fn print_commandstats(url: &str, tasks: usize) -> anyhow::Result<()> {
    let port = url.rsplit(':').next().context("a port")?;
    let out = std::process::Command::new("redis-cli")
        .args(["-p", port, "info", "commandstats"])
        .output()
        .context("redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<(f64, &str)> = text
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls: f64 = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((calls / tasks as f64, name))
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let shown: Vec<String> = rows
        .iter()
        .map(|(per_task, name)| format!("{name} {per_task:.2}"))
        .collect();
    println!("  Redis calls per task: {}", shown.join(", "));
    Ok(())
}

/// A backlog of pending tasks in Redis: what a task costs in Redis memory, how long `stats`
/// takes, and whether claiming slows down when the backlog is large.
async fn scale(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    const DRAINED: u64 = 10_000;
    println!(
        "\n## Scale: a backlog of pending echo tasks in Redis, then one host (concurrency 64)\n"
    );
    println!(
        "| pending | enqueue tasks/s | Redis bytes per pending task | stats ms | first {DRAINED} done, tasks/s |"
    );
    println!("|---|---|---|---|---|");
    for &backlog in &args.backlog {
        let (mut enq, mut bytes, mut stats_ms, mut rate) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let ts = TestStore::new(Backend::Redis).await?;
            let url = ts.redis.as_ref().context("a Redis server")?.url();
            let before = redis_used_memory(&url)?;
            let took = enqueue(&ts.store, "echo", backlog, r#"{"x":1}"#).await;
            enq.push(backlog as f64 / took.as_secs_f64());
            bytes.push((redis_used_memory(&url)? - before) / backlog as f64);
            let mut calls = Vec::new();
            for _ in 0..5 {
                let began = Instant::now();
                rebound::http::stats_json(ts.store.as_ref()).await?;
                calls.push(began.elapsed().as_secs_f64() * 1e3);
            }
            stats_ms.push(quantile(&mut calls, 0.5));
            let config = HostConfig {
                concurrency: 64,
                ..HostConfig::default()
            };
            let started = Instant::now();
            let host = start_host(ts.store.clone(), &["echo"], config);
            let done = wait_completed(
                ts.store.as_ref(),
                "echo",
                DRAINED.min(backlog as u64),
                Duration::from_secs(600),
            )
            .await;
            stop_host(host).await;
            rate.push(DRAINED.min(backlog as u64) as f64 / (done - started).as_secs_f64());
        }
        report.record(
            "scale",
            serde_json::json!({
                "pending": backlog, "enqueue_per_s": stats(&enq),
                "redis_bytes_per_task": stats(&bytes), "stats_ms": stats(&stats_ms),
                "drain_per_s": stats(&rate),
            }),
        );
        println!(
            "| {backlog} | {} | {} | {} | {} |",
            summary(enq),
            summary(bytes),
            summary(stats_ms),
            summary(rate)
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    POOLING.store(!args.no_pooling, std::sync::atomic::Ordering::Relaxed);
    LANG.set(args.lang).expect("set once");
    let mut report = Report::default();
    println!(
        "# Rebound benchmarks ({} run(s) each; median [min–max]; {:?} plugins)",
        args.runs, args.lang
    );
    for scenario in &args.scenarios {
        match scenario.as_str() {
            "throughput" => throughput(&args, &mut report).await?,
            "pickup" => pickup(&args, &mut report).await?,
            "retry" => retry_timing(&args, &mut report).await?,
            "sandbox" => sandbox(&args).await?,
            "memory" => memory(&args).await?,
            "scale" => scale(&args, &mut report).await?,
            other => bail!("unknown scenario `{other}`"),
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.rows)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
