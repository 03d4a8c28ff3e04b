//! What one request's instance holds while it runs, and where its time went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Histogram;
use wasmtime::component::ResourceTable;
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

/// Per-request state of one instance.
pub(crate) struct RequestState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: MemoryLimit,
    /// The tenant's model, behind its response cache if it has one.
    pub(crate) model: Arc<dyn PluginModel>,
    pub(crate) tenant: Arc<str>,
    pub(crate) request_id: u64,
    pub(crate) started: Instant,
    /// When the request's wall-clock limit runs out: sequences still waiting for the model then
    /// are dropped from its queue.
    pub(crate) deadline: Instant,
    /// Time spent inside host calls, which the CPU deadline does not count.
    pub(crate) host_time: Duration,
    /// Of `host_time`: tokenizing, and the model's queue and compute times (of its answers).
    pub(crate) tokenize_time: Duration,
    pub(crate) queue_time: Duration,
    pub(crate) compute_time: Duration,
    /// What this request's host calls have asked for so far, against the tenant's quotas.
    pub(crate) usage: host_api::Usage,
    pub(crate) quotas: TenantLimits,
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
