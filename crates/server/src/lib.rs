//! HTTP: hyper 1.x on tokio; accepting, limiting and draining connections is the `connections`
//! module ([`serve`], [`ConnectionLimits`]).
//! Host-owned routes (`/health`, `/ready`, `/v1/models`, `/metrics`, `/openapi.json`) are
//! answered here, without keys; every other request goes to the tenant its route names, once its
//! key and the tenant's quotas allow (see [`batchbox_tenants`]). With `server.metrics_bind`,
//! `/metrics` is answered only on that address, by an [`App::metrics_only`] of its own. Every
//! error the host writes is a JSON body `{"error": {"code": ..., "message": ...}}` (hyper answers
//! requests it cannot parse itself, before they reach us), and [`ApiError`] is the one place that
//! maps errors to HTTP statuses.
//!
//! Reload policy: what serves requests (models, plugins, tenants, admin keys) is one [`Loaded`]
//! generation. A request takes the current one when it starts and keeps it to its end, so it runs
//! wholly under one config; [`App::reload`] (from `POST /admin/reload` or SIGHUP) has the next
//! one built beside it by a [`Reload`], swaps it in only once it is whole, and retires the old one
//! when its last request is done, which is when a model the new config dropped stops (its queue
//! drained by the requests that filled it). Reloads run one at a time.

mod config;
mod connections;
mod openapi;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::json;
use tracing::Instrument;
use tracing::field::Empty;

use batchbox_metrics::{PrometheusHandle, Scrape, names};
use batchbox_model::{Model, QueueShares};
use batchbox_plugins::{self as plugins, PluginError, PluginRuntime};
use batchbox_tenants::{AccessError, KeyHash, Tenant, TenantLimits, Tenants};
pub use config::ServerConfig;
pub use connections::{ConnectionLimits, serve};
pub use hyper::HeaderMap;

type Response = hyper::Response<Full<Bytes>>;

/// One config's worth of what serves requests: built whole at startup and by every reload, and
/// swapped in at once (see the module docs).
pub struct Loaded {
    /// Every model, by its name in the config, in the config's order.
    pub models: Vec<(String, Arc<Model>)>,
    /// Every tenant's plugin, compiled and configured; each request gets a fresh instance.
    pub plugins: PluginRuntime,
    /// Every tenant's routes, keys and quotas.
    pub tenants: Tenants,
    /// The hashes of `server.admin_keys`; none: the admin routes are off.
    pub admin_keys: Vec<KeyHash>,
    /// What `GET /admin/config` shows of this config (never a key or a key's hash), and what
    /// `POST /admin/reload` answers once it is swapped in.
    pub about: serde_json::Value,
    /// The shares of each model's queue this config gives its tenants, for the models it shares
    /// with the previous config. A reload sets them once the previous config's last request is
    /// done: until then, tenants the reload removed keep a share for their requests in flight.
    pub settled_shares: Vec<(Arc<Model>, QueueShares)>,
}

/// The future of one [`Reload::next`].
pub type NextFuture<'a> = Pin<Box<dyn Future<Output = Result<Loaded, String>> + Send + 'a>>;

/// Builds the next generation from the config file, for [`App::reload`], which asks for one at
/// a time and installs every generation it is answered.
pub trait Reload: Send + Sync {
    /// What the config file describes now, built beside `current` (whose unchanged models it
    /// shares) without touching what `current` serves; or why it cannot be, in words for the
    /// operator. `trigger` says what asked for it (`SIGHUP`, `POST /admin/reload`).
    fn next<'a>(&'a self, current: &'a Loaded, trigger: &'static str) -> NextFuture<'a>;
}

/// The HTTP side of batchbox: answers the host routes, and sends every other request through its
/// tenant's route, key and quota checks to the tenant's plugin. Shared by every connection.
pub struct App {
    /// The generation new requests start on; `None` until startup has loaded one.
    current: RwLock<Option<Arc<Loaded>>>,
    /// How the next generation is built, if this app reloads.
    reload: Option<Arc<dyn Reload>>,
    /// Held for the whole of a reload, so that reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The last reload that was refused: when, what asked, and why (for `GET /admin/config`). Kept
    /// after later reloads succeed: it may be older than the running config.
    last_refused: Mutex<Option<serde_json::Value>>,
    /// The metrics recorder's handle, if metrics are on: `/v1/models` reads its counters.
    metrics: Option<PrometheusHandle>,
    /// Which routes this listener answers.
    routes: Routes,
    /// Makes a request's span a child of the trace its client sent, if any (see [`JoinTrace`]).
    join_trace: Option<JoinTrace>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    next_request_id: AtomicU64,
}

