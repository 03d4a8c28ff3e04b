//! Reranking with a cross-encoder, in the two shapes rerank clients speak, so that they work
//! unchanged against a tenant's route (`<route>` is the URL they are given):
//!
//! - `POST <route>/rerank`: TEI's. `{"query", "texts": [...], "raw_scores", "return_text",
//!   "truncate", "truncation_direction"}`, answered with `[{"index", "score", "text"?}]`, highest
//!   score first.
//! - `POST <route>/v2/rerank`: Cohere's v2, which the `cohere` SDK's `ClientV2(base_url=<route>)
//!   .rerank(...)` sends. `{"model", "query", "documents": [...], "top_n", "max_tokens_per_doc",
//!   "priority"}`, answered with `{"results": [{"index", "relevance_score"}], "meta"}` (and `"id"`,
//!   the client's `X-Request-Id`, when it sends one),
//!   highest first, cut to `top_n`. `model` is the client's to name: the tenant's model answers
//!   whatever it says. `priority` is taken and not used: the host's scheduler shares the model
//!   between tenants, not between one tenant's requests. `max_tokens_per_doc` is honoured only as
//!   far as the model's own limit, which is lower than Cohere's default.
//!
//! Each (query, document) pair goes to the host in one `infer-pairs` call, cut `longest_first`
//! (sentence-transformers' `CrossEncoder` and TEI cut so). The score is the model's one logit
//! through its own scoring function (a sigmoid for a one-label head, as transformers' pipeline
//! and TEI take it), or the logit itself with TEI's `raw_scores`. The model must have one label:
//! `configure` refuses another.
//!
//! Limits (the plugin's `config`): `max_documents` (1,000, Cohere's advice) and `max_input_chars`
//! (10,000) per request. Errors are the host's shape and name the field.

use batchbox_sdk::openapi::{error_response, error_schema};
use batchbox_sdk::scores::{apply, ranked};
use batchbox_sdk::{
    Describe, Plugin, Request, Response, Settings, Task, Truncation, check_count, check_text, error, host, json,
    parse_json, require_method,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    max_documents: usize,
    max_input_chars: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_documents: 1000, max_input_chars: 10_000 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

struct Rerank;

impl Plugin for Rerank {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::SequenceClassification)?;
        let info = host::model();
        if info.labels.len() != 1 {
            return Err(format!(
                "model {} has {} labels; reranking needs a cross-encoder with one label (a relevance score)",
                info.name,
                info.labels.len()
            ));
        }
        Ok(())
    }

    fn handle(request: Request) -> Response {
        let path = request.path.trim_end_matches('/');
        let answer = if path.ends_with("/v2/rerank") {
            cohere(&request)
        } else if path.ends_with("/rerank") {
            tei(&request)
        } else {
            Err(error(
                404,
                "not_found",
                format!("{path}: this route answers POST <route>/rerank and <route>/v2/rerank"),
            ))
        };
        answer.unwrap_or_else(|response| response)
    }
}

fn bad(message: impl std::fmt::Display) -> Response {
    error(400, "invalid_request", message)
}

/// The body as a JSON object whose keys are all among `known`.
fn object(request: &Request, known: &[&str]) -> Result<Map<String, Value>, Response> {
    require_method(request, "POST")?;
    match parse_json::<Value>(&request.body)? {
        Value::Object(fields) => match fields.keys().find(|key| !known.contains(&key.as_str())) {
            Some(unknown) => Err(bad(format!("unknown field `{unknown}`; expected {}", known.join(", ")))),
            None => Ok(fields),
        },
        _ => Err(bad(format!("expected a JSON object with {}", known.join(", ")))),
    }
}

