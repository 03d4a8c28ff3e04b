//! `POST /api/v1/predict/sentences`: classify sentences with the route's model.
//!
//! Takes `{"sentences": [...]}` or a bare JSON array of strings; answers with the softmax
//! probabilities per sentence (input order), the labels, the top label per sentence and timing
//! metadata. See the README for the full response and the errors.

use std::time::Instant;

use batchbox_sdk::openapi::{error_response, error_schema, schema, text_list};
use batchbox_sdk::{
    Describe, Plugin, Request, Response, Settings, Task, TextList, argmax, host, json, ms, require_method, round_ms,
    softmax,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    /// More sentences than this in one request: 413.
    max_sentences: usize,
    /// A sentence longer than this many characters: 413 (the model would truncate it anyway).
    max_sentence_chars: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_sentences: 1000, max_sentence_chars: 10_000 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

struct SentenceClassifier;

impl Plugin for SentenceClassifier {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::SequenceClassification)
    }

    fn handle(request: Request) -> Response {
        classify(&request).unwrap_or_else(|response| response)
    }
}

#[derive(Serialize)]
struct Prediction {
    probabilities: Vec<Vec<f32>>,
    labels: Vec<String>,
    predictions: Vec<String>,
    metadata: Metadata,
}

#[derive(Serialize)]
struct Metadata {
    processing_time_ms: f64,
    total_words: usize,
    total_tokens: usize,
    num_sentences: usize,
    model_version: String,
    /// Indices of sentences the model only saw the beginning of.
    truncated: Vec<usize>,
    forward_passes: u32,
    /// The forward passes that computed this request (shared with concurrent requests).
    batch_ids: Vec<u64>,
    breakdown_ms: Breakdown,
}

#[derive(Serialize)]
struct Breakdown {
    tokenize: f64,
    queue: f64,
    inference: f64,
    plugin: f64,
}

fn classify(request: &Request) -> Result<Response, Response> {
    let started = Instant::now();
    require_method(request, "POST")?;
    let config = SETTINGS.get()?;
    let sentences = sentences(&request.body, config)?;
    let info = host::model();

    // One host call: the token ids never cross into the plugin and back.
    let computed = host::infer_texts(&sentences).map_err(|e| e.into_response())?;
    let inference = &computed.inference;
    let probabilities: Vec<Vec<f32>> = inference.outputs.iter().map(|t| softmax(&t.data)).collect();
    let predictions = probabilities.iter().map(|p| info.labels[argmax(p)].clone()).collect();
    let (tokenize_ms, queue_ms, compute_ms) =
        (computed.tokenize_us as f64 / 1e3, inference.queue_us as f64 / 1e3, inference.compute_us as f64 / 1e3);
    let total_ms = ms(started);
    let metadata = Metadata {
        processing_time_ms: round_ms(total_ms),
        total_words: sentences.iter().map(|s| s.split_whitespace().count()).sum(),
        total_tokens: computed.tokens.iter().map(|&n| n as usize).sum(),
        num_sentences: sentences.len(),
        model_version: info.version,
        truncated: computed.truncated.iter().map(|&i| i as usize).collect(),
        forward_passes: inference.forward_passes,
        batch_ids: inference.batch_ids.clone(),
        breakdown_ms: Breakdown {
            tokenize: round_ms(tokenize_ms),
            queue: round_ms(queue_ms),
            inference: round_ms(compute_ms),
            // Everything that was not the host's work: parsing, softmax, serialising, and the
            // crossing of the boundary.
            plugin: round_ms((total_ms - tokenize_ms - queue_ms - compute_ms).max(0.0)),
        },
    };
    Ok(json(200, &Prediction { probabilities, labels: info.labels, predictions, metadata }))
}

/// The sentences of `{"sentences": [...]}` or of a bare array, checked one by one.
fn sentences(body: &[u8], config: &Config) -> Result<Vec<String>, Response> {
    TextList {
        field: "sentences",
        item: "sentence",
        max_items: config.max_sentences,
        max_chars: config.max_sentence_chars,
    }
    .parse(body)
}

impl Describe for SentenceClassifier {
    /// The route, its body with the configured limits, and its answers.
    fn describe() -> String {
        let config = SETTINGS.get().ok().copied().unwrap_or_default();
        let strings = json!({ "type": "array", "items": { "type": "string" } });
        let number = json!({ "type": "number" });
        json!({
            "paths": { "/": { "post": {
                "summary": "Classify sentences",
                "description": "One row of probabilities (softmax over the labels) per sentence, in input \
                    order, the top label of each, and timing metadata. An empty list gives empty results.",
                "requestBody": { "required": true, "content": { "application/json": { "schema": schema("Sentences") } } },
                "responses": {
                    "200": { "description": "The predictions", "content": { "application/json": { "schema": schema("Prediction") } } },
                    "400": error_response("invalid_json or invalid_request: the message names the item"),
                    "405": error_response("method_not_allowed: use POST"),
                    "413": error_response("too_many_sentences, sentence_too_long, or too_large for the model's queue"),
                    "429": error_response("quota_exceeded: `quota` names the tenant's quota"),
                    "503": error_response("overloaded: the model's queue is full; retry after Retry-After"),
                    "504": error_response("timed_out: still waiting for the model when the request's time ran out"),
                },
            } } },
            "components": { "schemas": {
                "Sentences": text_list("sentences", config.max_sentences, config.max_sentence_chars),
                "Prediction": {
                    "type": "object",
                    "required": ["probabilities", "labels", "predictions", "metadata"],
                    "properties": {
                        "probabilities": { "type": "array", "items": { "type": "array", "items": number } },
                        "labels": strings,
                        "predictions": strings,
                        "metadata": {
                            "type": "object",
                            "properties": {
                                "processing_time_ms": number,
                                "total_words": { "type": "integer" },
                                "total_tokens": { "type": "integer" },
                                "num_sentences": { "type": "integer" },
                                "model_version": { "type": "string" },
                                "truncated": { "type": "array", "items": { "type": "integer" } },
                                "forward_passes": { "type": "integer" },
                                "batch_ids": { "type": "array", "items": { "type": "integer" } },
                                "breakdown_ms": { "type": "object", "additionalProperties": number },
                            },
                        },
                    },
                },
                "Error": error_schema(),
            } },
        })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(SentenceClassifier);