/// Given a request's headers and its `request` span, not yet entered, makes the span a child of
/// the caller's trace (W3C `traceparent`, say): the host's trace exporter provides it, so that
/// this crate carries no tracing backend.
pub type JoinTrace = fn(&HeaderMap, &tracing::Span);

/// The routes a listener answers.
#[derive(Clone, Copy, PartialEq)]
enum Routes {
    /// The host routes and the tenants' routes, with `/metrics` if `exposes_metrics`.
    All { exposes_metrics: bool },
    /// `/metrics` alone (`server.metrics_bind`).
    MetricsOnly,
}

/// Every error the host answers a request with; each maps to one status and code, and is
/// written as the JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No host route and no tenant's route matches the path (404); holds the path.
    #[error("no route for {0}")]
    NotFound(String),
    /// A host route called with a method other than GET (405, with `Allow`).
    #[error("{method} is not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        /// The method the request used.
        method: Method,
        /// The request's path.
        path: String,
        /// The methods the route takes, for the `Allow` header.
        allow: &'static str,
    },
    /// The body, declared or as read, is over `server.max_body_bytes` (413), checked before any
    /// plugin runs.
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// `server.max_body_bytes`, in bytes.
        limit: usize,
    },
    /// Reading the body failed for a reason other than its size or time, such as a connection
    /// closed mid-body (400 `bad_body`); holds hyper's error.
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// The body did not arrive within `server.body_read_timeout_ms` of the headers (408, with
    /// `Connection: close`); holds that timeout.
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// The request's target or its headers are ambiguous (RFC 9112 §3.2).
    #[error("{0}")]
    BadRequest(&'static str),
    /// `/ready`, `/v1/models` or a tenant's route before the models and plugins are loaded (503,
    /// with `Retry-After`).
    #[error("the model and plugins are still loading")]
    NotReady,
    /// The tenant's keys or quotas refused the request: 401, 403 or 429 (see [`AccessError`]).
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The plugin failed or hit a limit: 429 past its hostcall bytes, 503 when no instance is
    /// free, 504 past `wall_ms`, otherwise 500.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The plugin's response broke the host's rules: a status outside 200–599, a header only the
    /// host may set, or over the tenant's header limits (500); the message says which.
    #[error("the plugin's response was refused: {0}")]
    BadPluginResponse(String),
    /// A reload was refused (422): the config file fails its checks, changes what cannot be
    /// reloaded, or a plugin fails to load or configure. The running config is unchanged.
    #[error("reload refused, the running config is unchanged: {0}")]
    ReloadRefused(String),
}

