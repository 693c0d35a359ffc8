//! Layered configuration: which layer wins, what an error says, and the old framework's
//! names. Each case runs in a figment `Jail`: its own working directory and environment.

use std::time::Duration;

use figment::Jail;
use rebound::backoff::Strategy;
use rebound::gpu::{GIB, ProbeKind};
use rebound::settings::{Loaded, LogFormat};
use serde_json::{Value, json};

fn load(flags: Value) -> Result<Loaded, String> {
    Loaded::load(None, flags).map_err(|err| format!("{err:#}"))
}

/// Runs `case` in a jail, turning its error into a test failure. (The large error type is
/// figment's own.)
#[allow(clippy::result_large_err)]
fn jailed(case: impl FnOnce(&mut Jail) -> Result<(), String>) {
    Jail::expect_with(|jail| case(jail).map_err(Into::into));
}

#[test]
fn every_layer_overrides_the_one_below() {
    jailed(|jail| {
        // Defaults alone.
        let defaults = load(json!({}))?;
        assert_eq!(defaults.settings.host.concurrency, 8);
        assert_eq!(defaults.source_of("host.concurrency"), "defaults");
        assert_eq!(defaults.file, None);

        // The file beats the defaults.
        jail.create_file(
            "rebound.toml",
            "[host]\nconcurrency = 4\nbatch_size = 5\npoll_interval_ms = 20\n\
             [gpu]\nprobe = \"none\"\n[log]\nformat = \"json\"\n",
        )
        .map_err(|e| e.to_string())?;
        let file = load(json!({}))?;
        assert_eq!(file.settings.host.concurrency, 4);
        assert_eq!(file.settings.gpu.probe, ProbeKind::None);
        assert_eq!(file.settings.log.format, LogFormat::Json);
        assert_eq!(file.source_of("host.concurrency"), "TOML file rebound.toml");

        // The environment beats the file.
        jail.set_env("REBOUND_HOST__CONCURRENCY", "3");
        jail.set_env("REBOUND_HOST__BATCH_SIZE", "6");
        let env = load(json!({}))?;
        assert_eq!(env.settings.host.concurrency, 3);
        assert_eq!(env.settings.host.batch_size, 6);
        assert_eq!(
            env.source_of("host.concurrency"),
            "environment variable REBOUND_HOST__CONCURRENCY"
        );

        // Flags beat the environment; what no flag sets stays.
        let flags = load(json!({"host": {"concurrency": 2}}))?;
        assert_eq!(flags.settings.host.concurrency, 2);
        assert_eq!(flags.settings.host.batch_size, 6);
        assert_eq!(flags.settings.host.poll_interval_ms, 20);
        assert_eq!(flags.source_of("host.concurrency"), "command-line flags");

        let host = flags.host_config();
        assert_eq!(host.concurrency, 2);
        assert_eq!(host.poll_interval, Duration::from_millis(20));
        Ok(())
    });
}

