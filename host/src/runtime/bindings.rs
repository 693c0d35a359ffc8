//! Host-side bindings generated from the WIT package in `wit/`; the rest of the host imports
//! the generated types from here and nowhere else.
//!
//! Exports are async so that a guest runs as a future the host can interleave with other
//! tasks; the imports (log, progress, cancelled) are cheap and stay synchronous. Imports are
//! trappable: one that goes over a limit on what crosses the boundary ends the attempt.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "rebound:plugin/handler",
    imports: { default: trappable },
    exports: { default: async },
});

pub use self::rebound::plugin::types::{Level, RetryAfter};
