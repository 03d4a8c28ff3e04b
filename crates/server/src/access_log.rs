//! The access log: one line per request (target `access`, level info), host routes and refusals
//! included.

use std::time::{Duration, Instant};

use hyper::Method;

use batchbox_plugins as plugins;

use crate::Response;

/// What the access log says of a request beyond its method, path and response: the tenant whose
/// route it was, and where the plugin runtime's time went, once known; and whether its body was
/// read whole.
#[derive(Default)]
pub(crate) struct Served {
    pub(crate) tenant: Option<String>,
    pub(crate) split: Option<plugins::TimeSplit>,
    pub(crate) body_read: bool,
}

impl Served {
    /// The request's access-log line (target `access`, level info): one per request, host routes
    /// and refusals included.
    pub(crate) fn log(self, id: u64, method: &Method, path: &str, response: &Response, started: Instant) {
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
