//! Shared helpers for Rebound's integration tests: a private `redis-server` per test, the
//! compiled example plugins, both stores, and a host running in the background.
//!
//! Every test that needs Redis starts its own server on a free port through
//! [`RedisServer::start`] and stops it when the value is dropped; nothing here talks to a
//! server it did not start.

pub mod gpu;
pub mod process;
pub mod python;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rebound::config::HostConfig;
use rebound::gpu::GpuGate;
use rebound::runtime::plugin::LivePlugins;
use rebound::runtime::{Plugin, PluginSet, Runtime, SandboxLimits};
use rebound::scheduler::Scheduler;
use rebound::store::embedded::EmbeddedStore;
use rebound::store::redis::RedisStore;
use rebound::store::{SharedStore, Store};
use rebound::task::{Task, TaskState};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The folder holding the compiled example plugins (`echo.wasm`, `flaky.wasm`, …), built by
/// this crate's build script.
pub fn plugin_build_dir() -> PathBuf {
    PathBuf::from(env!("TESTS_PLUGIN_DIR"))
}

/// The compiled plugin `name`.
pub fn plugin_wasm(name: &str) -> PathBuf {
    plugin_build_dir().join(format!("{name}.wasm"))
}

/// Which build of the example plugins a test runs: each Rust plugin in `plugins/` that
/// has a twin in `plugins/python/` takes the same parameters and serves the same queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// The Rust plugins, built by this crate's build script.
    #[default]
    Rust,
    /// The Python plugins, built with the Python SDK ([`python`]).
    Python,
}

impl Lang {
    /// The compiled plugin `name` in this language.
    pub fn plugin_wasm(self, name: &str) -> PathBuf {
        match self {
            Lang::Rust => plugin_wasm(name),
            Lang::Python => python::plugin_wasm(name),
        }
    }

    /// The compiled-plugin cache hosts of this language's plugins use: Python plugins take
    /// seconds to compile, so every host after the first reads them from
    /// [`python::compiled_cache`]; Rust ones compile in milliseconds and use none.
    pub fn compiled_cache(self) -> Option<PathBuf> {
        (self == Lang::Python).then(python::compiled_cache)
    }
}

/// A fresh plugin directory holding copies of the named example plugins.
pub fn plugin_dir(names: &[&str]) -> TempDir {
    plugin_dir_in(Lang::Rust, names)
}

/// A fresh plugin directory holding copies of the named example plugins in `lang`.
pub fn plugin_dir_in(lang: Lang, names: &[&str]) -> TempDir {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    for name in names {
        let from = lang.plugin_wasm(name);
        std::fs::copy(&from, dir.path().join(format!("{name}.wasm")))
            .unwrap_or_else(|err| panic!("cannot copy {}: {err}", from.display()));
    }
    dir
}

/// This process's resident set, in MiB (Linux: from `/proc/self/status`).
pub fn rss_mib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib / 1024
}

/// Sends test logs to the test harness's captured output; `RUST_LOG` sets the level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A `redis-server` process of this test's own, on a free loopback port, its files in a
/// temporary directory. Killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    durable: bool,
    tls: bool,
}

