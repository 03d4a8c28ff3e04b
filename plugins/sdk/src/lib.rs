//! What every batchbox plugin needs, so a plugin is mostly its own logic:
//!
//! - the bindings of `wit/batchbox.wit` (the host's [`host`] functions, the [`Plugin`] and
//!   [`Describe`] traits a plugin implements, and [`export_plugin!`] to export it);
//! - JSON in and out: [`parse_json`], [`parse_config`], [`json`], errors in the host's shape,
//!   [`error`], and the usual body of a text model, [`TextList`], with its parts [`check_count`]
//!   and [`check_text`] for bodies whose items are more than strings;
//! - the arithmetic every classifier repeats: [`softmax`], [`argmax`], [`ms`], [`round_ms`];
//! - [`scores`]: a classifier's scores as its checkpoint means them (softmax, sigmoid or none) and
//!   as a request asks for them (`function_to_apply`, `top_k`, `raw_scores`, `threshold`);
//! - [`Error::into_response`]: a failed host call as the HTTP answer it stands for;
//! - [`openapi`]: the pieces of a `describe` answer every plugin repeats.
//!
//! ```ignore
//! struct Echo;
//! impl batchbox_sdk::Plugin for Echo {
//!     fn configure(_config: String) -> Result<(), String> { Ok(()) }
//!     fn handle(request: batchbox_sdk::Request) -> batchbox_sdk::Response {
//!         batchbox_sdk::json(200, &request.path)
//!     }
//! }
//! impl batchbox_sdk::Describe for Echo {
//!     fn describe() -> String { String::new() } // nothing for GET /openapi.json
//! }
//! batchbox_sdk::export_plugin!(Echo);
//! ```

wit_bindgen::generate!({
    world: "described-plugin",
    path: "../../wit",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "batchbox_sdk",
});

pub mod scores;

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use batchbox::plugin::host;
pub use batchbox::plugin::types::{
    Encoding, Error, Inference, Level, ModelInfo, Task, Tensor, TextInference, Truncation,
};
pub use exports::batchbox::plugin::api::Guest as Describe;
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
    error_with(status, serde_json::json!({ "code": code, "message": message.to_string() }))
}

fn error_with(status: u16, error: Value) -> Response {
    let body = serde_json::json!({ "error": error });
    Response { status, headers: vec![content_type_json()], body: body.to_string().into_bytes() }
}

/// Parses a JSON body; on failure, the 400 response that says what was wrong and where.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(error(400, "invalid_json", "the request body is empty; expected JSON"));
    }
    from_json(body).map_err(|e| error(400, "invalid_json", format!("invalid JSON body: {e}")))
}

/// A plugin's settings: parsed by `configure` (checking the model's task too), read by `handle`.
pub struct Settings<C>(OnceLock<C>);

impl<C: DeserializeOwned> Settings<C> {
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// Parses `config` and checks that the tenant's model does `task`; an error stops startup.
    pub fn configure(&self, config: &str, task: Task) -> Result<(), String> {
        let parsed = parse_config(config)?;
        let info = host::model();
        if info.task != task {
            return Err(format!("model {} does {:?}; this plugin needs {task:?}", info.name, info.task));
        }
        self.0.set(parsed).map_err(|_| "configured twice".to_string())
    }

    pub fn get(&self) -> Result<&C, Response> {
        self.0.get().ok_or_else(|| error(500, "internal", "plugin not configured"))
    }
}

impl<C: DeserializeOwned> Default for Settings<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses the plugin's config (what `configure` receives); the error names the offending key.
pub fn parse_config<T: DeserializeOwned>(config: &str) -> Result<T, String> {
    from_json(config.as_bytes()).map_err(|e| format!("invalid config: {e}"))
}

/// serde_json, with the path to the offending value in the message (`sentences[3]: ...`).
fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            path => format!("{path}: {}", e.inner()),
        })?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// A list of texts in a request body, `{"<field>": [...]}` or a bare array of strings, each
/// checked: errors say which item is wrong and why (400), or which limit it passes (413).
pub struct TextList<'a> {
    /// The body's field, e.g. `sentences`.
    pub field: &'a str,
    /// One item, for error codes: `too_many_<item>s`, `<item>_too_long`.
    pub item: &'a str,
    pub max_items: usize,
    pub max_chars: usize,
}

