//! Zero-shot classification with an NLI model, as transformers' `zero-shot-classification`
//! pipeline does it and the Hugging Face Inference API serves it, so that
//! `huggingface_hub.InferenceClient(base_url=<route>).zero_shot_classification(...)` works unchanged.
//!
//! `POST <route>` with `{"inputs": "text" | ["text", ...], "parameters": {"candidate_labels":
//! ["a", "b"] | "a, b", "hypothesis_template": "This example is {}.", "multi_label": false}}`.
//! Each text is paired with the template filled with each label (the hypothesis), and every pair
//! of the request goes to the host in one `infer-pairs` call, cut `only_first` (the text, never the
//! hypothesis), so they share batches with each other and with everyone's work. The answer is, for
//! one text, the HF API's list of `{"label", "score"}`, highest first; for a list, one such list per
//! text. Headers say what it cost: `x-batchbox-pairs`, `x-batchbox-forward-passes`.
//!
//! Scores, from each pair's NLI logits, as the pipeline computes them:
//! - the entailment logit is the first label (in the model's order) whose name starts with
//!   "entail", ignoring case, or the last label if none does; contradiction is the first label,
//!   or the last when entailment is the first;
//! - `multi_label` (or a single candidate): each label on its own, the softmax of (contradiction,
//!   entailment), so a text may fit several;
//! - otherwise: a softmax of the entailment logits across the candidate labels.
//!
//! Limits (the plugin's `config`): `max_inputs` texts (128), `max_input_chars` (10,000) and
//! `max_candidate_labels` (32) per request; a request also stays within its tenant's quotas, which
//! count each pair as one sequence. Errors are the host's shape and name the field.

use batchbox_sdk::openapi::{error_response, error_schema, schema};
use batchbox_sdk::{
    Describe, Plugin, Request, Response, Settings, Task, Truncation, check_count, check_text, error, host, json,
    parse_json, require_method,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The plugin's own `config` in shared_config.yaml.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    max_inputs: usize,
    max_input_chars: usize,
    max_candidate_labels: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_inputs: 128, max_input_chars: 10_000, max_candidate_labels: 32 }
    }
}

static SETTINGS: Settings<Config> = Settings::new();

/// The pipeline's default hypothesis.
const DEFAULT_TEMPLATE: &str = "This example is {}.";

struct ZeroShot;

impl Plugin for ZeroShot {
    fn configure(config: String) -> Result<(), String> {
        SETTINGS.configure(&config, Task::SequenceClassification)?;
        let info = host::model();
        if info.labels.len() < 2 {
            return Err(format!(
                "model {} has {} label; zero-shot classification needs an NLI model (entailment, contradiction, ...)",
                info.name,
                info.labels.len()
            ));
        }
        Ok(())
    }

    fn handle(request: Request) -> Response {
        classify(&request).unwrap_or_else(|response| response)
    }
}

fn bad(message: impl std::fmt::Display) -> Response {
    error(400, "invalid_request", message)
}

/// One label's score, as the HF API answers it.
#[derive(Debug, Serialize)]
struct LabelScore<'a> {
    label: &'a str,
    score: f64,
}

/// What a request asks: its texts, and how to read the labels.
struct Asked {
    texts: Vec<String>,
    /// The body's `inputs` was one string: answer one list, not a list of lists.
    single: bool,
    labels: Vec<String>,
    template: String,
    multi_label: bool,
}

