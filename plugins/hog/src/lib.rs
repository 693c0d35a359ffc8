//! `hog`: takes memory, for the sandbox's memory-cap tests.
//!
//! Parameters: `mb`, how many MiB to allocate and write to (one MiB at a time, each kept
//! until the handler returns). Under the cap it returns `{"held_mb": mb}`; over it, the
//! host stops the instance at the grow that would cross the cap.

use rebound_sdk::serde_json::{Value, json};
use rebound_sdk::{Failure, Handler, Task, export_handler};

struct Hog;

const MIB: usize = 1024 * 1024;

impl Handler for Hog {
    fn handle(task: Task) -> Result<Value, Failure> {
        let mb: usize = task.params_field("mb")?;
        let mut held: Vec<Vec<u8>> = Vec::with_capacity(mb);
        for i in 0..mb {
            // Written, not only reserved, so every page is really in use.
            held.push(vec![(i % 251) as u8 + 1; MIB]);
        }
        let checksum: u64 = held.iter().map(|chunk| u64::from(chunk[MIB - 1])).sum();
        Ok(json!({ "held_mb": held.len(), "checksum": checksum }))
    }
}

export_handler!(Hog);
