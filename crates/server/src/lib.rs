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

mod access_log;
mod config;
mod connections;
mod error;
mod models;
mod openapi;
mod request;
mod response;
mod tenant_info;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::json;
use tracing::Instrument;
use tracing::field::Empty;

use access_log::Served;
use batchbox_metrics::PrometheusHandle;
use batchbox_model::{Model, QueueShares};
use batchbox_plugins::PluginRuntime;
use batchbox_tenants::{KeyHash, Tenant, Tenants};
pub use config::ServerConfig;
pub use connections::{ConnectionLimits, serve};
pub use error::ApiError;
use error::json_response;
pub use hyper::HeaderMap;
use request::{drained, expects_continue, single_header, target_host};
use response::plugin_response;

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
        // one rather than send its next request on one about to close. A client that sent
        // `Expect: 100-continue` is waiting for leave to send its body, and reading the body would
        // give it (hyper sends `100 Continue` when the body is first read): it gets the final
        // status alone (RFC 9110 §10.1.1), and the connection closes.
        let reusable =
            !body_expected || served.body_read || (!expects_continue(&parts.headers) && drained(body.take()).await);
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
        let (tenant, route) =
            loaded.tenants.route_matched(host.as_deref(), &path).ok_or_else(|| ApiError::NotFound(path.clone()))?;
        let started = Instant::now();
        served.tenant = Some(tenant.name.clone());
        let result = match tenant_info::endpoint(&route.path, &path) {
            Some(page) => self.tenant_endpoint(&loaded, tenant, page, parts),
            None => self.for_tenant(&loaded, tenant, id, parts, body, served).await,
        };
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

    /// `GET <route>/health` (public) or `GET <route>/info` (the tenant's key): see
    /// [`tenant_info`].
    fn tenant_endpoint(
        &self,
        loaded: &Loaded,
        tenant: &Tenant,
        page: &str,
        parts: &hyper::http::request::Parts,
    ) -> Result<Response, ApiError> {
        let path = parts.uri.path().to_owned();
        if parts.method != Method::GET {
            return Err(ApiError::MethodNotAllowed { method: parts.method.clone(), path, allow: "GET" });
        }
        if page == "/health" {
            return Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })));
        }
        authorize(loaded, tenant, parts)?;
        let info = tenant_info::info(loaded, tenant).ok_or(ApiError::NotFound(path))?;
        Ok(json_response(StatusCode::OK, &info))
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
        authorize(loaded, tenant, parts)?;
        let _in_flight = tenant.admit()?;
        let body = body.take().expect("only a tenant's route reads the body");
        let request = self.plugin_request(tenant, parts, body).await?;
        served.body_read = true;
        let (response, split) = loaded.plugins.handle_timed(&tenant.name, id, request).await;
        served.split = Some(split);
        plugin_response(response?, &tenant.limits)
    }
}

/// Checks the request's `Authorization` against `tenant`'s keys (401 or 403 if it does not hold).
fn authorize(loaded: &Loaded, tenant: &Tenant, parts: &hyper::http::request::Parts) -> Result<(), ApiError> {
    let key = single_header(&parts.headers, AUTHORIZATION, "several Authorization headers: send one")?;
    Ok(loaded.tenants.authorize(tenant, key.map(HeaderValue::as_bytes))?)
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
