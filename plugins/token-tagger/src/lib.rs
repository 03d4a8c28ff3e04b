//! Labels every word of every text with a token-classification model (named entities, parts of
//! speech): `{"texts": [...]}` or a bare array of strings in; per text, its words with their
//! character spans, label and probability out, plus timing metadata. A word's label is its first
//! sub-token's prediction.

use std::time::Instant;

use batchbox_sdk::{
    Encoding, Plugin, Request, Response, Settings, Task, Tensor, TextList, argmax, host, json, ms, require_method,
    round_ms, softmax,
};
use serde::{Deserialize, Serialize};

/// The plugin's own `config`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    max_texts: usize,
    max_text_chars: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_texts: 256, max_text_chars: 10_000 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

struct TokenTagger;

impl Plugin for TokenTagger {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::TokenClassification)
    }

    fn handle(request: Request) -> Response {
        tag(&request).unwrap_or_else(|response| response)
    }
}

#[derive(Serialize)]
struct Tagged {
    labels: Vec<String>,
    /// Per text, its words in order.
    results: Vec<Vec<Word>>,
    metadata: Metadata,
}

#[derive(Serialize)]
struct Word {
    word: String,
    /// Character offsets of the word in its text.
    start: u32,
    end: u32,
    label: String,
    score: f32,
}

#[derive(Serialize)]
struct Metadata {
    processing_time_ms: f64,
    num_texts: usize,
    total_tokens: usize,
    model_version: String,
    /// Indices of texts the model only saw the beginning of.
    truncated: Vec<usize>,
    forward_passes: u32,
}

fn tag(request: &Request) -> Result<Response, Response> {
    let started = Instant::now();
    require_method(request, "POST")?;
    let config = SETTINGS.get()?;
    let texts =
        TextList { field: "texts", item: "text", max_items: config.max_texts, max_chars: config.max_text_chars }
            .parse(&request.body)?;
    let info = host::model();
    let encodings = host::tokenize(&texts).map_err(|e| e.into_response())?;
    let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.ids.clone()).collect();
    let inference = if ids.is_empty() { None } else { Some(host::infer(&ids).map_err(|e| e.into_response())?) };
    let outputs = inference.as_ref().map(|i| i.outputs.as_slice()).unwrap_or_default();
    let results = texts
        .iter()
        .zip(&encodings)
        .zip(outputs)
        .map(|((text, encoding), logits)| words(text, encoding, logits, &info.labels))
        .collect();
    let metadata = Metadata {
        processing_time_ms: round_ms(ms(started)),
        num_texts: texts.len(),
        total_tokens: ids.iter().map(Vec::len).sum(),
        model_version: info.version,
        truncated: encodings.iter().enumerate().filter(|(_, e)| e.truncated).map(|(i, _)| i).collect(),
        forward_passes: inference.as_ref().map_or(0, |i| i.forward_passes),
    };
    Ok(json(200, &Tagged { labels: info.labels, results, metadata }))
}

/// Groups one text's tokens into words; `logits` is `[tokens, labels]`.
fn words(text: &str, encoding: &Encoding, logits: &Tensor, labels: &[String]) -> Vec<Word> {
    let width = labels.len();
    let mut words: Vec<Word> = Vec::new();
    let mut current = None;
    for (t, word_id) in encoding.word_ids.iter().enumerate() {
        let Some(word_id) = *word_id else { continue }; // special tokens
        let (start, end) = encoding.offsets[t];
        if current == Some(word_id) {
            words.last_mut().expect("a current word").end = end;
            continue;
        }
        current = Some(word_id);
        let probabilities = softmax(&logits.data[t * width..(t + 1) * width]);
        let best = argmax(&probabilities);
        words.push(Word { word: String::new(), start, end, label: labels[best].clone(), score: probabilities[best] });
    }
    // Some tokenizers (SentencePiece) count the space before a word as part of its first token.
    let chars: Vec<char> = text.chars().collect();
    for word in &mut words {
        while word.start < word.end && chars[word.start as usize].is_whitespace() {
            word.start += 1;
        }
        word.word = chars[word.start as usize..word.end as usize].iter().collect();
    }
    words
}

impl batchbox_sdk::Describe for TokenTagger {
    fn describe() -> String {
        String::new()
    }
}

batchbox_sdk::export_plugin!(TokenTagger);