impl ApiError {
    /// The status and code of every error, in one exhaustive match: a new variant must be
    /// mapped here before the host compiles, instead of falling into a 500 by a wildcard.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Self::NotFound(_) => (S::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed { .. } => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::BadBody(_) => (S::BAD_REQUEST, "bad_body"),
            Self::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "body_timeout"),
            Self::BadRequest(_) => (S::BAD_REQUEST, "bad_request"),
            Self::NotReady => (S::SERVICE_UNAVAILABLE, "not_ready"),
            Self::Access(AccessError::MissingKey | AccessError::InvalidKey) => (S::UNAUTHORIZED, "unauthorized"),
            Self::Access(AccessError::WrongTenant { .. }) => (S::FORBIDDEN, "forbidden"),
            Self::Access(AccessError::Quota { .. }) | Self::Plugin(PluginError::HostcallBytes { .. }) => {
                (S::TOO_MANY_REQUESTS, "quota_exceeded")
            }
            Self::Plugin(PluginError::NoCapacity) => (S::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Plugin(PluginError::WallTimeout { .. }) => (S::GATEWAY_TIMEOUT, "plugin_timeout"),
            Self::Plugin(PluginError::CpuLimit { .. }) => (S::INTERNAL_SERVER_ERROR, "plugin_cpu_limit"),
            Self::Plugin(PluginError::MemoryLimit { .. }) => (S::INTERNAL_SERVER_ERROR, "plugin_memory_limit"),
            // Loading errors stop startup; a request meeting one means the plugin is broken.
            Self::Plugin(
                PluginError::Trapped { .. }
                | PluginError::Read { .. }
                | PluginError::Compile { .. }
                | PluginError::MissingExport { .. }
                | PluginError::MemoryTooSmall { .. }
                | PluginError::Configure { .. }
                | PluginError::Describe { .. },
            ) => (S::INTERNAL_SERVER_ERROR, "plugin_failed"),
            Self::BadPluginResponse(_) => (S::INTERNAL_SERVER_ERROR, "bad_plugin_response"),
            Self::ReloadRefused(_) => (S::UNPROCESSABLE_ENTITY, "reload_refused"),
        }
    }

    /// Which quota a 429 is about.
    fn quota(&self) -> Option<&'static str> {
        match self {
            Self::Access(AccessError::Quota { quota, .. }) => Some(quota),
            Self::Plugin(PluginError::HostcallBytes { .. }) => Some("max_hostcall_bytes"),
            _ => None,
        }
    }

    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() && !matches!(self, Self::NotReady) {
            tracing::warn!(error = %self, "request failed");
        }
        let mut error = json!({ "code": code, "message": self.to_string() });
        if let Some(quota) = self.quota() {
            error["quota"] = quota.into();
        }
        let mut response = json_response(status, &json!({ "error": error }));
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed { allow, .. } => {
                headers.insert("allow", HeaderValue::from_static(allow));
            }
            Self::NotReady
            | Self::Plugin(PluginError::NoCapacity)
            | Self::Access(AccessError::Quota { quota: "max_concurrent", .. }) => {
                headers.insert("retry-after", HeaderValue::from_static("1"));
            }
            Self::Access(AccessError::MissingKey | AccessError::InvalidKey) => {
                headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may still be on its way: this connection cannot carry another request.
            Self::BodyTimeout(_) => {
                headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl App {
    /// Serves under the `server` section's limits; nothing is loaded yet. `metrics`: the
    /// recorder's handle when `server.metrics` is on.
    pub fn new(server: &ServerConfig, metrics: Option<PrometheusHandle>) -> Self {
        let exposes_metrics = metrics.is_some() && server.metrics_bind.is_none();
        Self {
            current: RwLock::new(None),
            reload: None,
            reloading: tokio::sync::Mutex::new(()),
            last_refused: Mutex::new(None),
            metrics,
            routes: Routes::All { exposes_metrics },
            join_trace: None,
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: Duration::from_millis(server.body_read_timeout_ms.get()),
            next_request_id: AtomicU64::new(1),
        }
    }

    /// This app, reloading its config with `reload` (see [`App::reload`]).
    pub fn reloading(self, reload: Arc<dyn Reload>) -> Self {
        Self { reload: Some(reload), ..self }
    }

    /// This app, joining each request's trace to its client's with `join`.
    pub fn joining_traces(self, join: JoinTrace) -> Self {
        Self { join_trace: Some(join), ..self }
    }

    /// Answers `GET /metrics` alone: the app of the `server.metrics_bind` listener.
    pub fn metrics_only(server: &ServerConfig, metrics: PrometheusHandle) -> Self {
        Self { routes: Routes::MetricsOnly, ..Self::new(server, Some(metrics)) }
    }

    /// The recorder's handle if this listener answers `/metrics`.
    fn metrics_route(&self) -> Option<&PrometheusHandle> {
        match self.routes {
            Routes::All { exposes_metrics: true } | Routes::MetricsOnly => self.metrics.as_ref(),
            Routes::All { exposes_metrics: false } => None,
        }
    }

    /// Marks the server ready with its first generation: `/ready` answers 200 and plugin routes
    /// are served.
    pub fn set_loaded(&self, loaded: Loaded) {
        self.install(loaded);
    }

    /// Makes `loaded` the generation new requests start on, stamped with the time; answers the
    /// one it replaces.
    fn install(&self, mut loaded: Loaded) -> Option<Arc<Loaded>> {
        loaded.about["loaded_at"] = now().into();
        self.current.write().expect("current generation").replace(Arc::new(loaded))
    }

    /// The generation a request starting now runs on.
    fn current(&self) -> Result<Arc<Loaded>, ApiError> {
        self.current.read().expect("current generation").clone().ok_or(ApiError::NotReady)
    }

    /// Builds the config file's next generation and swaps it in, or leaves the running one
    /// untouched and says why (`ReloadRefused`). Answers the new generation's `about`.
    pub async fn reload(self: &Arc<Self>, trigger: &'static str) -> Result<serde_json::Value, ApiError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.current()?;
        let reload = self.reload.as_ref().ok_or(ApiError::ReloadRefused("this server does not reload".into()))?;
        match reload.next(&current, trigger).await {
            Ok(next) => {
                drop(current);
                let old = self.install(next).expect("a generation was current");
                let new = self.current()?;
                let about = new.about.clone();
                tokio::spawn(self.clone().retire(old, new));
                tracing::info!(trigger, version = %about["version"], changes = %about["changes"], "config reloaded");
                Ok(about)
            }
            Err(why) => {
                tracing::error!(trigger, error = %why, "config reload refused; the running config is unchanged");
                let refused = json!({ "at": now(), "trigger": trigger, "error": why });
                *self.last_refused.lock().expect("last refused") = Some(refused);
                Err(ApiError::ReloadRefused(why))
            }
        }
    }

    async fn handle(self: &Arc<Self>, request: hyper::Request<Incoming>) -> Response {
        let started = Instant::now();
        // The generation first, then the id (AcqRel): a request whose id is below a reload
        // request's runs on the config from before that reload, so logs and tests can tell which
        // config answered what.
        let generation = self.current();
        let id = self.next_request_id.fetch_add(1, Ordering::AcqRel);
        let (parts, body) = request.into_parts();
        let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());
        let body_expected = !hyper::body::Body::is_end_stream(&body);
        let (mut body, mut served) = (Some(body), Served::default());
        // The root of the request's trace (exported with the `otel` feature), or a child of its
        // client's: plugin, tokenize, infer and the model's passes are traced under it.
        let span = tracing::debug_span!("request", request_id = id, method = %method, path = %path, tenant = Empty, status = Empty);
        // A span nothing records (no exporter) has no trace to join: no header parsed for it.
        if let Some(join) = self.join_trace.filter(|_| !span.is_disabled()) {
            join(&parts.headers, &span);
        }
        let routed = self.route(id, generation, &parts, &mut body, &mut served).instrument(span.clone()).await;
        let mut response = routed.unwrap_or_else(ApiError::into_response);
        // Answered without reading its body whole (a 404, a 401, a quota, a body too large): a
        // small body is read and dropped, so the connection can carry the next request. Otherwise
        // hyper closes it after the response (HTTP/1.1), and saying so lets the client open a new
        // one rather than send its next request on one about to close.
        let reusable = !body_expected || served.body_read || drained(body.take()).await;
        if !reusable {
            response.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        span.record("status", response.status().as_u16());
        if let Some(tenant) = &served.tenant {
            span.record("tenant", tenant.as_str());
        }
        response.headers_mut().insert("x-request-id", HeaderValue::from(id));
        served.log(id, &method, &path, &response, started);
        response
    }

    /// Answers the request whose head is `parts` under `generation` (the config current when it
    /// started); its body is taken from `body` only by a tenant's route, once the key and quotas
    /// let it through.
    async fn route(
        self: &Arc<Self>,
        id: u64,
        generation: Result<Arc<Loaded>, ApiError>,
        parts: &hyper::http::request::Parts,
        body: &mut Option<Incoming>,
        served: &mut Served,
    ) -> Result<Response, ApiError> {
        let host = target_host(parts)?;
        let path = parts.uri.path().to_owned();
        let metrics = self.metrics_route();
        if self.routes == Routes::MetricsOnly && path != "/metrics" {
            return Err(ApiError::NotFound(path));
        }
        let host_route = matches!(path.as_str(), "/health" | "/ready" | "/v1/models" | "/openapi.json")
            || (path == "/metrics" && metrics.is_some());
        if host_route && parts.method != Method::GET {
            return Err(ApiError::MethodNotAllowed { method: parts.method.clone(), path, allow: "GET" });
        }
        if let ("/metrics", Some(metrics)) = (path.as_str(), metrics) {
            let mut response = hyper::Response::new(Full::new(Bytes::from(metrics.render())));
            let text = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
            response.headers_mut().insert(CONTENT_TYPE, text);
            return Ok(response);
        }
        if path == "/health" {
            return Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })));
        }
        // Everything else needs a config loaded, and runs wholly under the one current when the
        // request started.
        let loaded = generation?;
        match path.as_str() {
            "/ready" => {
                let versions: serde_json::Map<String, serde_json::Value> = loaded
                    .models
                    .iter()
                    .map(|(name, model)| (name.clone(), model.info().manifest.version.clone().into()))
                    .collect();
                return Ok(json_response(StatusCode::OK, &json!({ "status": "ready", "models": versions })));
            }
            "/v1/models" => return Ok(json_response(StatusCode::OK, &self.models(&loaded))),
            "/openapi.json" => {
                let document = openapi::document(&loaded.tenants, &loaded.plugins, self.metrics_route().is_some());
                return Ok(json_response(StatusCode::OK, &document));
            }
            "/admin/reload" | "/admin/config" if !loaded.admin_keys.is_empty() => {
                return self.admin(&loaded, &path, parts).await;
            }
            _ => {}
        }
        let tenant = loaded.tenants.route(host.as_deref(), &path).ok_or_else(|| ApiError::NotFound(path.clone()))?;
        let started = Instant::now();
        served.tenant = Some(tenant.name.clone());
        let result = self.for_tenant(&loaded, tenant, id, parts, body, served).await;
        let status = match &result {
            Ok(response) => response.status(),
            Err(e) => e.status_and_code().0,
        };
        tenant.record(status.as_u16(), started.elapsed());
        result
    }

    /// The admin routes, for holders of an admin key: `POST /admin/reload` reloads the config
    /// file (200 with the new config's summary, or 422 `reload_refused` with why); `GET
    /// /admin/config` shows the running config and the last refused reload.
    async fn admin(
        self: &Arc<Self>,
        loaded: &Loaded,
        path: &str,
        parts: &hyper::http::request::Parts,
    ) -> Result<Response, ApiError> {
        let (method, allow) = if path == "/admin/reload" { (Method::POST, "POST") } else { (Method::GET, "GET") };
        if parts.method != method {
            return Err(ApiError::MethodNotAllowed { method: parts.method.clone(), path: path.to_owned(), allow });
        }
        let key = single_header(&parts.headers, AUTHORIZATION, "several Authorization headers: send one")?;
        batchbox_tenants::check_key(&loaded.admin_keys, key.map(HeaderValue::as_bytes))?;
        let body = if method == Method::POST {
            // A task of its own: the reload goes on to its end if the caller hangs up.
            let app = self.clone();
            let reload = tokio::spawn(async move { app.reload("POST /admin/reload").await });
            let about =
                reload.await.unwrap_or_else(|e| Err(ApiError::ReloadRefused(format!("the reload failed: {e}"))))?;
            json!({ "status": "reloaded", "config": about })
        } else {
            let mut about = loaded.about.clone();
            about["last_refused_reload"] = self.last_refused.lock().expect("last refused").clone().into();
            about
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    /// A request on one of `tenant`'s routes: its key, its quotas, then its plugin.
    async fn for_tenant(
        &self,
        loaded: &Loaded,
        tenant: &Tenant,
        id: u64,
        parts: &hyper::http::request::Parts,
        body: &mut Option<Incoming>,
        served: &mut Served,
    ) -> Result<Response, ApiError> {
        let key = single_header(&parts.headers, AUTHORIZATION, "several Authorization headers: send one")?;
        loaded.tenants.authorize(tenant, key.map(HeaderValue::as_bytes))?;
        let _in_flight = tenant.admit()?;
        let body = body.take().expect("only a tenant's route reads the body");
        let request = self.plugin_request(tenant, parts, body).await?;
        served.body_read = true;
        let (response, split) = loaded.plugins.handle_timed(&tenant.name, id, request).await;
        served.split = Some(split);
        plugin_response(response?, &tenant.limits)
    }

    /// Every model: what it is and how it runs, and (with metrics on) its counters and its
    /// caches', read from the same recorder `/metrics` renders.
    fn models(&self, loaded: &Loaded) -> serde_json::Value {
        let scrape = self.metrics.as_ref().map(|m| Scrape::parse(&m.render()));
        let models: Vec<serde_json::Value> = loaded
            .models
            .iter()
            .map(|(name, model)| {
                let info = model.info();
                let m = &info.manifest;
                let mut described = json!({
                    "name": name,
                    "model": m.name,
                    "version": m.version,
                    "task": m.task,
                    "labels": m.labels,
                    "max_length": m.max_length,
                    "device": info.device,
                    "precision": info.precision,
                    "precision_choice": info.precision_choice,
                });
                if let Some(scrape) = &scrape {
                    let value = |metric| scrape.value(metric, &[("model", name)]) as u64;
                    let (queued_sequences, queued_tokens) = model.queue_depth();
                    described["stats"] = json!({
                        "batches": value(names::BATCHES),
                        "sequences": value(names::SEQUENCES),
                        "real_tokens": value(names::REAL_TOKENS),
                        "padded_tokens": value(names::PADDED_TOKENS),
                        "rejected": value(names::REJECTED),
                        "expired": value(names::EXPIRED),
                        "abandoned": value(names::ABANDONED),
                        "failed_sequences": value(names::FAILED_SEQUENCES),
                        "oom_splits": value(names::OOM_SPLITS),
                        "queued_sequences": queued_sequences,
                        "queued_tokens": queued_tokens,
                    });
                    // Every tenant cache in front of this model, together (tenants are not named here).
                    described["cache"] = json!({
                        "hits": value(names::CACHE_HITS),
                        "misses": value(names::CACHE_MISSES),
                        "evictions": value(names::CACHE_EVICTIONS),
                        "entries": value(names::CACHE_ENTRIES),
                        "bytes": value(names::CACHE_BYTES),
                    });
                }
                described
            })
            .collect();
        json!({ "models": models })
    }

    /// Reads the body (within the server's and the tenant's limits, and `body_read_timeout`)
    /// and copies what a plugin sees of the request (see [`withheld_from_plugins`]).
    async fn plugin_request(
        &self,
        tenant: &Tenant,
        parts: &hyper::http::request::Parts,
        body: Incoming,
    ) -> Result<plugins::Request, ApiError> {
        let limit = self.max_body_bytes;
        // n bytes pass the server's limit (413) or the tenant's quota (429).
        let check_size =
            |n: usize| if n > limit { Err(ApiError::BodyTooLarge { limit }) } else { Ok(tenant.check_body(n)?) };
        let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if let Some(declared) = declared {
            check_size(declared)?;
        }
        let withheld = withheld_from_plugins(&parts.headers);
        let read_limit = limit.min(tenant.limits.max_body_bytes);
        let read = Limited::new(body, read_limit).collect();
        let body = tokio::time::timeout(self.body_read_timeout, read)
            .await
            .map_err(|_| ApiError::BodyTimeout(self.body_read_timeout))?
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    check_size(read_limit + 1).expect_err("one byte past the smaller limit")
                } else {
                    ApiError::BadBody(e.to_string())
                }
            })?;
        Ok(plugins::Request {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            headers: parts
                .headers
                .iter()
                .filter(|(name, _)| !withheld.iter().any(|w| w.eq_ignore_ascii_case(name.as_str())))
                .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
                .collect(),
            body: body.to_bytes().to_vec(),
        })
    }
}

