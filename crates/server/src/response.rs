//! A plugin's response as HTTP, once the host has checked it against its rules and the tenant's
//! limits.

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use hyper::header::{HeaderName, HeaderValue};

use batchbox_plugins as plugins;
use batchbox_tenants::TenantLimits;

use crate::{ApiError, Response};

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
pub(crate) fn plugin_response(response: plugins::Response, limits: &TenantLimits) -> Result<Response, ApiError> {
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
