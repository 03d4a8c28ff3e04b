//! One config's generation of plugins, and a request's way through one of them: an idle
//! instance or a fresh one, configured, handled, and kept for reuse.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::Instrument;
use wasmtime::component::ComponentExportIndex;
use wasmtime::{Engine, Store};

use batchbox_tenants::TenantLimits;

use crate::error::PluginError;
use crate::sandbox::{OUTPUT_CAPACITY, Sandbox};
use crate::state::{RequestState, SplitMetrics, TimeSplit};
use crate::{PluginModel, Request, Response, bindings};

/// Requests a reused instance serves before it is replaced by a fresh one: a bound on how long
/// state a plugin leaves behind (and memory it leaks) can live.
pub(crate) const REUSE_REQUESTS: u32 = 1_000;

/// How long configuring a plugin at load may wait for a free instance (a reload, under load).
pub(crate) const CONFIGURE_WAIT: Duration = Duration::from_secs(30);

/// One tenant's plugin in a generation: compiled, configured once, with its limits, its model
/// and the instances it keeps idle.
pub(crate) struct LoadedPlugin {
    pub(crate) tenant: Arc<str>,
    pub(crate) pre: bindings::PluginPre<RequestState>,
    pub(crate) config_json: String,
    pub(crate) limits: TenantLimits,
    /// `limits.memory_bytes`, or its default for this plugin.
    pub(crate) memory_limit: usize,
    pub(crate) model: Arc<dyn PluginModel>,
    /// `reuse_instances`: how many configured instances may wait here for the next request.
    pub(crate) reuse: usize,
    /// Instances that served a request and wait for the next, with their stores.
    pub(crate) idle: Mutex<Vec<(Sandbox, bindings::Plugin)>>,
    /// What the plugin's optional `describe` answered at startup: an OpenAPI fragment.
    pub(crate) description: Option<serde_json::Value>,
    pub(crate) split_metrics: SplitMetrics,
    /// The SHA-256 of the .wasm file this code was compiled from, in hex.
    pub(crate) wasm_sha256: String,
}

impl LoadedPlugin {
    /// Keeps an instance that served a request for the next one, if the tenant reuses instances
    /// and it has not served its share: [`REUSE_REQUESTS`] requests, or a request's worth of
    /// output. Otherwise it is dropped here, and its pool slot and permit are freed.
    pub(crate) fn keep_idle(&self, sandbox: Sandbox, instance: bindings::Plugin) {
        let printed = sandbox.stdout.logged.max(sandbox.stderr.logged);
        if sandbox.requests < REUSE_REQUESTS && printed <= OUTPUT_CAPACITY {
            let mut idle = self.idle.lock().expect("idle instances");
            if idle.len() < self.reuse {
                idle.push((sandbox, instance));
            }
        }
    }
}

/// Every tenant's plugin, ready to instantiate: one config's generation.
pub struct PluginRuntime {
    pub(crate) engine: Engine,
    pub(crate) plugins: HashMap<String, LoadedPlugin>,
    /// The host's instance permits, shared with every generation.
    pub(crate) instances: Arc<Semaphore>,
    /// The cache keys of its plugins' compiled code: what trimming the cache must keep.
    pub(crate) code_keys: HashSet<String>,
}

impl PluginRuntime {
    /// Handles one request: in an idle instance of the tenant's plugin if the tenant reuses
    /// instances and one is idle, else in a fresh instance, configured first.
    pub async fn handle(&self, tenant: &str, request_id: u64, request: Request) -> Result<Response, PluginError> {
        self.handle_timed(tenant, request_id, request).await.0
    }

    /// [`PluginRuntime::handle`], with where the request's time went (for the access log).
    pub async fn handle_timed(
        &self,
        tenant: &str,
        request_id: u64,
        request: Request,
    ) -> (Result<Response, PluginError>, TimeSplit) {
        let mut split = TimeSplit::default();
        let result = self.run_request(tenant, request_id, request, &mut split).await;
        (result, split)
    }

    pub(crate) async fn run_request(
        &self,
        tenant: &str,
        request_id: u64,
        request: Request,
        split: &mut TimeSplit,
    ) -> Result<Response, PluginError> {
        let plugin = self.plugins.get(tenant).expect("routes only name loaded tenants");
        let (mut sandbox, idle) = match plugin.idle.lock().expect("idle instances").pop() {
            Some((sandbox, instance)) => (sandbox, Some(instance)),
            None => {
                let permit = self.instances.clone().try_acquire_owned().map_err(|_| PluginError::NoCapacity)?;
                (self.sandbox(plugin, permit), None)
            }
        };
        let span = tracing::debug_span!("plugin", tenant = &*plugin.tenant);
        let outcome = sandbox
            .run(plugin, request_id, async |store, plugin| {
                let instance = match idle {
                    Some(instance) => instance,
                    None => match configured(store, plugin).await? {
                        Ok(instance) => instance,
                        Err(message) => return Ok(Err(message)),
                    },
                };
                let response = instance.batchbox_plugin_handler().call_handle(&mut *store, &request).await?;
                Ok(Ok((response, instance)))
            })
            .instrument(span)
            .await;
        *split = sandbox.record(plugin, &outcome);
        let (response, instance) = outcome?;
        plugin.keep_idle(sandbox, instance);
        Ok(response)
    }

    /// The SHA-256 (hex) of the .wasm file the tenant's plugin runs: which version it is.
    pub fn wasm_sha256(&self, tenant: &str) -> Option<&str> {
        Some(&self.plugins.get(tenant)?.wasm_sha256)
    }

    /// What the tenant's plugin says of its API (`describe`, after `configure`), if anything.
    pub fn description(&self, tenant: &str) -> Option<&serde_json::Value> {
        self.plugins.get(tenant)?.description.as_ref()
    }

    /// Instantiates the plugin and runs its `configure` alone, which is what startup checks; then
    /// its `describe`, if `describe` is the index of one (no export describes nothing: "").
    pub(crate) async fn configure(
        &self,
        plugin: &LoadedPlugin,
        describe: Option<ComponentExportIndex>,
    ) -> Result<String, PluginError> {
        // A reload configures beside live traffic: it waits for a free instance, as requests do not.
        let permit = tokio::time::timeout(CONFIGURE_WAIT, self.instances.clone().acquire_owned())
            .await
            .map_err(|_| PluginError::NoCapacity)?
            .expect("the instance semaphore is never closed");
        self.sandbox(plugin, permit)
            .run(plugin, 0, async |store, plugin| {
                let instance = plugin.pre.instance_pre().instantiate_async(&mut *store).await?;
                let handler = bindings::Plugin::new(&mut *store, &instance)?;
                if let Err(message) =
                    handler.batchbox_plugin_handler().call_configure(&mut *store, &plugin.config_json).await?
                {
                    return Ok(Err(message));
                }
                let Some(describe) = describe else { return Ok(Ok(String::new())) };
                let describe = instance.get_typed_func::<(), (String,)>(&mut *store, describe)?;
                let (description,) = describe.call_async(&mut *store, ()).await?;
                Ok(Ok(description))
            })
            .await
    }
}

/// A fresh instance of the plugin with its `configure` run: the instance, or the plugin's refusal.
pub(crate) async fn configured(
    store: &mut Store<RequestState>,
    plugin: &LoadedPlugin,
) -> wasmtime::Result<Result<bindings::Plugin, String>> {
    let instance = plugin.pre.instantiate_async(&mut *store).await?;
    Ok(instance.batchbox_plugin_handler().call_configure(&mut *store, &plugin.config_json).await?.map(|()| instance))
}
