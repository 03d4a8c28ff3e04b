//! [`ApiError`]: every error the host answers a request with, and the one exhaustive mapping from
//! error to HTTP status, code and headers. Every error is written as the JSON body
//! `{"error": {"code": ..., "message": ...}}`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::json;

use batchbox_plugins::PluginError;
use batchbox_tenants::AccessError;

use crate::Response;

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
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
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

    pub(crate) fn into_response(self) -> Response {
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

/// A JSON body with `status`.
pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

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
