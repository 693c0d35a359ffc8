//! `echo`: completes every task with its own parameters as the result.
//!
//! The smallest useful handler, and the one benchmarks use to measure what the host costs
//! per task.

use rebound_sdk::serde_json::Value;
use rebound_sdk::{Failure, Handler, Task, export_handler};

struct Echo;

impl Handler for Echo {
    fn handle(task: Task) -> Result<Value, Failure> {
        task.params()
    }
}

export_handler!(Echo);
