//! batchbox: serves a libtorch classifier with batched inference.
//!
//! - [`config`]: `shared_config.yaml`, validated into typed settings;
//! - [`batcher`]: how sequences are grouped into forward passes (pure logic);
//! - [`model`]: the exported model on CPU/CUDA, its tokenizer and the thread that owns it.

pub mod batcher;
pub mod config;
pub mod model;
