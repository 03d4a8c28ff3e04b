//! What the host reads of a request: the host it is for, single headers, and the body, read for a
//! tenant's plugin within the server's and the tenant's limits, or drained after an early answer
//! so the connection can carry the next request.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::HeaderMap;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue};

use batchbox_plugins as plugins;
use batchbox_tenants::Tenant;

use crate::{ApiError, App};

impl App {
    /// Reads the body (within the server's and the tenant's limits, and `body_read_timeout`)
    /// and copies what a plugin sees of the request (see [`withheld_from_plugins`]).
    pub(crate) async fn plugin_request(
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

/// Whether the client waits for `100 Continue` before it sends the body (RFC 9110 §10.1.1). hyper
/// answers it when the body is first read, so a body is read only once the request is let through
/// (its route, key, quotas and declared length): a refused client never sends it.
pub(crate) fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(EXPECT).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether the rest of an unread body (`None`: taken and left half read) arrived whole within
/// [`DRAIN_BYTES`] and [`DRAIN_WAIT`], and was dropped.
pub(crate) async fn drained(body: Option<Incoming>) -> bool {
    let Some(body) = body else { return false };
    let read = Limited::new(body, DRAIN_BYTES).collect();
    matches!(tokio::time::timeout(DRAIN_WAIT, read).await, Ok(Ok(_)))
}

/// The host a request is for (RFC 9112 §3.2): the authority of an absolute-form target wins over
/// `Host`; several `Host` headers, or none on HTTP/1.1 without one in the target, are refused.
pub(crate) fn target_host(request: &hyper::http::request::Parts) -> Result<Option<String>, ApiError> {
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
pub(crate) fn single_header<'a>(
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
