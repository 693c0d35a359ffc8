//! Rebound runs background tasks with retry and backoff, each attempt inside a sandboxed
//! WebAssembly instance of a handler plugin.
//!
//! The words used throughout:
//!
//! - **task**: one unit of work with JSON parameters, submitted to a **queue**.
//! - **plugin**: a WebAssembly component implementing the `rebound:plugin/handler` world
//!   (`wit/`); the plugin `NAME` serves the queue `NAME` unless its manifest names another.
//! - **attempt**: one run of a task's handler, in a fresh **instance** of its plugin.
//! - **lease**: a host's claim on a running task, with a fencing token that makes reports
//!   from a host that lost the task harmless.
//! - **store**: where tasks live (Redis, or an embedded SQLite file for one machine).
//!
//! The parts, one module each:
//!
//! | module        | owns                                                          |
//! |---------------|---------------------------------------------------------------|
//! | [`task`]      | the task model and its states                                 |
//! | [`backoff`]   | retry policies and the delay between attempts                 |
//! | [`store`]     | storing tasks and every state transition (Redis, embedded)    |
//! | [`runtime`]   | the wasmtime engine, plugins, and the per-attempt sandbox     |
//! | [`reload`]    | following the plugin directory and loading what changes       |
//! | [`scheduler`] | claiming tasks, running attempts, applying the retry policy   |
//! | [`gpu`]       | the GPU gate: probes, requirements, admission, reservations   |
//! | [`metrics`]   | every metric the host exports                                 |
//! | [`http`]      | the host's HTTP API, health checks and `/metrics`             |
//! | [`config`]    | the host's settings                                           |
//! | [`settings`]  | layered configuration: defaults, file, environment, flags     |
//! | [`client`]    | the library API: submit, inspect, and work on tasks by hand   |
//! | [`cli`]       | the `rebound` command                                         |

pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod gpu;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod runtime;
pub mod scheduler;
pub mod settings;
pub mod store;
pub mod task;