/// What a request answered without reading its body may still have read of it, and for how
/// long, so that its connection carries the next request: a small body on its way, not a large
/// one, nor a slow one.
const DRAIN_BYTES: usize = 64 << 10;
const DRAIN_WAIT: Duration = Duration::from_millis(100);

/// Whether the rest of an unread body (`None`: taken and left half read) arrived whole within
/// [`DRAIN_BYTES`] and [`DRAIN_WAIT`], and was dropped.
async fn drained(body: Option<Incoming>) -> bool {
    let Some(body) = body else { return false };
    let read = Limited::new(body, DRAIN_BYTES).collect();
    matches!(tokio::time::timeout(DRAIN_WAIT, read).await, Ok(Ok(_)))
}

/// How long a retired generation may wait for its last request before it is let go anyway (it
/// then ends with that request): longer than any request may take under the default limits.
const RETIRE_WAIT: Duration = Duration::from_secs(600);

impl App {
    /// Waits until no request holds `old` (each one holds it to its end), then drops it off the
    /// async workers (dropping a model the new config left out stops its thread and waits for
    /// it), and gives the queues `new`'s shares if `new` is still the current config.
    async fn retire(self: Arc<Self>, old: Arc<Loaded>, new: Arc<Loaded>) {
        let version = old.about["version"].clone();
        let started = Instant::now();
        while Arc::strong_count(&old) > 1 && started.elapsed() < RETIRE_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drained = Arc::strong_count(&old) == 1;
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        if drained {
            tracing::info!(%version, waited_ms = started.elapsed().as_millis() as u64, "previous config retired");
        } else {
            tracing::warn!(%version, "previous config still has requests after {RETIRE_WAIT:?}; it ends with the last");
        }
        // Not while a reload runs, and not over a newer config's shares.
        let _one_at_a_time = self.reloading.lock().await;
        if self.current().is_ok_and(|current| Arc::ptr_eq(&current, &new)) {
            for (model, shares) in &new.settled_shares {
                if let Err(e) = model.set_queue_shares(shares) {
                    tracing::error!(error = %e, "cannot settle the queue shares");
                }
            }
        }
    }
}