#[test]
fn short_environment_names_and_an_explicit_file() {
    jailed(|jail| {
        jail.set_env("REBOUND_REDIS_URL", "redis://app:secret@10.0.0.5:6380/2");
        jail.set_env("REBOUND_GPU_PROBE", "none");
        jail.set_env("REBOUND_HTTP", "127.0.0.1:9475");
        jail.create_file("elsewhere.toml", "[limits]\nmemory_mb = 64\n")
            .map_err(|e| e.to_string())?;
        let loaded = Loaded::load(Some("elsewhere.toml".as_ref()), json!({}))
            .map_err(|e| format!("{e:#}"))?;
        let s = &loaded.settings;
        assert_eq!(
            s.store.redis_url.as_deref(),
            Some("redis://app:secret@10.0.0.5:6380/2")
        );
        assert_eq!(s.gpu.probe, ProbeKind::None);
        assert_eq!(s.http.listen, Some("127.0.0.1:9475".parse().unwrap()));
        assert_eq!(s.limits.memory_mb, 64);

        // The printed configuration hides the password.
        let shown = loaded.to_masked_toml();
        assert!(
            shown.contains("redis://app:********@10.0.0.5:6380/2"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");

        let missing = Loaded::load(Some("nope.toml".as_ref()), json!({})).unwrap_err();
        assert!(missing.to_string().contains("nope.toml"), "{missing}");
        Ok(())
    });
}

/// Each error names the key and the layer it came from.
#[test]
fn errors_name_the_key_and_its_source() {
    /// A config file, an environment variable, flags, and what the error must say.
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, Value, &'a [&'a str]);
    let cases: [Case<'_>; 12] = [
        (
            "[host]\nconcurency = 4\n",
            None,
            json!({}),
            &[
                "`host.concurency`",
                "TOML file rebound.toml",
                "unknown field",
            ],
        ),
        (
            "[hosts]\n",
            None,
            json!({}),
            &["`hosts`", "TOML file rebound.toml"],
        ),
        (
            "[host]\nconcurrency = \"many\"\n",
            None,
            json!({}),
            &[
                "`host.concurrency`",
                "TOML file rebound.toml",
                "invalid type",
            ],
        ),
        (
            "",
            Some(("REBOUND_LIMITS__FUEL", "-5")),
            json!({}),
            &["`limits.fuel`", "environment variable REBOUND_LIMITS__FUEL"],
        ),
        (
            "",
            Some(("REBOUND_WORKERS", "4")),
            json!({}),
            &[
                "`workers`",
                "environment variable REBOUND_WORKERS",
                "unknown field",
            ],
        ),
        (
            "[host]\nlease_ms = 5\n",
            None,
            json!({}),
            &[
                "`host.lease_ms`",
                "TOML file rebound.toml",
                "out of range: 100 to",
            ],
        ),
        (
            "",
            None,
            json!({"gpu": {"interval_ms": 1}}),
            &[
                "`gpu.interval_ms`",
                "command-line flags",
                "out of range: 10 to",
            ],
        ),
        (
            "",
            None,
            json!({"host": {"concurrency": 1_000_000}}),
            &[
                "`host.concurrency`",
                "command-line flags",
                "out of range: 1 to 10000",
            ],
        ),
        (
            "[log]\nlevel = \"verbose\"\n",
            None,
            json!({}),
            &[
                "`log.level`",
                "TOML file rebound.toml",
                "`verbose` is not a log level",
            ],
        ),
        (
            "",
            Some(("REBOUND_HTTP_TOKEN", " ")),
            json!({}),
            &[
                "`http.token`",
                "environment variable REBOUND_HTTP_TOKEN",
                "empty",
            ],
        ),
        (
            "",
            Some(("REBOUND_REDIS_URL", "localhost:6379")),
            json!({}),
            &[
                "`store.redis_url`",
                "environment variable REBOUND_REDIS_URL",
                "not a Redis URL",
            ],
        ),
        (
            "[scheduler]\ninterval = -1\n",
            None,
            json!({}),
            &["`scheduler.interval`", "TOML file rebound.toml", "seconds"],
        ),
    ];
    for (file, env, flags, expected) in cases {
        jailed(|jail| {
            if !file.is_empty() {
                jail.create_file("rebound.toml", file)
                    .map_err(|e| e.to_string())?;
            }
            if let Some((name, value)) = env {
                jail.set_env(name, value);
            }
            let err = match load(flags.clone()) {
                Ok(_) => return Err(format!("{file:?} {env:?} {flags} loaded")),
                Err(err) => err,
            };
            for part in expected {
                if !err.contains(part) {
                    return Err(format!("{err}\n  should mention {part}"));
                }
            }
            Ok(())
        });
    }
}