fn parse(request: &Request, config: &Config) -> Result<Asked, Response> {
    require_method(request, "POST")?;
    let mut body = match parse_json::<Value>(&request.body)? {
        Value::Object(body) => body,
        _ => return Err(bad("expected a JSON object with `inputs` and `parameters`")),
    };
    if let Some(unknown) = body.keys().find(|key| !["inputs", "parameters"].contains(&key.as_str())) {
        return Err(bad(format!("unknown field `{unknown}`; expected inputs, parameters")));
    }
    let (texts, single) = match body.remove("inputs") {
        None => return Err(bad("missing field `inputs`")),
        Some(Value::Array(items)) => {
            check_count(items.len(), "input", config.max_inputs)?;
            if items.is_empty() {
                return Err(bad("`inputs` is empty"));
            }
            let texts = items
                .iter()
                .enumerate()
                .map(|(i, item)| check_text(item, &format!("inputs[{i}]"), "input", config.max_input_chars));
            (texts.collect::<Result<Vec<_>, _>>()?, false)
        }
        Some(one) => (vec![check_text(&one, "inputs", "input", config.max_input_chars)?], true),
    };
    let mut parameters = match body.remove("parameters") {
        Some(Value::Object(parameters)) => parameters,
        None | Some(Value::Null) => return Err(bad("missing field `parameters.candidate_labels`")),
        Some(_) => return Err(bad("`parameters` must be an object")),
    };
    let known = ["candidate_labels", "hypothesis_template", "multi_label"];
    if let Some(unknown) = parameters.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(bad(format!("unknown parameter `{unknown}`; expected {}", known.join(", "))));
    }
    let labels = candidate_labels(parameters.remove("candidate_labels"), config)?;
    let template = match parameters.remove("hypothesis_template") {
        None | Some(Value::Null) => DEFAULT_TEMPLATE.to_owned(),
        Some(Value::String(template)) => checked_template(template)?,
        Some(_) => return Err(bad("`parameters.hypothesis_template` must be a string")),
    };
    let multi_label = match parameters.remove("multi_label") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(multi)) => multi,
        Some(_) => return Err(bad("`parameters.multi_label` must be a boolean")),
    };
    Ok(Asked { texts, single, labels, template, multi_label })
}

/// The candidate labels: a list of strings, or one string of comma-separated labels (as the
/// pipeline takes them); at least one, at most `max_candidate_labels`.
fn candidate_labels(value: Option<Value>, config: &Config) -> Result<Vec<String>, Response> {
    let at = "parameters.candidate_labels";
    let labels: Vec<String> = match value {
        None | Some(Value::Null) => return Err(bad(format!("missing field `{at}`"))),
        Some(Value::String(labels)) => {
            labels.split(',').map(str::trim).filter(|label| !label.is_empty()).map(str::to_owned).collect()
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| check_text(item, &format!("{at}[{i}]"), "candidate_label", config.max_input_chars))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad(format!("`{at}` must be a list of strings or a comma-separated string"))),
    };
    if labels.is_empty() {
        return Err(bad(format!("`{at}` has no labels")));
    }
    check_count(labels.len(), "candidate_label", config.max_candidate_labels)?;
    Ok(labels)
}

/// A template with exactly one `{}`, where each label goes, and no other brace: what Python's
/// `str.format` would fill with one label the same way.
fn checked_template(template: String) -> Result<String, Response> {
    let braces = template.matches(['{', '}']).count();
    if template.matches("{}").count() != 1 || braces != 2 {
        return Err(bad(format!(
            "`parameters.hypothesis_template` must hold one `{{}}` where the label goes (and no other brace): {template:?}"
        )));
    }
    Ok(template)
}

/// Which logits are entailment and contradiction, by the pipeline's rule (see the module docs).
fn entailment_and_contradiction(labels: &[String]) -> (usize, usize) {
    let last = labels.len() - 1;
    let entailment = labels.iter().position(|label| label.to_lowercase().starts_with("entail")).unwrap_or(last);
    (entailment, if entailment == 0 { last } else { 0 })
}

