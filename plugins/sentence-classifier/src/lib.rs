//! `POST /api/v1/predict/sentences`: classify sentences with the route's model.
//!
//! Takes `{"sentences": [...]}` or a bare JSON array of strings; answers with the softmax
//! probabilities per sentence (input order), the labels, the top label per sentence and timing
//! metadata. See the README for the full response and the errors.

use std::sync::OnceLock;
use std::time::Instant;

use batchbox_sdk::{Plugin, Request, Response, Task, error, host, json, parse_config, parse_json, require_method};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// More sentences than this in one request: 413.
    #[serde(default = "default_max_sentences")]
    max_sentences: usize,
    /// A sentence longer than this many characters: 413 (the model would truncate it anyway).
    #[serde(default = "default_max_sentence_chars")]
    max_sentence_chars: usize,
}

fn default_max_sentences() -> usize {
    1000
}

fn default_max_sentence_chars() -> usize {
    10_000
}

static CONFIG: OnceLock<Config> = OnceLock::new();

struct SentenceClassifier;

impl Plugin for SentenceClassifier {
    fn configure(config: String) -> Result<(), String> {
        let config: Config = parse_config(&config)?;
        let info = host::model();
        if info.task != Task::SequenceClassification {
            return Err(format!("model {} is not a sequence classifier", info.name));
        }
        CONFIG.set(config).map_err(|_| "configured twice".to_string())
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
    let config = CONFIG.get().ok_or_else(|| error(500, "internal", "plugin not configured"))?;
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
        processing_time_ms: round(total_ms),
        total_words: sentences.iter().map(|s| s.split_whitespace().count()).sum(),
        total_tokens: ids.iter().map(Vec::len).sum(),
        num_sentences: sentences.len(),
        model_version: info.version,
        truncated: encodings.iter().enumerate().filter(|(_, e)| e.truncated).map(|(i, _)| i).collect(),
        forward_passes,
        batch_ids: inference.as_ref().map(|i| i.batch_ids.clone()).unwrap_or_default(),
        breakdown_ms: Breakdown {
            tokenize: round(tokenize_ms),
            queue: round(queue_ms),
            inference: round(compute_ms),
            // Everything that was not the host's work: parsing, softmax, serialising, and the
            // crossing of the boundary (infer's wall time beyond its queue and compute).
            plugin: round(plugin_ms),
        },
    };
    Ok(json(200, &Prediction { probabilities, labels: info.labels, predictions, metadata }))
}

/// The sentences of `{"sentences": [...]}` or of a bare array, checked one by one.
fn sentences(body: &[u8], config: &Config) -> Result<Vec<String>, Response> {
    let bad = |message: String| error(400, "invalid_request", message);
    let items = match parse_json::<Value>(body)? {
        Value::Array(items) => items,
        Value::Object(mut fields) => {
            let sentences = fields.remove("sentences").ok_or_else(|| bad("missing field `sentences`".into()))?;
            if let Some(unknown) = fields.keys().next() {
                return Err(bad(format!("unknown field `{unknown}`; the body is {{\"sentences\": [...]}}")));
            }
            match sentences {
                Value::Array(items) => items,
                other => return Err(bad(format!("`sentences` must be an array of strings, not {}", kind(&other)))),
            }
        }
        other => return Err(bad(format!("expected {{\"sentences\": [...]}} or an array of strings, not {}", kind(&other)))),
    };
    if items.len() > config.max_sentences {
        return Err(error(
            413,
            "too_many_sentences",
            format!("{} sentences in one request; the limit is {}", items.len(), config.max_sentences),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) if s.trim().is_empty() => Err(bad(format!("sentences[{i}] is empty"))),
            Value::String(s) if s.chars().count() > config.max_sentence_chars => Err(error(
                413,
                "sentence_too_long",
                format!("sentences[{i}] has {} characters; the limit is {}", s.chars().count(), config.max_sentence_chars),
            )),
            Value::String(s) => Ok(s),
            other => Err(bad(format!("sentences[{i}] must be a string, not {}", kind(&other)))),
        })
        .collect()
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

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|x| x / sum).collect()
}

fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Milliseconds to the microsecond: finer digits are noise.
fn round(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

batchbox_sdk::export_plugin!(SentenceClassifier);
