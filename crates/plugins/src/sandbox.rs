//! A store within a tenant's limits: linear memory, CPU and wall time, hostcall bytes and
//! printed output; and how a run ends (a value, a refusal, or a named trap).

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use batchbox_metrics::names;

use crate::clock;
use crate::error::{PluginError, classify_trap};
use crate::runtime::{LoadedPlugin, PluginRuntime};
use crate::state::{HostState, RequestState, TimeSplit};

/// What a plugin may print per request before further output is dropped.
pub(crate) const OUTPUT_CAPACITY: usize = 64 << 10;

/// A store, the plugin's captured output, and the instance permit it holds until the store is
/// gone (fields drop in order: the store first). One request's, or a reused instance's.
pub(crate) struct Sandbox {
    pub(crate) store: Store<RequestState>,
    pub(crate) stdout: Output,
    pub(crate) stderr: Output,
    /// Requests this store has begun.
    pub(crate) requests: u32,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl Sandbox {
    /// Runs `work` as request `request_id` under the tenant's limits (each request's own, on a
    /// reused instance too), logs what the plugin printed, and names what stopped it: a trap, a
    /// limit, or a config the plugin refused (`Err(message)`).
    pub(crate) async fn run<T>(
        &mut self,
        plugin: &LoadedPlugin,
        request_id: u64,
        work: impl AsyncFnOnce(&mut Store<RequestState>, &LoadedPlugin) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, PluginError> {
        let limit = Duration::from_millis(plugin.limits.wall_ms);
        let state = self.store.data_mut();
        state.host.begin(request_id, limit);
        state.limits.reached = false;
        self.store.set_hostcall_fuel(plugin.limits.max_hostcall_bytes);
        self.store.set_epoch_deadline(1);
        self.requests += 1;

        let outcome = tokio::time::timeout(limit, work(&mut self.store, plugin)).await;
        let memory_reached = self.store.data().limits.reached;
        self.stdout.log(&plugin.tenant, request_id, "stdout");
        self.stderr.log(&plugin.tenant, request_id, "stderr");
        let tenant = || plugin.tenant.to_string();
        match outcome {
            Err(_) => Err(PluginError::WallTimeout { tenant: tenant(), limit_ms: plugin.limits.wall_ms }),
            Ok(Err(trap)) => Err(classify_trap(trap, tenant(), plugin, memory_reached)),
            Ok(Ok(Err(message))) => Err(PluginError::Configure { tenant: tenant(), message }),
            Ok(Ok(Ok(value))) => Ok(value),
        }
    }
}

impl Sandbox {
    /// Counts a request's outcome into its tenant's metrics: what stopped the plugin, if a trap
    /// or a limit did, and where the request's time went (which it returns).
    pub(crate) fn record<T>(&self, plugin: &LoadedPlugin, outcome: &Result<T, PluginError>) -> TimeSplit {
        let state = &self.store.data().host;
        if let Err(e) = outcome
            && let Some(kind) = e.trap_kind()
        {
            metrics::counter!(names::PLUGIN_TRAPS, "tenant" => state.tenant.to_string(), "kind" => kind).increment(1);
            // Passing max_hostcall_bytes is a quota's refusal too, counted as the host calls' are.
            if let PluginError::HostcallBytes { .. } = e {
                let quota = "max_hostcall_bytes";
                metrics::counter!(names::QUOTA_REJECTIONS, "tenant" => state.tenant.to_string(), "quota" => quota)
                    .increment(1);
            }
        }
        let split = state.split();
        plugin.split_metrics.record(&split);
        split
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        metrics::gauge!(names::PLUGIN_INSTANCES).decrement(1.0);
    }
}

/// A pipe the plugin prints to, and how much of it has been logged.
pub(crate) struct Output {
    pub(crate) pipe: MemoryOutputPipe,
    pub(crate) logged: usize,
}

impl Output {
    pub(crate) fn new(pipe: MemoryOutputPipe) -> Self {
        Self { pipe, logged: 0 }
    }

    /// Logs, line by line, what was printed since the last call.
    pub(crate) fn log(&mut self, tenant: &str, request_id: u64, stream: &str) {
        let contents = self.pipe.contents();
        for line in String::from_utf8_lossy(&contents[self.logged..]).lines().filter(|l| !l.is_empty()) {
            tracing::info!(tenant, request_id, stream, "{line}");
        }
        self.logged = contents.len();
    }
}

/// The store's memory limit, remembering whether the plugin ran into it, so its trap (Rust aborts
/// when an allocation fails) can be named.
pub(crate) struct MemoryLimit {
    pub(crate) limits: StoreLimits,
    pub(crate) reached: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.reached |= !allowed;
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl PluginRuntime {
    /// A fresh store, within the tenant's limits, in the pool slot `permit` holds.
    pub(crate) fn sandbox(&self, plugin: &LoadedPlugin, permit: OwnedSemaphorePermit) -> Sandbox {
        // An instance that is reused keeps its pipes: twice the room, and it retires once a
        // request's worth is used (`LoadedPlugin::keep_idle`), so each request has at least
        // `OUTPUT_CAPACITY`.
        let capacity = if plugin.reuse == 0 { OUTPUT_CAPACITY } else { 2 * OUTPUT_CAPACITY };
        let stdout = MemoryOutputPipe::new(capacity);
        let stderr = MemoryOutputPipe::new(capacity);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(clock::CoarseWallClock)
            .monotonic_clock(clock::CoarseMonotonicClock::new())
            .build();
        let state = RequestState {
            wasi,
            table: ResourceTable::new(),
            limits: MemoryLimit {
                limits: StoreLimitsBuilder::new().memory_size(plugin.memory_limit).instances(16).build(),
                reached: false,
            },
            host: HostState::new(plugin.model.clone(), plugin.tenant.clone(), plugin.limits),
        };
        metrics::gauge!(names::PLUGIN_INSTANCES).increment(1.0);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        let cpu_limit = Duration::from_millis(plugin.limits.cpu_ms);
        store.epoch_deadline_callback(move |store| {
            let guest_time = store.data().host.guest_time();
            // Over the limit: trap. Otherwise let other tasks run, then check again next tick.
            Ok(if guest_time > cpu_limit { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        Sandbox { store, stdout: Output::new(stdout), stderr: Output::new(stderr), requests: 0, _permit: permit }
    }
}
