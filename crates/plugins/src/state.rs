//! What one request's instance holds while it runs, and where its time went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Histogram;
use wasmtime::component::{HasData, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use batchbox_metrics::names;
use batchbox_tenants::TenantLimits;

use crate::sandbox::MemoryLimit;
use crate::{PluginModel, host_api};

/// Where one request's time went inside the plugin runtime.
#[derive(Debug, Default, Clone, Copy)]
pub struct TimeSplit {
    /// The host tokenizing for the plugin.
    pub tokenize: Duration,
    /// The request's sequences waiting for the model.
    pub queue: Duration,
    /// The model computing them.
    pub inference: Duration,
    /// The plugin's own time: wall time outside host calls (instantiation included).
    pub plugin: Duration,
}

/// Per-request state of one instance: WASI's, the store's memory limit, and the host's own.
pub(crate) struct RequestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: MemoryLimit,
    /// All that the host calls of `wit/batchbox.wit` see (through [`Host`]).
    pub(crate) host: HostState,
}

/// What the host calls see of a request, and nothing else: a new host function is the WIT,
/// `host_api.rs`, and [`HostTimes`] if its time counts apart.
pub(crate) struct HostState {
    /// The tenant's model, behind its response cache if it has one.
    pub(crate) model: Arc<dyn PluginModel>,
    pub(crate) tenant: Arc<str>,
    pub(crate) request_id: u64,
    pub(crate) started: Instant,
    /// When the request's wall-clock limit runs out: sequences still waiting for the model then
    /// are dropped from its queue.
    pub(crate) deadline: Instant,
    pub(crate) times: HostTimes,
    /// What this request's host calls have asked for so far, against the tenant's quotas.
    pub(crate) usage: host_api::Usage,
    pub(crate) quotas: TenantLimits,
}

/// Where a request's time inside host calls went.
#[derive(Debug, Default)]
pub(crate) struct HostTimes {
    /// All of it: the CPU deadline does not count it.
    pub(crate) host: Duration,
    /// Of `host`: tokenizing, and the model's queue and compute times (of its answers).
    pub(crate) tokenize: Duration,
    pub(crate) queue: Duration,
    pub(crate) compute: Duration,
}

impl HostState {
    /// A store's host state, before its first request.
    pub(crate) fn new(model: Arc<dyn PluginModel>, tenant: Arc<str>, quotas: TenantLimits) -> Self {
        let now = Instant::now();
        let (times, usage) = (HostTimes::default(), host_api::Usage::default());
        Self { model, tenant, request_id: 0, started: now, deadline: now, times, usage, quotas }
    }

    /// The one reset, at the start of each request (a reused instance's too): its id, its clock
    /// and deadline, and nothing counted yet.
    pub(crate) fn begin(&mut self, request_id: u64, wall_limit: Duration) {
        self.request_id = request_id;
        self.started = Instant::now();
        self.deadline = self.started + wall_limit;
        self.times = HostTimes::default();
        self.usage = host_api::Usage::default();
    }

    /// The plugin's own time so far: wall time outside host calls.
    pub(crate) fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.times.host)
    }

    /// Where the request's time went so far.
    pub(crate) fn split(&self) -> TimeSplit {
        let times = &self.times;
        TimeSplit { tokenize: times.tokenize, queue: times.queue, inference: times.compute, plugin: self.guest_time() }
    }
}

/// How the host interface is added to the linker: its calls get `&mut HostState`, projected out
/// of the store's `RequestState` (as wasmtime-wasi-http's `WasiHttp` does).
pub(crate) struct Host;

impl HasData for Host {
    type Data<'a> = &'a mut HostState;
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// A tenant's histograms of where its requests' time went, registered once at load, so that a
/// request records into them without looking its series up.
pub(crate) struct SplitMetrics {
    pub(crate) tokenize: Histogram,
    pub(crate) queue: Histogram,
    pub(crate) inference: Histogram,
    pub(crate) plugin: Histogram,
}

impl SplitMetrics {
    pub(crate) fn new(tenant: &str) -> Self {
        let histogram = |name: &'static str| metrics::histogram!(name, "tenant" => tenant.to_owned());
        Self {
            tokenize: histogram(names::TOKENIZE_SECONDS),
            queue: histogram(names::QUEUE_SECONDS),
            inference: histogram(names::INFERENCE_SECONDS),
            plugin: histogram(names::PLUGIN_SECONDS),
        }
    }

    pub(crate) fn record(&self, split: &TimeSplit) {
        self.tokenize.record(split.tokenize.as_secs_f64());
        self.queue.record(split.queue.as_secs_f64());
        self.inference.record(split.inference.as_secs_f64());
        self.plugin.record(split.plugin.as_secs_f64());
    }
}
