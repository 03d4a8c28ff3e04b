//! The Hugging Face and TEI text-classification APIs, so that the clients people already have
//! work unchanged against a tenant's route (`<route>` is the URL they are given):
//!
//! - `POST <route>`: the Hugging Face Inference API's text classification, which
//!   `huggingface_hub.InferenceClient.text_classification` and `@huggingface/inference`'s
//!   `textClassification` send: `{"inputs": "text" | ["text", ...], "parameters": {"top_k",
//!   "function_to_apply"}}`, answered with one list per input of `{"label", "score"}`, highest
//!   first, cut to `top_k` (every label when it is absent or null). Both clients read the nested
//!   list: TEI's flat one breaks the JavaScript client and loses labels in the Python one.
//! - `POST <route>/predict`: TEI's `/predict`: `{"inputs": "text" | [text, ...] | [[text], ...],
//!   "raw_scores", "truncate", "truncation_direction"}`, answered with a flat list for one text and
//!   a list per text for a batch.
//! - `GET <route>/info` and `GET <route>/health` are the host's (see the README), for every tenant.
//!
//! Any path that does not end in `/predict` is the first (so a route should not end in `/predict`).
//!
//! Scores follow the model's checkpoint (softmax, a sigmoid per label for multi-label and
//! one-label heads, none for regression) unless the request asks for another function, through
//! `batchbox_sdk::scores`, as the sentence classifier's do. `/predict` takes TEI's pairs (`["a",
//! "b"]`, or a batch of them, mixed with single texts as TEI allows) for a model that takes pairs
//! (a cross-encoder, an NLI head), cut `longest_first` as TEI does; the host refuses them, saying
//! so, for a model that does not. Errors are TEI's shape, `{"error": "...",
//! "error_type": "..."}`, with batchbox's status codes; the host's own errors (401, 403, 429 for
//! a tenant's quotas, 503) keep the host's shape.

use batchbox_sdk::openapi::error_response;
use batchbox_sdk::scores::{LabelScore, SCORE_FIELDS, ScoreOptions};
use batchbox_sdk::{
    Describe, Plugin, Request, Response, Settings, Task, TextInference, Truncation, check_count, check_text, host,
    json, parse_json, require_method,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// More inputs than this in one request: 413.
    max_inputs: usize,
    /// An input longer than this many characters: 413.
    max_input_chars: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_inputs: 1000, max_input_chars: 10_000 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

struct HfCompat;

impl Plugin for HfCompat {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::SequenceClassification)
    }

    fn handle(request: Request) -> Response {
        // The path is the whole request path: the route itself, or TEI's `/predict` below it.
        let answer = match request.path.trim_end_matches('/').ends_with("/predict") {
            true => predict(&request),
            false => text_classification(&request),
        };
        answer.unwrap_or_else(|response| response)
    }
}

/// An error in TEI's shape.
fn tei_error(status: u16, kind: &str, message: impl std::fmt::Display) -> Response {
    json(status, &json!({ "error": message.to_string(), "error_type": kind }))
}

/// An SDK response in the host's error shape, re-said in TEI's (a success passes through).
fn as_tei(response: Response) -> Response {
    if response.status < 400 {
        return response;
    }
    let body: Value = serde_json::from_slice(&response.body).unwrap_or_default();
    let error = &body["error"];
    let (message, code) = (error["message"].as_str().unwrap_or("error"), error["code"].as_str().unwrap_or("error"));
    let mut answer = tei_error(response.status, code, message);
    answer.headers.extend(response.headers.into_iter().filter(|(name, _)| name != "content-type"));
    answer
}

fn bad(message: impl std::fmt::Display) -> Response {
    tei_error(400, "validation", message)
}

/// The body as a JSON object whose keys are all among `known`.
fn object(request: &Request, known: &[&str]) -> Result<Map<String, Value>, Response> {
    require_method(request, "POST").map_err(as_tei)?;
    match parse_json::<Value>(&request.body).map_err(as_tei)? {
        Value::Object(fields) => match fields.keys().find(|key| !known.contains(&key.as_str())) {
            Some(unknown) => Err(bad(format!("unknown field `{unknown}`; expected {}", known.join(", ")))),
            None => Ok(fields),
        },
        _ => Err(bad("expected a JSON object with `inputs`")),
    }
}

/// What one input is: a text, or a sentence pair.
enum Input {
    One(String),
    Pair(String, String),
}

/// Whether `value` is TEI's pair: a list of exactly two texts.
fn is_pair(value: &Value) -> bool {
    matches!(value, Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string))
}