/// The time now, as RFC 3339 in UTC to the second.
fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// What the access log says of a request beyond its method, path and response: the tenant whose
/// route it was, and where the plugin runtime's time went, once known; and whether its body was
/// read whole.
#[derive(Default)]
struct Served {
    tenant: Option<String>,
    split: Option<plugins::TimeSplit>,
    body_read: bool,
}

impl Served {
    /// The request's access-log line (target `access`, level info): one per request, host routes
    /// and refusals included.
    fn log(self, id: u64, method: &Method, path: &str, response: &Response, started: Instant) {
        // Milliseconds to the microsecond: finer digits are noise.
        let ms = |d: Duration| d.as_micros() as f64 / 1e3;
        let split = self.split.unwrap_or_default();
        tracing::info!(
            target: "access",
            request_id = id,
            tenant = self.tenant.as_deref().unwrap_or("-"),
            method = %method,
            path,
            status = response.status().as_u16(),
            bytes = hyper::body::Body::size_hint(response.body()).exact().unwrap_or(0),
            total_ms = ms(started.elapsed()),
            tokenize_ms = ms(split.tokenize),
            queue_ms = ms(split.queue),
            inference_ms = ms(split.inference),
            plugin_ms = ms(split.plugin),
            "request"
        );
    }
}

/// The host a request is for (RFC 9112 §3.2): the authority of an absolute-form target wins over
/// `Host`; several `Host` headers, or none on HTTP/1.1 without one in the target, are refused.
fn target_host(request: &hyper::http::request::Parts) -> Result<Option<String>, ApiError> {
    let first = single_header(&request.headers, HOST, "several Host headers: send one")?;
    if let Some(host) = request.uri.host() {
        return Ok(Some(host.to_owned()));
    }
    match first {
        Some(value) => value
            .to_str()
            .map(|h| Some(h.to_owned()))
            .map_err(|_| ApiError::BadRequest("the Host header is not visible ASCII")),
        None if request.version == hyper::Version::HTTP_11 => {
            Err(ApiError::BadRequest("HTTP/1.1 requests need a Host header"))
        }
        None => Ok(None),
    }
}

