//! What every batchbox plugin needs, so a plugin is mostly its own logic:
//!
//! - the bindings of `wit/batchbox.wit` (the host's [`host`] functions, the [`Plugin`] trait a
//!   plugin implements, and [`export_plugin!`] to export it);
//! - JSON in and out: [`parse_json`], [`parse_config`], [`json`], and errors in the host's
//!   shape, [`error`];
//! - [`Error::into_response`]: a failed host call as the HTTP answer it stands for.
//!
//! ```ignore
//! struct Echo;
//! impl batchbox_sdk::Plugin for Echo {
//!     fn configure(_config: String) -> Result<(), String> { Ok(()) }
//!     fn handle(request: batchbox_sdk::Request) -> batchbox_sdk::Response {
//!         batchbox_sdk::json(200, &request.path)
//!     }
//! }
//! batchbox_sdk::export_plugin!(Echo);
//! ```

wit_bindgen::generate!({
    world: "plugin",
    path: "../../wit",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "batchbox_sdk",
});

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use batchbox::plugin::host;
pub use batchbox::plugin::types::{Encoding, Error, Inference, Level, ModelInfo, Task, Tensor};
pub use exports::batchbox::plugin::handler::{Guest as Plugin, Request, Response};

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response { status, headers: vec![content_type_json()], body },
        Err(e) => error(500, "internal", format!("cannot serialise the response: {e}")),
    }
}

/// An error response in the host's shape: `{"error": {"code": ..., "message": ...}}`.
pub fn error(status: u16, code: &str, message: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message.to_string() } });
    Response { status, headers: vec![content_type_json()], body: body.to_string().into_bytes() }
}

/// Parses a JSON body; on failure, the 400 response that says what was wrong and where.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(error(400, "invalid_json", "the request body is empty; expected JSON"));
    }
    from_json(body).map_err(|e| error(400, "invalid_json", format!("invalid JSON body: {e}")))
}

/// Parses the plugin's config (what `configure` receives); the error names the offending key.
pub fn parse_config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    from_json(config.as_bytes()).map_err(|e| format!("invalid config: {e}"))
}

/// serde_json, with the path to the offending value in the message (`sentences[3]: ...`).
fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// Answers 405 unless the request uses `method`.
pub fn require_method(request: &Request, method: &str) -> Result<(), Response> {
    if request.method == method {
        return Ok(());
    }
    let mut response = error(405, "method_not_allowed", format!("{} is not allowed here; use {method}", request.method));
    response.headers.push(("allow".into(), method.into()));
    Err(response)
}

impl Error {
    /// The HTTP answer a failed host call stands for (status documented in the WIT).
    pub fn into_response(self) -> Response {
        match self {
            Error::InvalidInput(m) => error(400, "invalid_input", m),
            Error::TooLarge(m) => error(413, "too_large", m),
            Error::Overloaded(m) => {
                let mut response = error(503, "overloaded", m);
                response.headers.push(("retry-after".into(), "1".into()));
                response
            }
            Error::TimedOut(m) => error(504, "timed_out", m),
            Error::Internal(m) => error(500, "internal", m),
        }
    }
}

fn content_type_json() -> (String, String) {
    ("content-type".into(), "application/json".into())
}
