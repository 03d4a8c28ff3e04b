//! batchbox: serves a libtorch classifier with batched inference, its request handling in
//! sandboxed WebAssembly plugins. This crate is the `batchbox` command and its config file; each
//! concern is a crate of its own (see README "Layout" and docs/architecture.md):
//!
//! - `batchbox-batcher`: what runs in each forward pass (pure scheduling);
//! - `batchbox-model`: the model handle, its queue and thread, manifest, tokenizer, response cache;
//! - `batchbox-model-tch`: the libtorch backend (the only crate that links libtorch);
//! - `batchbox-tenants`: routes, keys and quotas;
//! - `batchbox-plugins`: the WebAssembly plugin runtime;
//! - `batchbox-server`: HTTP, host routes, connection limits, and errors mapped to statuses;
//! - [`config`]: `shared_config.yaml`, composed from those crates' sections and checked whole;
//! - [`loader`]: what serves a config, built whole at startup and by every reload.

pub mod config;
pub mod loader;
