//! `POST /api/v1/predict/sentences`: classify sentences with the route's model.
//!
//! Takes `{"sentences": [...]}` or a bare JSON array of strings; answers with the scores per
//! sentence (input order: softmax probabilities for a single-label model, as the seed did), the
//! labels, the prediction per sentence and timing metadata. The object form also takes the score
//! options of `batchbox_sdk::scores` (`function_to_apply`, `top_k`, `raw_scores`, `threshold`).
//! See the README for the full response and the errors.

use std::time::Instant;

use batchbox_sdk::openapi::{error_response, error_schema, prediction_schema, schema, score_options, text_list_with};
use batchbox_sdk::scores::{LabelScore, Predicted, SCORE_FIELDS, ScoreOptions};
use batchbox_sdk::{
    Describe, Plugin, Request, Response, Settings, Task, TextList, host, json, ms, require_method, round_ms,
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
    /// Each sentence's scores, in label order: named for the seed's softmax, whatever the function.
    probabilities: Vec<Vec<f32>>,
    labels: Vec<String>,
    predictions: Vec<Predicted>,
    /// Asked for with `top_k`: each sentence's labels and scores, highest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    scores: Option<Vec<Vec<LabelScore>>>,
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
    let (sentences, fields) = sentences(&request.body, config)?;
    let info = host::model();
    let options = ScoreOptions::parse(&fields, &host::model_scoring(), info.labels.len())?;

    // One host call: the token ids never cross into the plugin and back.
    let computed = host::infer_texts(&sentences).map_err(|e| e.into_response())?;
    let inference = &computed.inference;
    let probabilities: Vec<Vec<f32>> = inference.outputs.iter().map(|t| options.scores(&t.data)).collect();
    let predictions = probabilities.iter().map(|p| options.predicted(p, &info.labels)).collect();
    let scores = options.top_k.map(|_| probabilities.iter().filter_map(|p| options.top(p, &info.labels)).collect());
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
    Ok(json(200, &Prediction { probabilities, labels: info.labels, predictions, scores, metadata }))
}

/// The sentences of `{"sentences": [...], <score options>}` or of a bare array, checked one by
/// one, and the body's score options.
fn sentences(
    body: &[u8],
    config: &Config,
) -> Result<(Vec<String>, serde_json::Map<String, serde_json::Value>), Response> {
    TextList {
        field: "sentences",
        item: "sentence",
        max_items: config.max_sentences,
        max_chars: config.max_sentence_chars,
    }
    .parse_with(body, &SCORE_FIELDS)
}

impl Describe for SentenceClassifier {
    /// The route, its body with the configured limits, and its answers.
    fn describe() -> String {
        let config = SETTINGS.get().ok().copied().unwrap_or_default();
        json!({
            "paths": { "/": { "post": {
                "summary": "Classify sentences",
                "description": "The scores of each sentence, in input order (softmax probabilities for a \
                    single-label model; a sigmoid per label for a multi-label or one-label model; the logits \
                    for regression; or the function_to_apply asked for), its prediction, and timing \
                    metadata. An empty list gives empty results.",
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
                "Sentences": text_list_with("sentences", config.max_sentences, config.max_sentence_chars, score_options()),
                "Prediction": prediction_schema(),
                "Error": error_schema(),
            } },
        })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(SentenceClassifier);