/// One text, checked against the configured limits (the SDK's `check_text`, in TEI's shape); `at`
/// names it in errors.
fn text(value: &Value, at: &str, config: &Config) -> Result<String, Response> {
    if is_pair(value) {
        return Err(bad(format!(
            "{at} is a pair of texts; this route takes single texts (TEI's /predict takes pairs)"
        )));
    }
    check_text(value, at, "input", config.max_input_chars).map_err(as_tei)
}

/// One text or one pair (any two-item list, each member checked as a text).
fn input(value: &Value, at: &str, config: &Config) -> Result<Input, Response> {
    match value {
        Value::Array(pair) if pair.len() == 2 => {
            Ok(Input::Pair(text(&pair[0], &format!("{at}[0]"), config)?, text(&pair[1], &format!("{at}[1]"), config)?))
        }
        other => text(other, at, config).map(Input::One),
    }
}

/// The model's outputs for `inputs`, in their order, and the indices of those it truncated: the
/// texts go in one `infer-texts` call and the pairs in one `infer-pairs` call.
fn computed(inputs: Vec<Input>) -> Result<(Vec<Vec<f32>>, Vec<u32>), Response> {
    let (mut texts, mut pairs) = (Vec::new(), Vec::new());
    // Where each input's answer is: (is a pair, its index among its kind).
    let mut at = Vec::with_capacity(inputs.len());
    for item in inputs {
        match item {
            Input::One(text) => {
                at.push((false, texts.len()));
                texts.push(text);
            }
            Input::Pair(first, second) => {
                at.push((true, pairs.len()));
                pairs.push((first, second));
            }
        }
    }
    let call = |result: Result<TextInference, batchbox_sdk::Error>| result.map_err(|e| as_tei(e.into_response()));
    let single = if texts.is_empty() { None } else { Some(call(host::infer_texts(&texts))?) };
    let paired = if pairs.is_empty() { None } else { Some(call(host::infer_pairs(&pairs, Truncation::LongestFirst))?) };
    let (mut outputs, mut truncated) = (Vec::with_capacity(at.len()), Vec::new());
    for (i, &(pair, j)) in (0u32..).zip(&at) {
        let answer = if pair { paired.as_ref() } else { single.as_ref() }.expect("called for every kind present");
        outputs.push(answer.inference.outputs[j].data.clone());
        if answer.truncated.contains(&(j as u32)) {
            truncated.push(i);
        }
    }
    Ok((outputs, truncated))
}

fn count(n: usize, config: &Config) -> Result<(), Response> {
    check_count(n, "input", config.max_inputs).map_err(as_tei)
}

/// The inputs' scores, each row as `{label, score}` highest first and cut to the options' `top_k`
/// (every label when the options have none), and the indices of the inputs the model truncated.
fn scored(inputs: Vec<Input>, fields: &Map<String, Value>) -> Result<(Vec<Vec<LabelScore>>, Vec<u32>), Response> {
    let info = host::model();
    let mut options = ScoreOptions::parse(fields, &host::model_scoring(), info.labels.len()).map_err(as_tei)?;
    options.top_k.get_or_insert(None);
    let (outputs, truncated) = computed(inputs)?;
    let rows =
        outputs.iter().map(|logits| options.top(&options.scores(logits), &info.labels).unwrap_or_default()).collect();
    Ok((rows, truncated))
}

/// `POST <route>`: the Hugging Face text-classification shape.
fn text_classification(request: &Request) -> Result<Response, Response> {
    let config = SETTINGS.get()?;
    let mut fields = object(request, &["inputs", "parameters", "options"])?;
    let texts = match fields.remove("inputs") {
        Some(Value::Array(items)) => {
            count(items.len(), config)?;
            items.iter().enumerate().map(|(i, item)| text(item, &format!("inputs[{i}]"), config)).collect()
        }
        Some(single) => text(&single, "inputs", config).map(|t| vec![t]),
        None => Err(bad("missing field `inputs`")),
    }?;
    let parameters = match fields.remove("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(parameters)) => parameters,
        Some(_) => return Err(bad("`parameters` must be an object")),
    };
    if let Some(unknown) = parameters.keys().find(|key| !["top_k", "function_to_apply"].contains(&key.as_str())) {
        return Err(bad(format!("unknown parameter `{unknown}`; expected top_k, function_to_apply")));
    }
    let (rows, _) = scored(texts.into_iter().map(Input::One).collect(), &parameters)?;
    Ok(json(200, &rows))
}