impl TextList<'_> {
    pub fn parse(&self, body: &[u8]) -> Result<Vec<String>, Response> {
        Ok(self.parse_with(body, &[])?.0)
    }

    /// As [`parse`](Self::parse), but the object form may also hold the `optional` fields (e.g.
    /// [`scores::SCORE_FIELDS`]), returned beside the texts for the caller to read; a bare array
    /// has none.
    pub fn parse_with(&self, body: &[u8], optional: &[&str]) -> Result<(Vec<String>, Map<String, Value>), Response> {
        let (field, item) = (self.field, self.item);
        let bad = |message: String| error(400, "invalid_request", message);
        let mut options = Map::new();
        let items = match parse_json::<Value>(body)? {
            Value::Array(items) => items,
            Value::Object(mut fields) => {
                let texts = fields.remove(field).ok_or_else(|| bad(format!("missing field `{field}`")))?;
                if let Some(unknown) = fields.keys().find(|key| !optional.contains(&key.as_str())) {
                    let also = match optional {
                        [] => String::new(),
                        names => format!(", with optional {}", names.join(", ")),
                    };
                    return Err(bad(format!("unknown field `{unknown}`; the body is {{\"{field}\": [...]}}{also}")));
                }
                options = fields;
                match texts {
                    Value::Array(items) => items,
                    other => return Err(bad(format!("`{field}` must be an array of strings, not {}", kind(&other)))),
                }
            }
            other => {
                return Err(bad(format!(
                    "expected {{\"{field}\": [...]}} or an array of strings, not {}",
                    kind(&other)
                )));
            }
        };
        check_count(items.len(), item, self.max_items)?;
        let texts = items
            .iter()
            .enumerate()
            .map(|(i, value)| check_text(value, &format!("{field}[{i}]"), item, self.max_chars))
            .collect::<Result<_, _>>()?;
        Ok((texts, options))
    }
}

/// 413 `too_many_<item>s` when `count` is over `limit` (the Python and JavaScript SDKs'
/// `check_count`); a part of [`TextList`], for bodies whose items are more than strings.
pub fn check_count(count: usize, item: &str, limit: usize) -> Result<(), Response> {
    if count <= limit {
        return Ok(());
    }
    Err(error(413, &format!("too_many_{item}s"), format!("{count} {item}s in one request; the limit is {limit}")))
}

/// `value` if it is a non-blank string of at most `max_chars` characters; else a 400 naming
/// `at` (e.g. `sentences[3]`), or 413 `<item>_too_long` (the other SDKs' `check_text`).
pub fn check_text(value: &Value, at: &str, item: &str, max_chars: usize) -> Result<String, Response> {
    let bad = |message: String| error(400, "invalid_request", message);
    match value {
        Value::String(s) if s.trim().is_empty() => Err(bad(format!("{at} is empty"))),
        Value::String(s) if s.chars().count() > max_chars => Err(error(
            413,
            &format!("{item}_too_long"),
            format!("{at} has {} characters; the limit is {max_chars}", s.chars().count()),
        )),
        Value::String(s) => Ok(s.clone()),
        other => Err(bad(format!("{at} must be a string, not {}", kind(other)))),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Probabilities from logits (numerically stable).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|x| x / sum).collect()
}

/// The index of the largest value (the first among equals); 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i).unwrap_or(0)
}

