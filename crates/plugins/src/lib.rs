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

mod cache;
mod clock;
mod host_api;
mod model;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Histogram;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use wasmtime::component::{Component, ComponentExportIndex, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use batchbox_metrics::names;
use batchbox_tenants::{TenantConfig, TenantLimits};
use cache::CodeCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use bindings::exports::batchbox::plugin::handler::{Request, Response};
pub use model::{InferFuture, PluginModel, with_caches};

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
            default: trappable,
        },
        exports: { default: async },
    });
}

/// How often the epoch advances: the granularity of CPU deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// What a plugin may print per request before further output is dropped.
const OUTPUT_CAPACITY: usize = 64 << 10;
/// Bytes of written linear memory a freed pool slot keeps resident for its next instance.
const KEEP_RESIDENT: usize = 8 << 20;
/// Requests a reused instance serves before it is replaced by a fresh one: a bound on how long
/// state a plugin leaves behind (and memory it leaks) can live.
const REUSE_REQUESTS: u32 = 1_000;
/// How long configuring a plugin at load may wait for a free instance (a reload, under load).
const CONFIGURE_WAIT: Duration = Duration::from_secs(30);
/// Plugins see time only to this precision.
pub const CLOCK_RESOLUTION: Duration = Duration::from_micros(100);

/// Why a plugin could not be loaded or did not answer. Each names its tenant (`tenant`), and
/// `batchbox-server` maps each to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// At startup: the `.wasm` file cannot be read.
    #[error("tenant {tenant}: cannot read {path}: {source}")]
    Read {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// At startup: the file is not a component wasmtime can compile, or the engine or linker
    /// could not be built (`tenant` is then `*`).
    #[error("tenant {tenant}: cannot load the plugin: {message}")]
    Compile {
        /// The tenant whose plugin it is.
        tenant: String,
        /// wasmtime's reason.
        message: String,
    },
    /// At startup: the component imports what the host does not offer, or lacks an export of
    /// the `batchbox:plugin` world.
    #[error("tenant {tenant}: the plugin does not implement the batchbox:plugin world: {message}")]
    MissingExport {
        /// The tenant whose plugin it is.
        tenant: String,
        /// Which import or export.
        message: String,
    },
    /// At startup: the plugin's `describe` did not answer a JSON object with `paths` (see the WIT).
    #[error("tenant {tenant}: the plugin's describe is not an OpenAPI fragment: {message}")]
    Describe {
        /// The tenant whose plugin it is.
        tenant: String,
        /// What is wrong with it.
        message: String,
    },
    /// The plugin's `configure` refused the tenant's `config:` (at startup, or on a request).
    #[error("tenant {tenant}: the plugin rejected its config: {message}")]
    Configure {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The plugin's own words.
        message: String,
    },
    /// At startup: the plugin's linear memory starts larger than `limits.memory_bytes`, so it
    /// could never be instantiated (an interpreter's snapshot heap, say, in a limit set for Rust).
    #[error(
        "tenant {tenant}: the plugin needs {need} bytes ({:.1} MiB) of linear memory to start, more than \
         its limits.memory_bytes of {limit} bytes ({:.1} MiB); raise the limit",
        mib(*need),
        mib(*limit)
    )]
    MemoryTooSmall {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The plugin's initial linear memory, in bytes.
        need: usize,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The plugin asked for more linear memory than `limits.memory_bytes`.
    #[error("tenant {tenant}: the plugin ran out of its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The plugin's own time (host calls excluded) passed `limits.cpu_ms`.
    #[error("tenant {tenant}: the plugin exceeded its CPU time limit of {limit_ms} ms")]
    CpuLimit {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// The whole call, host calls included, passed `limits.wall_ms`.
    #[error("tenant {tenant}: the plugin did not answer within {limit_ms} ms")]
    WallTimeout {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// One host call would have copied more than `limits.max_hostcall_bytes` out of the plugin.
    #[error("tenant {tenant}: the plugin passed more than max_hostcall_bytes ({limit} bytes) to the host in one call")]
    HostcallBytes {
        /// The tenant whose plugin it is.
        tenant: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// Every one of `server.max_instances` instances is in use; retry shortly.
    #[error("no free plugin instance (more than the configured max_instances requests in flight)")]
    NoCapacity,
    /// The plugin trapped (a panic, an out-of-bounds access, an unreachable) for another reason.
    #[error("tenant {tenant}: the plugin failed: {message}")]
    Trapped {
        /// The tenant whose plugin it is.
        tenant: String,
        /// wasmtime's description of the trap.
        message: String,
    },
}

impl PluginError {
    /// The `kind` label of [`names::PLUGIN_TRAPS`] for an error that stopped a running plugin;
    /// `None` for the rest (loading errors, a refused config, no free instance).
    pub fn trap_kind(&self) -> Option<&'static str> {
        match self {
            Self::CpuLimit { .. } => Some("cpu"),
            Self::MemoryLimit { .. } => Some("memory"),
            Self::WallTimeout { .. } => Some("wall"),
            Self::Trapped { .. } => Some("panic"),
            Self::HostcallBytes { .. } => Some("hostcall"),
            Self::Read { .. }
            | Self::Compile { .. }
            | Self::MissingExport { .. }
            | Self::Configure { .. }
            | Self::Describe { .. }
            | Self::MemoryTooSmall { .. }
            | Self::NoCapacity => None,
        }
    }
}

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
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryLimit,
    /// The tenant's model, behind its response cache if it has one.
    model: Arc<dyn PluginModel>,
    tenant: Arc<str>,
    request_id: u64,
    started: Instant,
    /// When the request's wall-clock limit runs out: sequences still waiting for the model then
    /// are dropped from its queue.
    deadline: Instant,
    /// Time spent inside host calls, which the CPU deadline does not count.
    host_time: Duration,
    /// Of `host_time`: tokenizing, and the model's queue and compute times (of its answers).
    tokenize_time: Duration,
    queue_time: Duration,
    compute_time: Duration,
    /// What this request's host calls have asked for so far, against the tenant's quotas.
    usage: host_api::Usage,
    quotas: TenantLimits,
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

struct LoadedPlugin {
    tenant: Arc<str>,
    pre: bindings::PluginPre<RequestState>,
    config_json: String,
    limits: TenantLimits,
    /// `limits.memory_bytes`, or its default for this plugin.
    memory_limit: usize,
    model: Arc<dyn PluginModel>,
    /// `reuse_instances`: how many configured instances may wait here for the next request.
    reuse: usize,
    /// Instances that served a request and wait for the next, with their stores.
    idle: Mutex<Vec<(Sandbox, bindings::Plugin)>>,
    /// What the plugin's optional `describe` answered at startup: an OpenAPI fragment.
    description: Option<serde_json::Value>,
    split_metrics: SplitMetrics,
    /// The SHA-256 of the .wasm file this code was compiled from, in hex.
    wasm_sha256: String,
}

/// A tenant's histograms of where its requests' time went, registered once at load, so that a
/// request records into them without looking its series up.
struct SplitMetrics {
    tokenize: Histogram,
    queue: Histogram,
    inference: Histogram,
    plugin: Histogram,
}

impl SplitMetrics {
    fn new(tenant: &str) -> Self {
        let histogram = |name: &'static str| metrics::histogram!(name, "tenant" => tenant.to_owned());
        Self {
            tokenize: histogram(names::TOKENIZE_SECONDS),
            queue: histogram(names::QUEUE_SECONDS),
            inference: histogram(names::INFERENCE_SECONDS),
            plugin: histogram(names::PLUGIN_SECONDS),
        }
    }

    fn record(&self, split: &TimeSplit) {
        self.tokenize.record(split.tokenize.as_secs_f64());
        self.queue.record(split.queue.as_secs_f64());
        self.inference.record(split.inference.as_secs_f64());
        self.plugin.record(split.plugin.as_secs_f64());
    }
}

impl LoadedPlugin {
    /// Keeps an instance that served a request for the next one, if the tenant reuses instances
    /// and it has not served its share: [`REUSE_REQUESTS`] requests, or a request's worth of
    /// output. Otherwise it is dropped here, and its pool slot and permit are freed.
    fn keep_idle(&self, sandbox: Sandbox, instance: bindings::Plugin) {
        let printed = sandbox.stdout.logged.max(sandbox.stderr.logged);
        if sandbox.requests < REUSE_REQUESTS && printed <= OUTPUT_CAPACITY {
            let mut idle = self.idle.lock().expect("idle instances");
            if idle.len() < self.reuse {
                idle.push((sandbox, instance));
            }
        }
    }
}

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

/// What every generation of plugins shares: the engine with its pool of instance slots, the
/// linker, and the directory compiled code is cached in. A config reload builds its new
/// [`PluginRuntime`] here, beside the one serving, so `server.max_instances` bounds the instances
/// of both together and the pool's address space is reserved once.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<RequestState>,
    /// One permit per instance the pooling allocator has room for: a request that finds none
    /// is refused at once (503), before any store is made.
    instances: Arc<Semaphore>,
    cache: CodeCache,
}

impl PluginHost {
    /// The engine for `max_instances` instances at once, caching compiled plugins in `cache_dir`
    /// (kept under `cache_max_bytes`, by the policy in `cache.rs`).
    pub fn new(max_instances: u32, cache_dir: &Path, cache_max_bytes: u64) -> Result<Self, PluginError> {
        let host_error = |e: wasmtime::Error| PluginError::Compile { tenant: "*".into(), message: e.to_string() };
        let engine = new_engine(max_instances).map_err(host_error)?;
        let mut linker: Linker<RequestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(host_error)?;
        bindings::Plugin::add_to_linker::<RequestState, HasSelf<RequestState>>(&mut linker, |state| state)
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

/// Every tenant's plugin, ready to instantiate: one config's generation.
pub struct PluginRuntime {
    engine: Engine,
    plugins: HashMap<String, LoadedPlugin>,
    /// The host's instance permits, shared with every generation.
    instances: Arc<Semaphore>,
    /// The cache keys of its plugins' compiled code: what trimming the cache must keep.
    code_keys: HashSet<String>,
}

impl PluginRuntime {
    /// Compiles (or loads from the cache) every tenant's plugin, checks its exports and that it
    /// accepts its config. `model_for` gives each tenant its model (see [`with_caches`]).
    pub async fn load(
        host: &PluginHost,
        tenants: &[TenantConfig],
        model_for: impl Fn(&TenantConfig) -> Arc<dyn PluginModel>,
    ) -> Result<Self, PluginError> {
        let linker = &host.linker;
        let mut runtime = Self {
            engine: host.engine.clone(),
            plugins: HashMap::new(),
            instances: host.instances.clone(),
            code_keys: HashSet::new(),
        };
        // Tenants that run the same .wasm share its compiled code.
        let mut components = HashMap::new();
        for tenant in tenants {
            let name = || tenant.name.clone();
            let (component, wasm_sha256) = load_component(&runtime.engine, tenant, &host.cache, &mut components)?;
            let memory_limit = memory_limit(&component, tenant)?;
            // Imports the host does not offer fail here; missing exports in `PluginPre::new`.
            let pre = linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::MissingExport { tenant: name(), message: format!("{e:#}") })?;
            let pre = bindings::PluginPre::new(pre)
                .map_err(|e| PluginError::MissingExport { tenant: name(), message: format!("{e:#}") })?;
            // No `config:` in the file means an empty object, so plugins can default every field.
            let config_json = match &tenant.config {
                serde_json::Value::Null => "{}".to_owned(),
                value => serde_json::to_string(value).map_err(|e| PluginError::Configure {
                    tenant: name(),
                    message: format!("config is not representable as JSON: {e}"),
                })?,
            };
            let describe = describe_export(&component);
            let mut plugin = LoadedPlugin {
                tenant: tenant.name.as_str().into(),
                pre,
                config_json,
                limits: tenant.limits,
                memory_limit,
                model: model_for(tenant),
                reuse: tenant.reuse_instances as usize,
                idle: Mutex::new(Vec::new()),
                description: None,
                split_metrics: SplitMetrics::new(&tenant.name),
                wasm_sha256,
            };
            // Configure once now, so a bad config stops startup instead of failing every request.
            let description = runtime.configure(&plugin, describe).await?;
            plugin.description = openapi_fragment(&description, &tenant.name)?;
            runtime.plugins.insert(tenant.name.clone(), plugin);
        }
        runtime.code_keys = components.into_keys().collect();
        Ok(runtime)
    }

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

    async fn run_request(
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
    async fn configure(
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

    /// A fresh store, within the tenant's limits, in the pool slot `permit` holds.
    fn sandbox(&self, plugin: &LoadedPlugin, permit: OwnedSemaphorePermit) -> Sandbox {
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
            model: plugin.model.clone(),
            tenant: plugin.tenant.clone(),
            request_id: 0,
            started: Instant::now(),
            deadline: Instant::now(),
            host_time: Duration::ZERO,
            tokenize_time: Duration::ZERO,
            queue_time: Duration::ZERO,
            compute_time: Duration::ZERO,
            usage: host_api::Usage::default(),
            quotas: plugin.limits,
        };
        metrics::gauge!(names::PLUGIN_INSTANCES).increment(1.0);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        let cpu_limit = Duration::from_millis(plugin.limits.cpu_ms);
        store.epoch_deadline_callback(move |store| {
            let state = store.data();
            let guest_time = state.started.elapsed().saturating_sub(state.host_time);
            // Over the limit: trap. Otherwise let other tasks run, then check again next tick.
            Ok(if guest_time > cpu_limit { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        Sandbox { store, stdout: Output::new(stdout), stderr: Output::new(stderr), requests: 0, _permit: permit }
    }
}

/// A store, the plugin's captured output, and the instance permit it holds until the store is
/// gone (fields drop in order: the store first). One request's, or a reused instance's.
struct Sandbox {
    store: Store<RequestState>,
    stdout: Output,
    stderr: Output,
    /// Requests this store has begun.
    requests: u32,
    _permit: OwnedSemaphorePermit,
}

impl Sandbox {
    /// Runs `work` as request `request_id` under the tenant's limits (each request's own, on a
    /// reused instance too), logs what the plugin printed, and names what stopped it: a trap, a
    /// limit, or a config the plugin refused (`Err(message)`).
    async fn run<T>(
        &mut self,
        plugin: &LoadedPlugin,
        request_id: u64,
        work: impl AsyncFnOnce(&mut Store<RequestState>, &LoadedPlugin) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, PluginError> {
        let limit = Duration::from_millis(plugin.limits.wall_ms);
        let state = self.store.data_mut();
        state.request_id = request_id;
        state.started = Instant::now();
        state.deadline = state.started + limit;
        state.host_time = Duration::ZERO;
        state.tokenize_time = Duration::ZERO;
        state.queue_time = Duration::ZERO;
        state.compute_time = Duration::ZERO;
        state.usage = host_api::Usage::default();
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
    fn record<T>(&self, plugin: &LoadedPlugin, outcome: &Result<T, PluginError>) -> TimeSplit {
        let state = self.store.data();
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
        let split = TimeSplit {
            tokenize: state.tokenize_time,
            queue: state.queue_time,
            inference: state.compute_time,
            plugin: state.started.elapsed().saturating_sub(state.host_time),
        };
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
struct Output {
    pipe: MemoryOutputPipe,
    logged: usize,
}

impl Output {
    fn new(pipe: MemoryOutputPipe) -> Self {
        Self { pipe, logged: 0 }
    }

    /// Logs, line by line, what was printed since the last call.
    fn log(&mut self, tenant: &str, request_id: u64, stream: &str) {
        let contents = self.pipe.contents();
        for line in String::from_utf8_lossy(&contents[self.logged..]).lines().filter(|l| !l.is_empty()) {
            tracing::info!(tenant, request_id, stream, "{line}");
        }
        self.logged = contents.len();
    }
}

/// The interface a plugin of world `described-plugin` exports.
const API_EXPORT: &str = "batchbox:plugin/api@0.1.1";

/// The component's `api.describe`, if it exports one (it is optional: see the WIT).
fn describe_export(component: &Component) -> Option<ComponentExportIndex> {
    let api = component.get_export_index(None, API_EXPORT)?;
    component.get_export_index(Some(&api), "describe")
}

/// `describe`'s answer checked: `None` for an empty one, else a JSON object whose `paths` is an
/// object, and whose `components`, if any, holds only `schemas`.
fn openapi_fragment(text: &str, tenant: &str) -> Result<Option<serde_json::Value>, PluginError> {
    if text.is_empty() {
        return Ok(None);
    }
    let refuse = |message: String| PluginError::Describe { tenant: tenant.to_owned(), message };
    let fragment: serde_json::Value = serde_json::from_str(text).map_err(|e| refuse(format!("not JSON: {e}")))?;
    if !fragment["paths"].is_object() {
        return Err(refuse("it has no `paths` object".into()));
    }
    let components = fragment.get("components").and_then(|c| c.as_object());
    if components.is_some_and(|c| c.keys().any(|key| key != "schemas")) {
        return Err(refuse("`components` may hold `schemas` only".into()));
    }
    Ok(Some(fragment))
}

/// A fresh instance of the plugin with its `configure` run: the instance, or the plugin's refusal.
async fn configured(
    store: &mut Store<RequestState>,
    plugin: &LoadedPlugin,
) -> wasmtime::Result<Result<bindings::Plugin, String>> {
    let instance = plugin.pre.instantiate_async(&mut *store).await?;
    Ok(instance.batchbox_plugin_handler().call_configure(&mut *store, &plugin.config_json).await?.map(|()| instance))
}

/// One engine for every plugin. A pool slot holds the largest memory any tenant may have; each
/// store's limiter then holds its plugin to its own limit. The slot's size costs address space
/// only, and no more than wasmtime reserves per memory anyway (4 GiB, so that bounds checks can be
/// elided): what is resident is what plugins touch.
fn new_engine(max_instances: u32) -> wasmtime::Result<Engine> {
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
fn start_epoch_ticker(engine: &Engine) {
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

/// Compiles a plugin, or loads the machine code compiled for this exact .wasm and engine before:
/// by another tenant of this process (`components`, by key), or by any process (the cache,
/// whose file names are the keys). Also answers the SHA-256 of the .wasm it read.
fn load_component(
    engine: &Engine,
    tenant: &TenantConfig,
    cache: &CodeCache,
    components: &mut HashMap<String, Component>,
) -> Result<(Component, String), PluginError> {
    let plugin = tenant.name.clone();
    let wasm = std::fs::read(&tenant.wasm).map_err(|source| PluginError::Read {
        tenant: plugin.clone(),
        path: tenant.wasm.clone(),
        source,
    })?;
    let wasm_sha256 = hex::encode(Sha256::digest(&wasm));
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut engine_hash);
    let mut key = Sha256::new();
    key.update(&wasm_sha256);
    key.update(engine_hash.finish().to_le_bytes());
    let key = hex::encode(&key.finalize()[..16]);
    if let Some(component) = components.get(&key) {
        return Ok((component.clone(), wasm_sha256));
    }
    if let Some(component) = cache.get(engine, &key) {
        return Ok((components.entry(key).or_insert(component).clone(), wasm_sha256));
    }
    let compile_error = |e: wasmtime::Error| PluginError::Compile { tenant: plugin.clone(), message: format!("{e:#}") };
    let started = Instant::now();
    let compiled = engine.precompile_component(&wasm).map_err(compile_error)?;
    tracing::info!(tenant = plugin, elapsed_ms = started.elapsed().as_millis() as u64, "compiled plugin");
    // The cache only saves time: failing to write it is worth a warning, not an error.
    if let Err(e) = cache.put(&key, &compiled) {
        tracing::warn!(tenant = plugin, error = %e, "cannot cache compiled plugin");
    }
    // SAFETY: `compiled` was produced by this engine a moment ago.
    let component = unsafe { Component::deserialize(engine, &compiled) }.map_err(compile_error)?;
    Ok((components.entry(key).or_insert(component).clone(), wasm_sha256))
}

/// The tenant's memory limit for this plugin: `limits.memory_bytes`, or by default the plugin's
/// initial linear memory plus [`TenantLimits::DEFAULT_MEMORY_ROOM`]. A plugin whose memory starts
/// larger than an explicit limit is refused: instantiating it would fail on every request, with a
/// message that says less.
fn memory_limit(component: &Component, tenant: &TenantConfig) -> Result<usize, PluginError> {
    /// A WebAssembly page.
    const PAGE: u64 = 64 << 10;
    // `None` only for components that import core modules, which the host does not offer.
    let pages = component.resources_required().and_then(|r| r.max_initial_memory_size).unwrap_or(0);
    let need = usize::try_from(pages * PAGE).unwrap_or(usize::MAX);
    let limit = match tenant.limits.memory_bytes {
        Some(limit) if need > limit => {
            return Err(PluginError::MemoryTooSmall { tenant: tenant.name.clone(), need, limit });
        }
        Some(limit) => limit,
        None => need.saturating_add(TenantLimits::DEFAULT_MEMORY_ROOM).min(TenantLimits::MAX_MEMORY_BYTES),
    };
    tracing::info!(tenant = tenant.name, initial_mib = mib(need), limit_mib = mib(limit), "plugin memory");
    Ok(limit)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The store's memory limit, remembering whether the plugin ran into it, so its trap (Rust aborts
/// when an allocation fails) can be named.
struct MemoryLimit {
    limits: StoreLimits,
    reached: bool,
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

fn classify_trap(error: wasmtime::Error, tenant: String, plugin: &LoadedPlugin, memory_reached: bool) -> PluginError {
    let message = format!("{error:#}");
    let limits = &plugin.limits;
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => PluginError::CpuLimit { tenant, limit_ms: limits.cpu_ms },
        _ if memory_reached => PluginError::MemoryLimit { tenant, limit: plugin.memory_limit },
        // wasmtime's error type for this is private; its message is stable and documented.
        _ if message.contains("fuel allocated for hostcalls has been exhausted") => {
            PluginError::HostcallBytes { tenant, limit: limits.max_hostcall_bytes }
        }
        _ => PluginError::Trapped { tenant, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_must_answer_nothing_or_an_openapi_fragment() {
        assert!(openapi_fragment("", "t").unwrap().is_none(), "nothing to describe");
        let fragment = r#"{"paths": {"/": {}}, "components": {"schemas": {"A": {}}}}"#;
        assert!(openapi_fragment(fragment, "t").unwrap().is_some());
        for (bad, why) in [
            ("{not json", "not JSON"),
            (r#"{"components": {}}"#, "no `paths`"),
            (r#"{"paths": []}"#, "no `paths`"),
            (r#"{"paths": {}, "components": {"securitySchemes": {}}}"#, "`schemas` only"),
        ] {
            let error = openapi_fragment(bad, "t").unwrap_err().to_string();
            assert!(error.starts_with("tenant t: the plugin's describe") && error.contains(why), "{bad}: {error}");
        }
    }
}
