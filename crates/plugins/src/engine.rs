//! The one wasmtime engine every plugin shares: its pool of instance slots, its linker and its
//! epoch ticker (the clock of CPU deadlines).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use wasmtime::component::Linker;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use batchbox_tenants::TenantLimits;

use crate::bindings;
use crate::cache::CodeCache;
use crate::error::PluginError;
use crate::runtime::PluginRuntime;
use crate::state::{Host, RequestState};

/// How often the epoch advances: the granularity of CPU deadlines.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Bytes of written linear memory a freed pool slot keeps resident for its next instance.
pub(crate) const KEEP_RESIDENT: usize = 8 << 20;

/// What every generation of plugins shares: the engine with its pool of instance slots, the
/// linker, and the directory compiled code is cached in. A config reload builds its new
/// [`PluginRuntime`] here, beside the one serving, so `server.max_instances` bounds the instances
/// of both together and the pool's address space is reserved once.
pub struct PluginHost {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<RequestState>,
    /// One permit per instance the pooling allocator has room for: a request that finds none
    /// is refused at once (503), before any store is made.
    pub(crate) instances: Arc<Semaphore>,
    pub(crate) cache: CodeCache,
}

impl PluginHost {
    /// The engine for `max_instances` instances at once, caching compiled plugins in `cache_dir`
    /// (kept under `cache_max_bytes`, by the policy in `cache.rs`).
    pub fn new(max_instances: u32, cache_dir: &Path, cache_max_bytes: u64) -> Result<Self, PluginError> {
        let host_error = |e: wasmtime::Error| PluginError::Compile { tenant: "*".into(), message: e.to_string() };
        let engine = new_engine(max_instances).map_err(host_error)?;
        let mut linker: Linker<RequestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(host_error)?;
        bindings::Plugin::add_to_linker::<RequestState, Host>(&mut linker, |state| &mut state.host)
            .map_err(host_error)?;
        start_epoch_ticker(&engine);
        let instances = Arc::new(Semaphore::new(max_instances as usize));
        Ok(Self { engine, linker, instances, cache: CodeCache::new(cache_dir, cache_max_bytes) })
    }

    /// Trims the compiled-plugin cache to its budget, keeping the code `serving` uses (the
    /// policy is in `cache.rs`). Called once a config is in service, so that a config that fails
    /// to load, or a reload refused at its last step, costs no cached code.
    pub fn trim_cache(&self, serving: &PluginRuntime) {
        match self.cache.trim(&serving.code_keys) {
            Ok((0, _)) => {}
            Ok((files, bytes)) => tracing::info!(files, bytes, "removed old compiled plugins from the cache"),
            // A read-only cache (an image's), say: it only saves time.
            Err(e) => tracing::warn!(error = %e, "cannot trim the compiled-plugin cache"),
        }
    }
}

/// One engine for every plugin. A pool slot holds the largest memory any tenant may have; each
/// store's limiter then holds its plugin to its own limit. The slot's size costs address space
/// only, and no more than wasmtime reserves per memory anyway (4 GiB, so that bounds checks can be
/// elided): what is resident is what plugins touch.
pub(crate) fn new_engine(max_instances: u32) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(max_instances)
        // A wasip2 component holds a few core instances, memories and tables of its own.
        .total_core_instances(max_instances * 8)
        .total_memories(max_instances * 2)
        .total_tables(max_instances * 4)
        .total_stacks(max_instances)
        .max_memory_size(TenantLimits::MAX_MEMORY_BYTES);
    // A freed slot keeps the pages its plugin wrote resident, and copies the image back over
    // them, rather than dropping them for the next instance to fault in again: a CPython or
    // SpiderMonkey plugin writes to megabytes of its snapshot heap per request. The pages are
    // found with the PAGEMAP_SCAN ioctl (Linux 6.7+); without it wasmtime would reset the whole
    // kept region each time, so then nothing is kept.
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(wasmtime::Enabled::Yes).linear_memory_keep_resident(KEEP_RESIDENT);
    }
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true).allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// A thread that advances the engine's epoch; it lives as long as the process.
pub(crate) fn start_epoch_ticker(engine: &Engine) {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch ticker");
}