impl RedisServer {
    /// Starts a server that keeps nothing on disk, and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server that writes every change to its append-only file before answering,
    /// so that it loses nothing it acknowledged when killed and restarted.
    pub fn start_durable() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    /// Starts a server that speaks only TLS, with a certificate for 127.0.0.1 signed by a
    /// certificate authority made for it (see [`RedisServer::ca_file`]).
    pub fn start_tls() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        make_certificates(dir.path())?;
        let mut server = RedisServer {
            child: None,
            port: free_port()?,
            dir,
            durable: false,
            tls: true,
        };
        server.spawn()?;
        Ok(server)
    }

    fn start_with(durable: bool) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            durable,
            tls: false,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The PEM file of the certificate authority that signed a TLS server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let persistence: &[&str] = if self.durable {
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1"]);
        if self.tls {
            let dir = self.dir.path();
            command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(dir.join("server.crt"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.crt"));
        } else {
            command.args(["--port", &port]);
        }
        let child = command
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (is it installed and on PATH?)")?;
        self.child = Some(child);
        if self.tls {
            wait_for_tls_port(self.port, &self.ca_file(), Duration::from_secs(10))
        } else {
            wait_for_port(self.port, Duration::from_secs(10))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` watched by one Redis Sentinel, both of this test's own. Killed when
/// dropped.
pub struct RedisSentinel {
    _primary: RedisServer,
    sentinel: Child,
    sentinel_port: u16,
    _dir: TempDir,
}

impl RedisSentinel {
    /// The name the sentinel knows the primary by.
    pub const SERVICE: &'static str = "rebound-test";

    /// Starts a primary and a sentinel that monitors it, and waits until the sentinel
    /// answers with the primary's address.
    pub fn start() -> anyhow::Result<Self> {
        let primary = RedisServer::start()?;
        let dir = tempfile::tempdir()?;
        let sentinel_port = free_port()?;
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {} 127.0.0.1 {} 1\n",
                dir.path().display(),
                Self::SERVICE,
                primary.port
            ),
        )?;
        let sentinel = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server --sentinel")?;
        let started = RedisSentinel {
            _primary: primary,
            sentinel,
            sentinel_port,
            _dir: dir,
        };
        started.wait_until_monitoring(Duration::from_secs(10))?;
        Ok(started)
    }

    /// The URL to connect through the sentinel.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={}",
            self.sentinel_port,
            Self::SERVICE
        )
    }

    fn wait_until_monitoring(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let answer = Command::new("redis-cli")
                .args(["-p", &self.sentinel_port.to_string()])
                .args(["sentinel", "get-master-addr-by-name", Self::SERVICE])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default();
            if answer.contains("127.0.0.1") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the sentinel did not report its primary within {limit:?}")
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}

/// A Redis Cluster of three primaries of this test's own, on free loopback ports, keeping
/// nothing on disk. Killed when dropped.
pub struct RedisCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    _dir: TempDir,
}

impl RedisCluster {
    /// Starts three nodes, joins them into a cluster that covers every slot, and waits
    /// until it reports itself healthy.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            ports: Vec::new(),
            _dir: dir,
        };
        for _ in 0..3 {
            let port = free_port()?;
            let node_dir = cluster._dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir)?;
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                ])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start redis-server")?;
            cluster.nodes.push(child);
            cluster.ports.push(port);
            wait_for_port(port, Duration::from_secs(10))?;
        }

        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run redis-cli (it comes with redis-server)")?;
        anyhow::ensure!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_healthy(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// The URL to connect to, naming every node.
    pub fn url(&self) -> String {
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.ports[0],
            others.join("&")
        )
    }

    fn wait_until_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let healthy = self.ports.iter().all(|port| {
                Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if healthy {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the Redis cluster did not become healthy within {limit:?}")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something answers Redis's PING on `port`.
fn wait_for_port(port: u16, limit: Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut reply = [0u8; 7];
            let answered =
                conn.write_all(b"PING\r\n").is_ok() && conn.read_exact(&mut reply).is_ok();
            if answered && &reply == b"+PONG\r\n" {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("redis-server on port {port} did not answer within {limit:?}")
}

/// Writes a certificate authority (`ca.crt`) and a certificate for 127.0.0.1 signed by it
/// (`server.crt`, `server.key`) into `dir`, with the `openssl` command.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=rebound test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Waits until a TLS server on `port` answers PING (asked with `redis-cli --tls`).
fn wait_for_tls_port(port: u16, ca_file: &Path, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let pong = Command::new("redis-cli")
            .args(["--tls", "-p", &port.to_string(), "--cacert"])
            .arg(ca_file)
            .arg("ping")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).contains("PONG"))
            .unwrap_or(false);
        if pong {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server with TLS on port {port} did not answer within {limit:?}")
}

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A private `redis-server`.
    Redis,
    /// A private Redis Cluster of three nodes.
    RedisCluster,
    /// A SQLite file in a temporary directory.
    Embedded,
}

/// A store of either kind, and what keeps it alive.
pub struct TestStore {
    /// The store.
    pub store: SharedStore,
    /// The Redis server behind a Redis store.
    pub redis: Option<RedisServer>,
    /// The Redis Cluster behind a clustered Redis store.
    pub cluster: Option<RedisCluster>,
    /// The directory of an embedded store's file.
    pub dir: Option<TempDir>,
}

impl TestStore {
    /// A fresh, empty store of the given kind.
    pub async fn new(backend: Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Redis => {
                let redis = RedisServer::start()?;
                let store = RedisStore::connect(&redis.url()).await?;
                Ok(TestStore {
                    store: Arc::new(store),
                    redis: Some(redis),
                    cluster: None,
                    dir: None,
                })
            }
            Backend::RedisCluster => {
                let cluster = RedisCluster::start()?;
                let store = RedisStore::connect(&cluster.url()).await?;
                Ok(TestStore {
                    store: Arc::new(store),
                    redis: None,
                    cluster: Some(cluster),
                    dir: None,
                })
            }
            Backend::Embedded => {
                let dir = tempfile::tempdir()?;
                let store = EmbeddedStore::open(&dir.path().join("tasks.db"))?;
                Ok(TestStore {
                    store: Arc::new(store),
                    redis: None,
                    cluster: None,
                    dir: Some(dir),
                })
            }
        }
    }

    /// A second, independent handle on the same tasks (another host's connection).
    pub async fn reopen(&self) -> anyhow::Result<SharedStore> {
        if let Some(redis) = &self.redis {
            return Ok(Arc::new(RedisStore::connect(&redis.url()).await?));
        }
        if let Some(cluster) = &self.cluster {
            return Ok(Arc::new(RedisStore::connect(&cluster.url()).await?));
        }
        let dir = self
            .dir
            .as_ref()
            .expect("an embedded store has a directory");
        Ok(Arc::new(EmbeddedStore::open(&dir.path().join("tasks.db"))?))
    }
}

/// Settings for test hosts: quick polling and short backoffs, and instances from a pool,
/// as `rebound run` has them by default.
pub fn test_config() -> HostConfig {
    let defaults = HostConfig::default();
    HostConfig {
        poll_interval: Duration::from_millis(10),
        shutdown_grace: Duration::from_secs(5),
        limits: SandboxLimits {
            // Room for every test's plugins at the default concurrency.
            pool: Some(defaults.concurrency as u32 * 8),
            ..defaults.limits.clone()
        },
        ..defaults
    }
}

/// A host running in the background of a test.
pub struct TestHost {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    plugins: TempDir,
    live: LivePlugins,
    _watch: Option<rebound::reload::DirectoryWatch>,
}

/// What a test host has besides its plugins and settings.
#[derive(Default)]
pub struct HostSetup<'a> {
    /// The GPU gate; a closed one (no GPU) when `None`.
    pub gate: Option<GpuGate>,
    /// Manifests to write beside the plugins: `(plugin name, TOML text)`.
    pub manifests: &'a [(&'a str, &'a str)],
    /// Follow the plugin directory and load what changes, as `rebound run` does.
    pub reload: bool,
    /// The language of the plugins (Python ones load through [`python::compiled_cache`]).
    pub lang: Lang,
}

impl TestHost {
    /// Starts a host serving the named example plugins from `store`.
    pub fn start(store: SharedStore, plugins: &[&str], config: HostConfig) -> Self {
        TestHost::start_with(store, plugins, config, HostSetup::default())
    }

    /// Starts a host serving the named example plugins in `lang` from `store`.
    pub fn start_in(lang: Lang, store: SharedStore, plugins: &[&str], config: HostConfig) -> Self {
        let setup = HostSetup {
            lang,
            ..HostSetup::default()
        };
        TestHost::start_with(store, plugins, config, setup)
    }

    /// Starts a host serving the named example plugins from `store`, with a GPU gate or
    /// plugin manifests.
    pub fn start_with(
        store: SharedStore,
        plugins: &[&str],
        config: HostConfig,
        setup: HostSetup<'_>,
    ) -> Self {
        let dir = plugin_dir_in(setup.lang, plugins);
        for (name, manifest) in setup.manifests {
            std::fs::write(dir.path().join(format!("{name}.toml")), manifest)
                .expect("cannot write a manifest");
        }
        let cache = setup.lang.compiled_cache();
        let runtime = Arc::new(
            Runtime::with_cache(config.limits.clone(), cache.as_deref()).expect("engine starts"),
        );
        // Python plugins compile for seconds: let the first test compile into the cache.
        let loading = (setup.lang == Lang::Python).then(|| {
            python::LOADING
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
        });
        let mut set = PluginSet::default();
        for name in plugins {
            let path = dir.path().join(format!("{name}.wasm"));
            let plugin = Plugin::load(&runtime, &path, &config.retry)
                .unwrap_or_else(|err| panic!("plugin {name} loads: {err:#}"));
            set.insert(plugin);
        }
        drop(loading);
        TestHost::serve(store, dir, runtime, set, config, setup)
    }

    /// Starts a host serving `set`, loaded from `dir` by `runtime`; `setup.manifests` is
    /// not used (the plugins are loaded already).
    pub fn serve(
        store: SharedStore,
        dir: TempDir,
        runtime: Arc<Runtime>,
        set: PluginSet,
        config: HostConfig,
        setup: HostSetup<'_>,
    ) -> Self {
        let live = LivePlugins::new(set);
        let watch = setup.reload.then(|| {
            let loader = rebound::reload::Loader {
                runtime: runtime.clone(),
                retry: config.retry.clone(),
                host_gpu: Default::default(),
            };
            rebound::reload::watch_dir(dir.path(), loader, live.clone()).expect("the watch starts")
        });
        // Distinct names, so leases tell hosts of one test apart.
        static HOSTS: AtomicUsize = AtomicUsize::new(0);
        let host_id = format!("test-host-{}", HOSTS.fetch_add(1, Ordering::Relaxed));
        let mut scheduler = Scheduler::new(store, runtime, live.clone(), config, host_id);
        if let Some(gate) = setup.gate {
            scheduler = scheduler.with_gpu_gate(gate);
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(scheduler.run(async {
            let _ = stopped.await;
        }));
        TestHost {
            stop: Some(stop),
            task: Some(task),
            plugins: dir,
            live,
            _watch: watch,
        }
    }

    /// The plugins the host serves now.
    pub fn plugins(&self) -> &LivePlugins {
        &self.live
    }

    /// The host's plugin directory.
    pub fn plugin_dir(&self) -> &Path {
        self.plugins.path()
    }

    /// Asks the host to shut down and waits until it has.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the host does not panic");
        }
    }
}

/// Waits until task `id` satisfies `done`, failing after `limit` with the task as last seen.
pub async fn wait_for(
    store: &dyn Store,
    id: &str,
    limit: Duration,
    done: impl Fn(&Task) -> bool,
) -> anyhow::Result<Task> {
    let started = Instant::now();
    loop {
        let task = store.get(id).await?;
        if let Some(task) = task.as_ref().filter(|task| done(task)) {
            return Ok(task.clone());
        }
        if started.elapsed() > limit {
            bail!("task {id} not as awaited after {limit:?}; last seen: {task:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until task `id` is in `state`.
pub async fn wait_for_state(
    store: &dyn Store,
    id: &str,
    state: TaskState,
    limit: Duration,
) -> anyhow::Result<Task> {
    wait_for(store, id, limit, |task| task.state == state).await
}

/// Waits until task `id` reaches a final state.
pub async fn wait_until_final(
    store: &dyn Store,
    id: &str,
    limit: Duration,
) -> anyhow::Result<Task> {
    wait_for(store, id, limit, |task| task.state.is_final()).await
}

/// Turns each named `async fn case(backend: Backend)` of the calling test file into three
/// tests, `redis::case`, `redis_cluster::case` and `embedded::case`, so every case runs on
/// both stores, and on Redis both alone and as a cluster.
#[macro_export]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        $crate::__store_tests!(redis, Redis; $($case),*);
        $crate::__store_tests!(redis_cluster, RedisCluster; $($case),*);
        $crate::__store_tests!(embedded, Embedded; $($case),*);
    };
}

/// Turns each named `async fn case(backend: Backend, lang: Lang)` into tests of both
/// plugin languages: `rust::…` on both stores as [`on_both_stores!`] does, and `python::…`
/// on a private `redis-server` and on the embedded store (what a plugin does does not
/// depend on how Redis is deployed).
#[macro_export]
macro_rules! in_both_languages {
    ($($case:ident),* $(,)?) => {
        mod rust {
            use super::*;
            $crate::__store_tests!(redis, Redis, Rust; $($case),*);
            $crate::__store_tests!(redis_cluster, RedisCluster, Rust; $($case),*);
            $crate::__store_tests!(embedded, Embedded, Rust; $($case),*);
        }
        mod python {
            use super::*;
            $crate::__store_tests!(redis, Redis, Python; $($case),*);
            $crate::__store_tests!(embedded, Embedded, Python; $($case),*);
        }
    };
}

/// One module of tests, each calling its case on one store (and in one language).
#[doc(hidden)]
#[macro_export]
macro_rules! __store_tests {
    ($module:ident, $backend:ident; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::init_logging();
                    super::$case($crate::Backend::$backend).await;
                }
            )*
        }
    };
    ($module:ident, $backend:ident, $lang:ident; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::init_logging();
                    super::$case($crate::Backend::$backend, $crate::Lang::$lang).await;
                }
            )*
        }
    };
}