/// `POST <route>/predict`: TEI's shape.
fn predict(request: &Request) -> Result<Response, Response> {
    let config = SETTINGS.get()?;
    let mut fields = object(request, &["inputs", "raw_scores", "truncate", "truncation_direction"])?;
    let inputs = fields.remove("inputs").ok_or_else(|| bad("missing field `inputs`"))?;
    let (inputs, batch) = match &inputs {
        Value::Array(items) if !is_pair(&inputs) => {
            count(items.len(), config)?;
            let inputs = items.iter().enumerate().map(|(i, item)| match item {
                // TEI's batch item: a text, a one-text list, or a pair.
                Value::Array(one) if one.len() == 1 => input(&one[0], &format!("inputs[{i}][0]"), config),
                other => input(other, &format!("inputs[{i}]"), config),
            });
            (inputs.collect::<Result<Vec<_>, _>>()?, true)
        }
        single => (vec![input(single, "inputs", config)?], false),
    };
    match fields.get("truncation_direction").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
        None | Some("right") => {}
        Some("left") => {
            return Err(bad("truncation_direction `left` is not supported: the model keeps a text's beginning"));
        }
        Some(other) => return Err(bad(format!("truncation_direction must be `right` or `left`, not `{other}`"))),
    }
    let truncate = match fields.get("truncate") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(truncate)) => *truncate,
        Some(_) => return Err(bad("`truncate` must be a boolean")),
    };
    let options: Map<String, Value> =
        fields.into_iter().filter(|(key, _)| SCORE_FIELDS.contains(&key.as_str())).collect();
    let (mut rows, truncated) = scored(inputs, &options)?;
    if let (false, Some(&first)) = (truncate, truncated.first()) {
        let max = host::model().max_length;
        return Err(tei_error(
            413,
            "validation",
            format!("inputs[{first}] is longer than the model's {max} tokens; send `truncate: true` to cut it"),
        ));
    }
    if batch { Ok(json(200, &rows)) } else { Ok(json(200, &rows.swap_remove(0))) }
}

impl Describe for HfCompat {
    fn describe() -> String {
        let label_scores = json!({ "type": "array", "items": {
            "type": "object",
            "required": ["label", "score"],
            "properties": { "label": { "type": "string" }, "score": { "type": "number" } },
        } });
        let text_or_texts =
            json!({ "oneOf": [{ "type": "string" }, { "type": "array", "items": { "type": "string" } }] });
        let pair = json!({ "type": "array", "items": { "type": "string" }, "minItems": 2, "maxItems": 2 });
        let tei_inputs = json!({ "oneOf": [
            { "type": "string" },
            pair,
            { "type": "array", "items": { "oneOf": [
                { "type": "string" }, pair, { "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": 1 },
            ] } },
        ] });
        let errors = json!({
            "400": error_response("validation: the message names the field"),
            "413": error_response("too many inputs, or an input too long"),
        });
        json!({
            "paths": {
                "/": { "post": {
                    "summary": "Text classification, as the Hugging Face Inference API",
                    "description": "For huggingface_hub's InferenceClient.text_classification and @huggingface/inference's \
                        textClassification: one list of {label, score} per input, highest first.",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "inputs": text_or_texts,
                            "parameters": { "type": "object", "properties": {
                                "top_k": { "type": ["integer", "null"], "minimum": 1 },
                                "function_to_apply": { "enum": ["softmax", "sigmoid", "none"] },
                            } },
                        },
                    } } } },
                    "responses": {
                        "200": { "description": "The labels and scores per input", "content": { "application/json": {
                            "schema": { "type": "array", "items": label_scores } } } },
                        "400": errors["400"], "413": errors["413"],
                    },
                } },
                "/predict": { "post": {
                    "summary": "TEI's /predict",
                    "description": "A flat list of {label, score} for one text or pair, a list per input for a batch. \
                        A pair is two texts, for a model that takes pairs (a cross-encoder, an NLI head).",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "inputs": tei_inputs,
                            "raw_scores": { "type": "boolean" },
                            "truncate": { "type": "boolean" },
                            "truncation_direction": { "enum": ["right", "Right"] },
                        },
                    } } } },
                    "responses": {
                        "200": { "description": "The labels and scores", "content": { "application/json": {
                            "schema": { "oneOf": [label_scores, { "type": "array", "items": label_scores }] } } } },
                        "400": errors["400"], "413": errors["413"],
                    },
                } },
            },
            "components": { "schemas": { "Error": {
                "type": "object",
                "required": ["error"],
                "properties": { "error": { "type": "string" }, "error_type": { "type": "string" } },
            } } },
        })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(HfCompat);