/// Milliseconds since `since`.
pub fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Milliseconds to the microsecond, for responses: finer digits are noise.
pub fn round_ms(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

/// Answers 405 unless the request uses `method`.
pub fn require_method(request: &Request, method: &str) -> Result<(), Response> {
    if request.method == method {
        return Ok(());
    }
    let mut response =
        error(405, "method_not_allowed", format!("{} is not allowed here; use {method}", request.method));
    response.headers.push(("allow".into(), method.into()));
    Err(response)
}

impl Error {
    /// The HTTP answer a failed host call stands for (status documented in the WIT).
    pub fn into_response(self) -> Response {
        match self {
            Error::InvalidInput(m) => error(400, "invalid_input", m),
            Error::TooLarge(m) => error(413, "too_large", m),
            Error::QuotaExceeded(e) => {
                error_with(429, serde_json::json!({ "code": "quota_exceeded", "message": e.message, "quota": e.quota }))
            }
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

/// Helpers for [`Describe::describe`]: an OpenAPI 3.1 fragment (see the WIT's `api`).
pub mod openapi {
    use serde_json::{Value, json};

    /// The error body every SDK writes, `{"error": {"code", "message", "quota"?}}`, to put in the
    /// fragment's `components.schemas` as `Error` (the host renames it per tenant).
    pub fn error_schema() -> Value {
        json!({
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": { "type": "string" },
                    "message": { "type": "string" },
                    "quota": { "type": "string" },
                },
            } },
        })
    }

    /// A response whose body is that `Error`.
    pub fn error_response(description: &str) -> Value {
        json!({ "description": description, "content": { "application/json": { "schema": schema("Error") } } })
    }

    /// `{"$ref": "#/components/schemas/<name>"}`.
    pub fn schema(name: &str) -> Value {
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// The usual body of a text model (see [`TextList`](crate::TextList)): `{"<field>": [...]}` or a
    /// bare array of non-empty strings, with its limits.
    pub fn text_list(field: &str, max_items: usize, max_chars: usize) -> Value {
        text_list_with(field, max_items, max_chars, json!({}))
    }

    /// [`text_list`] whose object form also takes the `optional` properties (a JSON object of
    /// schemas, e.g. [`score_options`]).
    pub fn text_list_with(field: &str, max_items: usize, max_chars: usize, optional: Value) -> Value {
        let list = json!({
            "type": "array",
            "maxItems": max_items,
            "items": { "type": "string", "minLength": 1, "maxLength": max_chars },
        });
        let mut properties = json!({ field: list });
        if let (Some(properties), Value::Object(optional)) = (properties.as_object_mut(), optional) {
            properties.extend(optional);
        }
        json!({ "oneOf": [
            { "type": "object", "required": [field], "additionalProperties": false, "properties": properties },
            list,
        ] })
    }

    /// The request fields of [`scores`](crate::scores), as properties for [`text_list_with`].
    pub fn score_options() -> Value {
        json!({
            "function_to_apply": {
                "enum": ["softmax", "sigmoid", "none", null],
                "description": "The function from logits to scores; the model's own when absent (softmax, or a \
                    sigmoid per label for multi-label and one-label models, none for regression).",
            },
            "raw_scores": { "type": "boolean", "description": "true: the logits, as function_to_apply \"none\"." },
            "top_k": {
                "type": ["integer", "null"],
                "minimum": 1,
                "description": "Adds `scores`: each text's k highest labels and scores, sorted; null for all labels.",
            },
            "threshold": {
                "type": "number",
                "description": "Multi-label models only: a label over it is predicted (default 0.5).",
            },
        })
    }

    /// What a classifier answers: `probabilities` (the scores, in label order), `labels`,
    /// `predictions` (a label per text, or for a multi-label model the labels over the threshold),
    /// `scores` when asked for with `top_k`, and `metadata` (the `Classified` metadata of the
    /// Python and JavaScript SDKs).
    pub fn prediction_schema() -> Value {
        let strings = json!({ "type": "array", "items": { "type": "string" } });
        let number = json!({ "type": "number" });
        let integer = json!({ "type": "integer" });
        let integers = json!({ "type": "array", "items": integer });
        let label_score = json!({
            "type": "object",
            "required": ["label", "score"],
            "properties": { "label": { "type": "string" }, "score": number },
        });
        json!({
            "type": "object",
            "required": ["probabilities", "labels", "predictions", "metadata"],
            "properties": {
                "probabilities": { "type": "array", "items": { "type": "array", "items": number } },
                "labels": strings,
                "predictions": { "type": "array", "items": { "oneOf": [{ "type": "string" }, strings] } },
                "scores": { "type": "array", "items": { "type": "array", "items": label_score } },
                "metadata": {
                    "type": "object",
                    "properties": {
                        "processing_time_ms": number,
                        "total_words": integer,
                        "total_tokens": integer,
                        "num_sentences": integer,
                        "model_version": { "type": "string" },
                        "truncated": integers,
                        "forward_passes": integer,
                        "batch_ids": integers,
                        "breakdown_ms": { "type": "object", "additionalProperties": number },
                    },
                },
            },
        })
    }
}