/// `query` and the documents under `field`, each checked.
fn query_and_documents(
    fields: &Map<String, Value>,
    field: &str,
    config: &Config,
) -> Result<(String, Vec<String>), Response> {
    let query = check_text(fields.get("query").unwrap_or(&Value::Null), "query", "input", config.max_input_chars)?;
    let documents = match fields.get(field) {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(bad(format!("`{field}` is empty"))),
        None | Some(Value::Null) => return Err(bad(format!("missing field `{field}`"))),
        Some(_) => return Err(bad(format!("`{field}` must be an array of strings"))),
    };
    check_count(documents.len(), "document", config.max_documents)?;
    let documents = documents
        .iter()
        .enumerate()
        .map(|(i, item)| check_text(item, &format!("{field}[{i}]"), "document", config.max_input_chars))
        .collect::<Result<_, _>>()?;
    Ok((query, documents))
}

/// Each document's relevance to the query, in the documents' order: the one logit, raw or
/// through the model's scoring function; and the indices of the pairs the model truncated.
fn relevance(query: &str, documents: &[String], raw: bool) -> Result<(Vec<f32>, Vec<u32>), Response> {
    let pairs: Vec<(String, String)> = documents.iter().map(|d| (query.to_owned(), d.clone())).collect();
    let computed = host::infer_pairs(&pairs, Truncation::LongestFirst).map_err(|e| e.into_response())?;
    let activation = host::model_scoring().activation;
    let scores = computed
        .inference
        .outputs
        .iter()
        .map(|t| if raw { t.data[0] } else { apply(activation, &t.data)[0] })
        .collect();
    Ok((scores, computed.truncated))
}

fn flag(fields: &Map<String, Value>, name: &str, default: bool) -> Result<bool, Response> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(bad(format!("`{name}` must be a boolean"))),
    }
}

/// `POST <route>/rerank`: TEI's shape.
fn tei(request: &Request) -> Result<Response, Response> {
    let config = SETTINGS.get()?;
    let known = ["query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction"];
    let fields = object(request, &known)?;
    let (query, texts) = query_and_documents(&fields, "texts", config)?;
    match fields.get("truncation_direction").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
        None | Some("right") => {}
        Some(other) => {
            return Err(bad(format!(
                "truncation_direction `{other}` is not supported: pairs lose their ends (`right`)"
            )));
        }
    }
    let (raw, return_text, truncate) =
        (flag(&fields, "raw_scores", false)?, flag(&fields, "return_text", false)?, flag(&fields, "truncate", true)?);
    let (scores, truncated) = relevance(&query, &texts, raw)?;
    if let (false, Some(&first)) = (truncate, truncated.first()) {
        return Err(error(
            413,
            "input_too_long",
            format!(
                "texts[{first}] with the query is longer than the model's {} tokens; send `truncate: true` to cut it",
                host::model().max_length
            ),
        ));
    }
    let results: Vec<Value> = ranked(&scores)
        .into_iter()
        .map(|i| match return_text {
            true => json!({ "index": i, "score": f64::from(scores[i]), "text": texts[i] }),
            false => json!({ "index": i, "score": f64::from(scores[i]) }),
        })
        .collect();
    Ok(json(200, &results))
}