/// The scores of one text's candidate labels, from the NLI logits of its pairs (one per label).
fn scores(logits: &[&[f32]], (entail, contra): (usize, usize), multi_label: bool) -> Vec<f64> {
    if multi_label || logits.len() == 1 {
        // softmax([c, e])[1] = 1 / (1 + exp(c - e))
        logits.iter().map(|row| 1.0 / (1.0 + (f64::from(row[contra]) - f64::from(row[entail])).exp())).collect()
    } else {
        let entailment: Vec<f64> = logits.iter().map(|row| f64::from(row[entail])).collect();
        let max = entailment.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = entailment.iter().map(|e| (e - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }
}

fn classify(request: &Request) -> Result<Response, Response> {
    let config = SETTINGS.get()?;
    let asked = parse(request, config)?;
    let info = host::model();
    let hypotheses: Vec<String> = asked.labels.iter().map(|label| asked.template.replacen("{}", label, 1)).collect();
    let pairs: Vec<(String, String)> = asked
        .texts
        .iter()
        .flat_map(|text| hypotheses.iter().map(move |hypothesis| (text.clone(), hypothesis.clone())))
        .collect();
    let computed = host::infer_pairs(&pairs, Truncation::OnlyFirst).map_err(|e| e.into_response())?;
    let indices = entailment_and_contradiction(&info.labels);
    let outputs: Vec<&[f32]> = computed.inference.outputs.iter().map(|t| t.data.as_slice()).collect();
    let answers: Vec<Vec<LabelScore>> = outputs
        .chunks(asked.labels.len())
        .map(|rows| {
            let mut scored: Vec<LabelScore> = asked
                .labels
                .iter()
                .zip(scores(rows, indices, asked.multi_label))
                .map(|(label, score)| LabelScore { label, score })
                .collect();
            scored.sort_by(|a, b| b.score.total_cmp(&a.score));
            scored
        })
        .collect();
    let mut response = if asked.single { json(200, &answers[0]) } else { json(200, &answers) };
    response.headers.push(("x-batchbox-pairs".into(), pairs.len().to_string()));
    response.headers.push(("x-batchbox-forward-passes".into(), computed.inference.forward_passes.to_string()));
    Ok(response)
}

impl Describe for ZeroShot {
    fn describe() -> String {
        let config = SETTINGS.get().copied().unwrap_or_default();
        let label_scores = json!({ "type": "array", "items": {
            "type": "object",
            "required": ["label", "score"],
            "properties": { "label": { "type": "string" }, "score": { "type": "number" } },
        } });
        let mut parameters = Map::new();
        parameters.insert(
            "candidate_labels".into(),
            json!({ "oneOf": [
                { "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": config.max_candidate_labels },
                { "type": "string", "description": "comma-separated labels" },
            ] }),
        );
        parameters.insert(
            "hypothesis_template".into(),
            json!({ "type": "string", "default": DEFAULT_TEMPLATE, "description": "one {} where the label goes" }),
        );
        parameters.insert("multi_label".into(), json!({ "type": "boolean", "default": false }));
        json!({
            "paths": { "/": { "post": {
                "summary": "Zero-shot classification with an NLI model",
                "description": "As transformers' zero-shot-classification pipeline and the Hugging Face Inference API \
                    (huggingface_hub's InferenceClient.zero_shot_classification): each text is paired with the \
                    hypothesis of each candidate label, all pairs in one batched call.",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": ["inputs", "parameters"],
                    "properties": {
                        "inputs": { "oneOf": [
                            { "type": "string", "maxLength": config.max_input_chars },
                            { "type": "array", "items": { "type": "string", "maxLength": config.max_input_chars },
                              "minItems": 1, "maxItems": config.max_inputs },
                        ] },
                        "parameters": { "type": "object", "required": ["candidate_labels"], "properties": parameters },
                    },
                } } } },
                "responses": {
                    "200": { "description": "For one text, its labels and scores, highest first; for a list, one such list per text",
                        "content": { "application/json": { "schema": { "oneOf": [
                            label_scores, { "type": "array", "items": label_scores },
                        ] } } } },
                    "400": error_response("invalid_request: the message names the field"),
                    "413": error_response("too many inputs or candidate labels, or an input too long"),
                    "429": { "description": "a tenant quota (pairs count as sequences)", "content": { "application/json": {
                        "schema": schema("Error") } } },
                },
            } } },
            "components": { "schemas": { "Error": error_schema() } },
        })
        .to_string()
    }
}

batchbox_sdk::export_plugin!(ZeroShot);
