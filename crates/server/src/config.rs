//! The `server:` section of the config file: where to listen and the limits of the HTTP edge.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use batchbox_tenants::{KeyHash, KeySource};
use serde::{Deserialize, Serialize};

/// The `server:` section. Every key has a default, so the section may be left out. A reload may
/// change `admin_keys` only: the rest is fixed for the life of the process (sockets, the plugin
/// pool), so a reload that changes it is refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where to listen; `PORT` or `--bind` override it.
    pub bind: SocketAddr,
    /// Larger request bodies get 413 before any tenant is involved; tenants may set less.
    pub max_body_bytes: usize,
    /// Plugin instances alive at once (the pooling allocator's size); more concurrent requests
    /// than this get 503.
    pub max_instances: u32,
    /// Compiled plugins are kept here so a restart does not recompile them. Relative to the config file.
    pub plugin_cache_dir: PathBuf,
    /// The cache's budget: once a config is in service, the files it does not use go, oldest
    /// compiled first, until the directory fits (the files it uses always stay).
    pub plugin_cache_max_bytes: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub shutdown_grace_ms: u64,
    /// A request's headers must arrive within this long of the connection opening or of the
    /// previous response (HTTP/1.1); slower or stalled headers close the connection.
    pub header_read_timeout_ms: NonZeroU64,
    /// A connection with no request in flight is closed after this long (both protocols).
    pub keep_alive_idle_ms: NonZeroU64,
    /// A request body must arrive within this long of its headers; a slower one gets 408 and
    /// gives its tenant's `max_concurrent` slot back.
    pub body_read_timeout_ms: NonZeroU64,
    /// Open connections at once; past it the server stops accepting until one closes (new
    /// clients wait in the listen backlog).
    pub max_connections: NonZeroUsize,
    /// Bytes of request headers (HTTP/1.1: the read buffer, at least 8 KiB; HTTP/2: the header
    /// list size).
    pub max_header_bytes: usize,
    /// HTTP/2 requests in flight on one connection.
    pub http2_max_concurrent_streams: NonZeroU32,
    /// Record metrics and serve them at `GET /metrics` (Prometheus text). Off: no recorder, and
    /// `/v1/models` shows no counters.
    pub metrics: bool,
    /// Serve `/metrics` on this address alone, and not on `bind`, so that tenants cannot scrape
    /// it. Unset: on `bind`, with the other host routes.
    pub metrics_bind: Option<SocketAddr>,
    /// Who may call the admin routes (`POST /admin/reload`, `GET /admin/config`): keys given as a
    /// tenant's are (`sha256:`, `env:`, `file:`). None, the default: the admin routes are off (404).
    #[serde(skip_serializing)]
    pub admin_keys: Vec<KeySource>,
    /// The admin keys' SHA-256 hashes, read from `admin_keys` at load time.
    #[serde(skip)]
    pub admin_key_hashes: Vec<KeyHash>,
}

impl ServerConfig {
    /// hyper's smallest HTTP/1.1 read buffer.
    pub const MIN_HEADER_BYTES: usize = 8 << 10;
    /// More than any one process can hold open, and few enough to count as a semaphore's permits.
    pub const MAX_CONNECTIONS: usize = 1 << 20;
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 2 << 20,
            max_instances: 256,
            plugin_cache_dir: PathBuf::from("target/plugin-cache"),
            plugin_cache_max_bytes: 4 << 30,
            shutdown_grace_ms: 10_000,
            header_read_timeout_ms: NonZeroU64::new(10_000).unwrap(),
            keep_alive_idle_ms: NonZeroU64::new(10_000).unwrap(),
            body_read_timeout_ms: NonZeroU64::new(30_000).unwrap(),
            max_connections: NonZeroUsize::new(4_096).unwrap(),
            max_header_bytes: 64 << 10,
            http2_max_concurrent_streams: NonZeroU32::new(100).unwrap(),
            metrics: true,
            metrics_bind: None,
            admin_keys: Vec::new(),
            admin_key_hashes: Vec::new(),
        }
    }
}