#[test]
fn the_old_frameworks_settings_map_onto_the_new_keys() {
    jailed(|jail| {
        jail.create_file(
            "rebound.toml",
            r#"
[storage]
type = "redis"
host = "redis.internal"
port = 6390
database = 3
password = "p@ss:w/rd"

[task]
biz_prefix = "reports"
batch_size = 50
max_retry_count = 5
backoff_strategy = "linear"
backoff_interval = 0.5
backoff_multiplier = 1.5

[threadpool]
concurrency = 12
proc_mode = "process"
exec_timeout = 300

[scheduler]
interval = 2

[host]
concurrency = 20
"#,
        )
        .map_err(|e| e.to_string())?;
        let loaded = load(json!({}))?;
        let s = &loaded.settings;
        assert_eq!(
            s.store.redis_url.as_deref(),
            Some("redis://:p%40ss%3Aw%2Frd@redis.internal:6390/3")
        );
        assert_eq!(s.host.batch_size, 50);
        assert_eq!(s.retry.max_retry_count, 5);
        assert_eq!(s.retry.backoff, Strategy::Linear);
        assert_eq!(s.retry.backoff_interval_ms, 500);
        assert_eq!(s.retry.backoff_multiplier, 1.5);
        assert_eq!(s.limits.exec_timeout_ms, 300_000);
        assert_eq!(s.host.poll_interval_ms, 2_000);
        // The new key, given too, wins over the old one.
        assert_eq!(s.host.concurrency, 20);
        let warnings = loaded.warnings.join("\n");
        for expected in [
            "`storage.host` is the old framework's name; use `store.redis_url`",
            "`threadpool.concurrency` is ignored: `host.concurrency` is set too",
            "`task.biz_prefix` is ignored",
            "`threadpool.proc_mode` is ignored",
        ] {
            assert!(
                warnings.contains(expected),
                "{warnings}\n  lacks {expected}"
            );
        }

        // What does not map is an error that says where to put it instead.
        jail.create_file("rebound.toml", "[task]\nmin_gpu_memory_gb = 8\n")
            .map_err(|e| e.to_string())?;
        let err = load(json!({})).unwrap_err();
        assert!(err.contains("[plugins.NAME]"), "{err}");
        jail.create_file("rebound.toml", "[storage]\ntype = \"mysql\"\n")
            .map_err(|e| e.to_string())?;
        let err = load(json!({})).unwrap_err();
        assert!(
            err.contains("`storage.type`") && err.contains("mysql"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn per_plugin_gpu_needs_come_from_the_config() {
    jailed(|jail| {
        jail.create_file(
            "rebound.toml",
            "[plugins.embed]\nmin_gpu_memory_gb = 2.5\nmax_gpu_utilization = 60\n",
        )
        .map_err(|e| e.to_string())?;
        let loaded = load(json!({}))?;
        let gpu = loaded.plugin_gpu("embed").expect("a requirement");
        assert_eq!(gpu.memory_bytes, Some(2 * GIB + GIB / 2));
        assert_eq!(gpu.max_utilization, Some(60));
        assert_eq!(loaded.plugin_gpu("echo"), None);

        jail.create_file(
            "rebound.toml",
            "[plugins.embed]\nmax_gpu_utilization = 150\n",
        )
        .map_err(|e| e.to_string())?;
        let err = load(json!({})).unwrap_err();
        assert!(
            err.contains("`plugins.embed`") && err.contains("max_gpu_utilization"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn a_store_flag_beats_a_store_from_a_lower_layer() {
    jailed(|jail| {
        jail.create_file(
            "rebound.toml",
            "[store]\nredis_url = \"redis://:hunter2@redis.internal:6379\"\n",
        )
        .map_err(|e| e.to_string())?;
        let from_file = load(json!({}))?;
        assert!(from_file.settings.store.redis_url.is_some());
        assert!(
            !from_file.to_masked_toml().contains("hunter2"),
            "{}",
            from_file.to_masked_toml()
        );

        // `--data` on the command line means the embedded store, whatever the file says.
        let flags = load(json!({"store": {"data": "tasks.db"}}))?;
        assert_eq!(flags.settings.store.redis_url, None);
        let warnings = flags.warnings.join("\n");
        assert!(warnings.contains("using the embedded store"), "{warnings}");

        // Both at the same layer: Redis, as documented.
        jail.create_file(
            "rebound.toml",
            "[store]\nredis_url = \"redis://localhost:6379\"\ndata = \"tasks.db\"\n",
        )
        .map_err(|e| e.to_string())?;
        let same = load(json!({}))?;
        assert!(same.settings.store.redis_url.is_some());

        // A token without an address to serve on is a warning, not silence.
        jail.set_env("REBOUND_HTTP_TOKEN", "s3cret");
        let token = load(json!({}))?;
        let warnings = token.warnings.join("\n");
        assert!(warnings.contains("the HTTP API is off"), "{warnings}");
        Ok(())
    });
}
