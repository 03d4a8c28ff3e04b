//! `POST /api/v1/predict/sentences`: classify sentences with the route's model.
//!
//! Takes `{"sentences": [...]}` or a bare JSON array of strings; answers with the softmax
//! probabilities per sentence (input order), the labels, the top label per sentence and timing
//! metadata. See the README for the full response and the errors.

use std::time::Instant;

use batchbox_sdk::{
    Plugin, Request, Response, Settings, Task, TextList, argmax, host, json, ms, require_method, round_ms, softmax,
};
use serde::{Deserialize, Serialize};

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Deserialize)]
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

    let tokenize_started = Instant::now();
    let encodings = host::tokenize(&sentences).map_err(|e| e.into_response())?;
    let tokenize_ms = ms(tokenize_started);
    let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.ids.clone()).collect();
    let (inference, infer_ms) = if ids.is_empty() {
        (None, 0.0) // nothing to compute: no call, no model time
    } else {
        let infer_started = Instant::now();
        let inference = host::infer(&ids).map_err(|e| e.into_response())?;
        (Some(inference), ms(infer_started))
    };

    let outputs = inference.as_ref().map(|i| i.outputs.as_slice()).unwrap_or_default();
    let probabilities: Vec<Vec<f32>> = outputs.iter().map(|t| softmax(&t.data)).collect();
    let predictions = probabilities.iter().map(|p| info.labels[argmax(p)].clone()).collect();
    let (queue_ms, compute_ms, forward_passes) = inference
        .as_ref()
        .map(|i| (i.queue_us as f64 / 1e3, i.compute_us as f64 / 1e3, i.forward_passes))
        .unwrap_or_default();
    let total_ms = ms(started);
    let plugin_ms = (total_ms - tokenize_ms - infer_ms).max(0.0) + (infer_ms - queue_ms - compute_ms).max(0.0);
    let metadata = Metadata {
        processing_time_ms: round_ms(total_ms),
        total_words: sentences.iter().map(|s| s.split_whitespace().count()).sum(),
        total_tokens: ids.iter().map(Vec::len).sum(),
        num_sentences: sentences.len(),
        model_version: info.version,
        truncated: encodings.iter().enumerate().filter(|(_, e)| e.truncated).map(|(i, _)| i).collect(),
        forward_passes,
        batch_ids: inference.as_ref().map(|i| i.batch_ids.clone()).unwrap_or_default(),
        breakdown_ms: Breakdown {
            tokenize: round_ms(tokenize_ms),
            queue: round_ms(queue_ms),
            inference: round_ms(compute_ms),
            // Everything that was not the host's work: parsing, softmax, serialising, and the
            // crossing of the boundary (infer's wall time beyond its queue and compute).
            plugin: round_ms(plugin_ms),
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

batchbox_sdk::export_plugin!(SentenceClassifier);
