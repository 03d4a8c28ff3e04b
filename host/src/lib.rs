//! batchbox: serves a libtorch classifier with batched inference.
//!
//! - [`config`]: `shared_config.yaml`, validated into typed settings;
//! - [`cache`]: a tenant's opt-in response cache of logits per sequence;
//! - [`batcher`]: how sequences are grouped into forward passes, within one call and across
//!   calls and tenants (pure logic);
//! - [`model`]: the exported model on CPU/CUDA, its tokenizer and the thread that owns it;
//! - [`plugins`]: the WebAssembly plugin runtime (wasmtime, component model);
//! - [`tenants`]: routing a request to its tenant, API keys and per-tenant quotas;
//! - [`server`]: HTTP, host-owned routes, the one place errors become statuses, and the
//!   connections' limits and drain.

pub mod batcher;
pub mod cache;
pub mod config;
pub mod model;
pub mod plugins;
pub mod server;
pub mod tenants;