/// The one value of header `name`, if any; several are refused with `several`.
fn single_header<'a>(
    headers: &'a hyper::HeaderMap,
    name: HeaderName,
    several: &'static str,
) -> Result<Option<&'a HeaderValue>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::BadRequest(several));
    }
    Ok(first)
}

/// The names of the headers a plugin never sees: the caller's credentials, which stay with the
/// host; cookies, which a browser sends to every tenant on the same host name; and hop-by-hop
/// headers (RFC 9110 §7.6.1), which describe this connection only, with any header that
/// `Connection` names.
fn withheld_from_plugins(headers: &hyper::HeaderMap) -> Vec<&str> {
    const WITHHELD: [&str; 11] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let named = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    WITHHELD.into_iter().chain(named).collect()
}

/// Response headers that are the host's alone: framing and the connection (the host computes
/// them from the body it sends), and cookies, which every tenant on one host name would share.
const HOST_RESPONSE_HEADERS: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
    "set-cookie",
];

/// A plugin's response as HTTP, once it is checked: a final status (200-599; informational
/// ones and 101 would change what the connection is), none of [`HOST_RESPONSE_HEADERS`], and
/// no more headers than the tenant's limits.
fn plugin_response(response: plugins::Response, limits: &TenantLimits) -> Result<Response, ApiError> {
    let refuse = |why: String| Err(ApiError::BadPluginResponse(why));
    if !(200..=599).contains(&response.status) {
        return refuse(format!("status {} is outside 200-599", response.status));
    }
    if response.headers.len() > limits.max_response_headers {
        return refuse(format!(
            "{} headers, more than the limit of {}",
            response.headers.len(),
            limits.max_response_headers
        ));
    }
    let bytes: usize = response.headers.iter().map(|(name, value)| name.len() + value.len()).sum();
    if bytes > limits.max_response_header_bytes {
        return refuse(format!(
            "{bytes} bytes of headers, more than the limit of {}",
            limits.max_response_header_bytes
        ));
    }
    let mut http = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *http.status_mut() = StatusCode::from_u16(response.status).expect("200-599 are valid statuses");
    for (name, value) in response.headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            return refuse(format!("header name {name:?} is not a valid name"));
        };
        if HOST_RESPONSE_HEADERS.contains(&name.as_str()) {
            return refuse(format!("header {name} is set by the host, not by plugins"));
        }
        let Ok(value) = HeaderValue::from_str(&value) else {
            return refuse(format!("the value of header {name} is not visible ASCII"));
        };
        http.headers_mut().append(name, value);
    }
    Ok(http)
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error variant, its status, code and the headers that go with it: the table the
    /// README's error list is written from.
    #[test]
    fn every_error_maps_to_its_status_code_and_headers() {
        let tenant = || "t".to_owned();
        /// An error, its status, its code, and a header it must carry.
        type Row = (ApiError, u16, &'static str, Option<(&'static str, &'static str)>);
        let table: Vec<Row> = vec![
            (ApiError::NotFound("/x".into()), 404, "not_found", None),
            (
                ApiError::MethodNotAllowed { method: Method::PUT, path: "/health".into(), allow: "GET" },
                405,
                "method_not_allowed",
                Some(("allow", "GET")),
            ),
            (ApiError::BodyTooLarge { limit: 1 }, 413, "body_too_large", None),
            (ApiError::BadBody("eof".into()), 400, "bad_body", None),
            (ApiError::BodyTimeout(Duration::from_secs(1)), 408, "body_timeout", Some(("connection", "close"))),
            (ApiError::BadRequest("two Host headers"), 400, "bad_request", None),
            (ApiError::NotReady, 503, "not_ready", Some(("retry-after", "1"))),
            (AccessError::MissingKey.into(), 401, "unauthorized", Some(("www-authenticate", "Bearer"))),
            (AccessError::InvalidKey.into(), 401, "unauthorized", Some(("www-authenticate", "Bearer"))),
            (AccessError::WrongTenant { tenant: tenant() }.into(), 403, "forbidden", None),
            (
                AccessError::Quota { tenant: tenant(), quota: "max_concurrent", detail: "64".into() }.into(),
                429,
                "quota_exceeded",
                Some(("retry-after", "1")),
            ),
            (
                AccessError::Quota { tenant: tenant(), quota: "max_body_bytes", detail: "1".into() }.into(),
                429,
                "quota_exceeded",
                None,
            ),
            (PluginError::HostcallBytes { tenant: tenant(), limit: 1 }.into(), 429, "quota_exceeded", None),
            (PluginError::NoCapacity.into(), 503, "overloaded", Some(("retry-after", "1"))),
            (PluginError::WallTimeout { tenant: tenant(), limit_ms: 1 }.into(), 504, "plugin_timeout", None),
            (PluginError::CpuLimit { tenant: tenant(), limit_ms: 1 }.into(), 500, "plugin_cpu_limit", None),
            (PluginError::MemoryLimit { tenant: tenant(), limit: 1 }.into(), 500, "plugin_memory_limit", None),
            (PluginError::Trapped { tenant: tenant(), message: "panic".into() }.into(), 500, "plugin_failed", None),
            (
                PluginError::Read {
                    tenant: tenant(),
                    path: "p.wasm".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                }
                .into(),
                500,
                "plugin_failed",
                None,
            ),
            (PluginError::Compile { tenant: tenant(), message: "bad".into() }.into(), 500, "plugin_failed", None),
            (
                PluginError::MissingExport { tenant: tenant(), message: "handle".into() }.into(),
                500,
                "plugin_failed",
                None,
            ),
            (PluginError::Configure { tenant: tenant(), message: "no".into() }.into(), 500, "plugin_failed", None),
            (PluginError::Describe { tenant: tenant(), message: "no".into() }.into(), 500, "plugin_failed", None),
            (PluginError::MemoryTooSmall { tenant: tenant(), need: 2, limit: 1 }.into(), 500, "plugin_failed", None),
            (ApiError::BadPluginResponse("status 101".into()), 500, "bad_plugin_response", None),
            (ApiError::ReloadRefused("no such file".into()), 422, "reload_refused", None),
        ];
        for (error, status, code, header) in table {
            let what = format!("{error:?}");
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{what}");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json", "{what}");
            if let Some((name, value)) = header {
                assert_eq!(response.headers()[name], value, "{what}");
            }
            let body: serde_json::Value = serde_json::from_slice(&body_bytes(response)).unwrap();
            assert_eq!(body["error"]["code"], code, "{what}");
            assert!(!body["error"]["message"].as_str().unwrap().is_empty(), "{what}");
        }
    }

    fn body_bytes(response: Response) -> Bytes {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(response.into_body().collect()).unwrap().to_bytes()
    }
}