/// `POST <route>/v2/rerank`: Cohere's v2 shape.
fn cohere(request: &Request) -> Result<Response, Response> {
    let config = SETTINGS.get()?;
    let known = ["model", "query", "documents", "top_n", "max_tokens_per_doc", "priority"];
    let fields = object(request, &known)?;
    let (query, documents) = query_and_documents(&fields, "documents", config)?;
    let top_n = match fields.get("top_n") {
        None | Some(Value::Null) => documents.len(),
        Some(value) => match value.as_u64() {
            Some(n) if n >= 1 => (n as usize).min(documents.len()),
            _ => return Err(bad(format!("`top_n` must be a positive integer, not {value}"))),
        },
    };
    let max_length = host::model().max_length;
    match fields.get("max_tokens_per_doc") {
        None | Some(Value::Null) => {}
        Some(value) => match value.as_u64() {
            Some(n) if n >= u64::from(max_length) => {}
            Some(n) if n >= 1 => {
                return Err(bad(format!(
                    "`max_tokens_per_doc` {n} is below the model's limit of {max_length} tokens a pair, which is all this \
                     route cuts to; leave it out"
                )));
            }
            _ => return Err(bad(format!("`max_tokens_per_doc` must be a positive integer, not {value}"))),
        },
    }
    match fields.get("priority") {
        None | Some(Value::Null) | Some(Value::Number(_)) => {}
        Some(value) => return Err(bad(format!("`priority` must be a number, not {value}"))),
    }
    let (scores, _) = relevance(&query, &documents, false)?;
    let results: Vec<Value> = ranked(&scores)
        .into_iter()
        .take(top_n)
        .map(|i| json!({ "index": i, "relevance_score": f64::from(scores[i]) }))
        .collect();
    let mut answer = json!({
        "results": results,
        "meta": { "api_version": { "version": "2" }, "billed_units": { "search_units": 1 } },
    });
    // Cohere's `id` is optional: echo the client's own request id when it sent one.
    if let Some((_, id)) = request.headers.iter().find(|(name, _)| name == "x-request-id") {
        answer["id"] = json!(id);
    }
    Ok(json(200, &answer))
}

impl Describe for Rerank {
    fn describe() -> String {
        let config = SETTINGS.get().copied().unwrap_or_default();
        let texts = json!({ "type": "array", "items": { "type": "string", "maxLength": config.max_input_chars },
            "minItems": 1, "maxItems": config.max_documents });
        let errors = json!({
            "400": error_response("invalid_request: the message names the field"),
            "413": error_response("too many documents, or a text too long"),
        });
        json!({
            "paths": {
                "/rerank": { "post": {
                    "summary": "TEI's /rerank",
                    "description": "Each text's relevance to the query by the cross-encoder, highest first.",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["query", "texts"],
                        "properties": {
                            "query": { "type": "string" },
                            "texts": texts,
                            "raw_scores": { "type": "boolean", "default": false },
                            "return_text": { "type": "boolean", "default": false },
                            "truncate": { "type": "boolean", "default": true },
                            "truncation_direction": { "enum": ["right", "Right"] },
                        },
                    } } } },
                    "responses": {
                        "200": { "description": "Ranked texts", "content": { "application/json": { "schema": {
                            "type": "array", "items": { "type": "object", "required": ["index", "score"], "properties": {
                                "index": { "type": "integer" }, "score": { "type": "number" }, "text": { "type": "string" },
                            } },
                        } } } },
                        "400": errors["400"], "413": errors["413"],
                    },
                } },
                "/v2/rerank": { "post": {
                    "summary": "Cohere's v2 rerank",
                    "description": "For the cohere SDK's ClientV2(base_url=<route>).rerank: documents ranked by relevance, \
                        highest first, cut to top_n.",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["query", "documents"],
                        "properties": {
                            "model": { "type": "string", "description": "any: the tenant's model answers" },
                            "query": { "type": "string" },
                            "documents": texts,
                            "top_n": { "type": "integer", "minimum": 1 },
                            "max_tokens_per_doc": { "type": "integer", "minimum": 1 },
                            "priority": { "type": "integer" },
                        },
                    } } } },
                    "responses": {
                        "200": { "description": "Ranked documents", "content": { "application/json": { "schema": {
                            "type": "object", "required": ["results"], "properties": {
                                "id": { "type": "string", "description": "the request's X-Request-Id, when it has one" },
                                "results": { "type": "array", "items": { "type": "object",
                                    "required": ["index", "relevance_score"], "properties": {
                                        "index": { "type": "integer" }, "relevance_score": { "type": "number" },
                                    } } },
                                "meta": { "type": "object" },
                            },
                        } } } },
                        "400": errors["400"], "413": errors["413"],
                    },
                } },
            },
            "components": { "schemas": { "Error": error_schema() } },
        })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(Rerank);
