//! `sleepy`: keeps the CPU busy for a given time, without ever yielding to the host.
//!
//! Parameters: `ms` (default 100), how long to spin. It reads the clock through WASI,
//! reports its progress as it goes, and otherwise loops without ever checking `cancelled()`,
//! so only the host's epoch deadline or fuel budget can stop it early: exactly what the
//! sandbox's limit tests need. With `"sleep": true` it blocks in a WASI sleep instead of
//! spinning, which no epoch check can see. Its result names the GPU the host admitted the
//! task to (`"gpu": null` when it needs none).

use rebound_sdk::serde_json::{Value, json};
use rebound_sdk::{Failure, Handler, Task, export_handler};
use std::time::{Duration, Instant};

struct Sleepy;

impl Handler for Sleepy {
    fn handle(task: Task) -> Result<Value, Failure> {
        let ms: u64 = if task.params.trim() == "{}" {
            100
        } else {
            task.params_field("ms")?
        };
        let sleep: bool = task.params_field("sleep").unwrap_or(false);
        if sleep {
            std::thread::sleep(Duration::from_millis(ms));
            return Ok(json!({ "slept_ms": ms, "gpu": task.gpu }));
        }
        let started = Instant::now();
        let mut spins: u64 = 0;
        let mut reported = 0;
        while started.elapsed() < Duration::from_millis(ms) {
            let percent = (started.elapsed().as_millis() * 100 / u128::from(ms.max(1))) as u8;
            if percent >= reported + 10 {
                reported = percent;
                rebound_sdk::set_progress(percent);
            }
            // Arithmetic the optimiser cannot drop, between clock reads.
            for i in 0..10_000u64 {
                spins = std::hint::black_box(spins.wrapping_add(i));
            }
        }
        rebound_sdk::set_progress(100);
        Ok(json!({ "spun_ms": ms, "spins": spins, "gpu": task.gpu }))
    }
}

export_handler!(Sleepy);
