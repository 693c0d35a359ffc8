//! `hostile`: misbehaves on request, for the sandbox's hostile-plugin suite.
//!
//! Parameters: `do`, what to try, and `n`, how much of it. Each behaviour has a twin "just
//! inside the limit" in the same code, chosen by a smaller `n`, so every limit is tested in
//! a pair with one plugin:
//!
//! | `do` | what it does with `n` |
//! |---|---|
//! | `recurse` | recurses `n` calls deep (a large `n` overflows the WebAssembly stack) |
//! | `panic` | panics when `n` is not zero; returns otherwise |
//! | `output` | returns a result of `n` bytes |
//! | `log` | writes `n` log lines of 100 bytes through the host's `log` |
//! | `progress` | reports progress `n` times |
//! | `read_file` | reads the file named by `path` |
//! | `env` | reads the environment variable named by `name` |
//! | `http` | sends a GET to `url` through `wasi:http`; a 503 asks for a retry after 1 s |
//!
//! The result says what happened, so a test can check that a twin really did its work.

use rebound_sdk::serde_json::{Value, json};
use rebound_sdk::{Failure, Handler, Task, export_handler};

struct Hostile;

/// `n` calls deep, each frame kept live by the addition after the call.
fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    1 + recurse(std::hint::black_box(n - 1))
}

impl Handler for Hostile {
    fn handle(task: Task) -> Result<Value, Failure> {
        let what: String = task.params_field("do")?;
        let n: u64 = task.params_field("n").unwrap_or(0);
        match what.as_str() {
            "recurse" => Ok(json!({ "depth": recurse(n) })),
            "panic" => {
                assert!(n == 0, "hostile plugin panics as asked (n = {n})");
                Ok(json!({ "panicked": false }))
            }
            "output" => Ok(Value::String("x".repeat(n as usize))),
            "log" => {
                let line = "l".repeat(100);
                for _ in 0..n {
                    rebound_sdk::log::info(&line);
                }
                Ok(json!({ "logged": n }))
            }
            "progress" => {
                // Straight to the host's import: the SDK's `set_progress` sends only rises,
                // which a hostile plugin need not go through.
                for i in 0..n {
                    rebound_sdk::bindings::rebound::plugin::host::set_progress((i % 101) as u8);
                }
                Ok(json!({ "reported": n }))
            }
            "read_file" => {
                let path: String = task.params_field("path")?;
                match std::fs::read_to_string(&path) {
                    Ok(text) => Ok(json!({ "read_bytes": text.len() })),
                    Err(err) => Err(Failure::fatal(format!("cannot read {path}: {err}"))),
                }
            }
            "env" => {
                let name: String = task.params_field("name")?;
                match std::env::var(&name) {
                    Ok(value) => Ok(json!({ "value": value })),
                    Err(err) => Err(Failure::fatal(format!("cannot read ${name}: {err}"))),
                }
            }
            "http" => {
                let url: String = task.params_field("url")?;
                let response = rebound_sdk::http::get(&url)
                    .map_err(|err| Failure::fatal(format!("GET {url}: {err}")))?;
                if response.status == 503 {
                    return Err(Failure::retry_after(
                        std::time::Duration::from_secs(1),
                        format!("GET {url}: 503, busy"),
                    ));
                }
                Ok(json!({ "status": response.status, "body": response.text() }))
            }
            other => Err(Failure::fatal(format!("unknown `do`: {other}"))),
        }
    }
}

export_handler!(Hostile);
