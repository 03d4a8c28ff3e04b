//! The plugin runtime: WebAssembly components (wasmtime, component model) that handle requests.
//!
//! - One [`Engine`] for all plugins, with the pooling allocator (instantiation in microseconds)
//!   and epoch interruption (a CPU deadline for guest code).
//! - Each plugin is compiled once at start into an `InstancePre`; the compiled code is cached on
//!   disk, keyed by the .wasm's hash and the engine's settings, so a restart does not recompile.
//! - Every request gets a fresh `Store` and instance: nothing leaks between requests. The store
//!   caps linear memory; the epoch callback stops a guest whose own time (time in `tokenize` and
//!   `infer` excluded) passes its CPU limit; a `tokio::time::timeout` bounds the whole call.
//! - WASI grants nothing: no preopened directories, no environment, no sockets, and clocks
//!   rounded to [`CLOCK_RESOLUTION`] (no fine timer for side channels). What a plugin prints
//!   goes to the host's log, tagged with its tenant.
//! - Each tenant's quotas hold per request: what the host copies out of the plugin per call
//!   (wasmtime's hostcall fuel, checked before copying), and the texts, sequences and tokens
//!   its host calls may ask for (checked before any work).
//!
//! Along an instance's life: `engine` (the shared engine, pool and linker), `load` (a
//! generation's plugins compiled, checked and configured), `runtime` (a request through an idle or
//! fresh instance), `sandbox` (a store within the tenant's limits, and how a run ends), `state`
//! (what a request's store holds), `host_api` (the host calls of `wit/batchbox.wit`), `error`
//! (every way it can fail, named); `cache`, `clock` and `model` serve them.

mod cache;
mod clock;
mod engine;
mod error;
mod host_api;
mod load;
mod model;
mod runtime;
mod sandbox;
mod state;

use std::time::Duration;

pub use bindings::exports::batchbox::plugin::handler::{Request, Response};
pub use engine::PluginHost;
pub use error::PluginError;
pub use model::{InferFuture, PluginModel, with_caches};
pub use runtime::PluginRuntime;
pub use state::TimeSplit;

// Generated from the WIT, whose own comments document it.
#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../../wit",
        imports: {
            "batchbox:plugin/host.tokenize": async | trappable,
            "batchbox:plugin/host.infer": async | trappable,
            "batchbox:plugin/host.infer-texts": async | trappable,
            "batchbox:plugin/host.infer-pairs": async | trappable,
            default: trappable,
        },
        exports: { default: async },
    });
}

/// Plugins see time only to this precision.
pub const CLOCK_RESOLUTION: Duration = Duration::from_micros(100);

/// A `POST` of JSON `body` to `path`, as a client would send it: for callers that hand a plugin a
/// request in process (`batchbox predict`, benchmarks, tests) rather than over HTTP.
pub fn json_post(path: &str, body: Vec<u8>) -> Request {
    Request {
        method: "POST".into(),
        path: path.into(),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}
