//! A classifier's scores, as its checkpoint means them and as each request asks for them.
//!
//! The model's [`Scoring`] (from `host::model_scoring`, which the export read from the checkpoint's
//! config) says which function turns a row of logits into scores: softmax for a single-label
//! classifier, a sigmoid per label for a multi-label one or a one-label head, none for regression.
//! A request may ask for another, in the words of transformers' `text-classification` pipeline
//! (and of the Hugging Face and TEI APIs built on it), read by [`ScoreOptions::parse`]:
//!
//! | field               | value                                | default                        |
//! |---------------------|--------------------------------------|--------------------------------|
//! | `function_to_apply` | `"softmax"`, `"sigmoid"` or `"none"` | the model's                    |
//! | `raw_scores`        | `true`: the same as `"none"`         | `false`                        |
//! | `top_k`             | 1 to the label count, or `null` (all) | absent: no sorted `scores`    |
//! | `threshold`         | a number; multi-label models only    | 0.5                            |
//!
//! A multi-label model's prediction for a text is every label whose score is over the threshold,
//! highest first; any other model's is its top label. Ties keep the labels' order, as the pipeline
//! does.

use serde::Serialize;
use serde_json::{Map, Value};

pub use crate::batchbox::plugin::types::{Activation, Scoring};
use crate::{Response, error, kind};

/// The body fields [`ScoreOptions::parse`] reads.
pub const SCORE_FIELDS: [&str; 4] = ["function_to_apply", "top_k", "raw_scores", "threshold"];

/// A multi-label model's threshold when a request sets none.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// What one request asked of the scores, checked against the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOptions {
    /// The function applied to each row of logits.
    pub function: Activation,
    /// `None`: no sorted `scores` in the answer; `Some(None)`: every label, sorted;
    /// `Some(Some(k))`: the `k` highest.
    pub top_k: Option<Option<usize>>,
    /// Over this, a multi-label model's label is predicted.
    pub threshold: f32,
    /// Whether the model's prediction is a set of labels rather than one.
    pub multi_label: bool,
}

/// One label's score, for a sorted `scores` list (the pipeline's `{"label", "score"}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// A text's prediction: its top label, or, for a multi-label model, every label over the
/// threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Predicted {
    One(String),
    Many(Vec<String>),
}

impl ScoreOptions {
    /// The model's own scoring, for a request that asks nothing.
    pub fn of(scoring: &Scoring) -> Self {
        Self {
            function: scoring.activation,
            top_k: None,
            threshold: DEFAULT_THRESHOLD,
            multi_label: scoring.multi_label,
        }
    }

    /// Reads [`SCORE_FIELDS`] from a body's `fields` (other fields are the caller's) for a model
    /// with `labels` labels scored by `scoring`; a 400 `invalid_request` naming the field when one
    /// is wrong.
    pub fn parse(fields: &Map<String, Value>, scoring: &Scoring, labels: usize) -> Result<Self, Response> {
        let bad = |message: String| error(400, "invalid_request", message);
        let mut options = Self::of(scoring);
        let asked = match fields.get("function_to_apply") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(match name.as_str() {
                "softmax" => Activation::Softmax,
                "sigmoid" => Activation::Sigmoid,
                "none" => Activation::None,
                other => {
                    return Err(bad(format!(
                        "`function_to_apply` must be \"softmax\", \"sigmoid\" or \"none\", not {other:?}"
                    )));
                }
            }),
            Some(other) => return Err(bad(format!("`function_to_apply` must be a string, not {}", kind(other)))),
        };
        let raw = match fields.get("raw_scores") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(raw)) => *raw,
            Some(other) => return Err(bad(format!("`raw_scores` must be a boolean, not {}", kind(other)))),
        };
        options.function = match (raw, asked) {
            (true, Some(function)) if function != Activation::None => {
                return Err(bad(format!(
                    "`raw_scores: true` asks for the logits, but `function_to_apply` asks for {}; send one of them",
                    name(function)
                )));
            }
            (true, _) => Activation::None,
            (false, Some(function)) => function,
            (false, None) => options.function,
        };
        if let Some(top_k) = fields.get("top_k") {
            let within = |k: u64| (1..=labels as u64).contains(&k);
            options.top_k = Some(match top_k {
                Value::Null => None,
                Value::Number(n) if n.as_u64().is_some_and(within) => n.as_u64().map(|k| k as usize),
                other => {
                    let given = match other {
                        Value::Number(n) => n.to_string(),
                        other => kind(other).to_string(),
                    };
                    return Err(bad(format!(
                        "`top_k` must be a whole number from 1 to {labels} (the model's labels) or null for all, not {given}"
                    )));
                }
            });
        }
        match fields.get("threshold") {
            None | Some(Value::Null) => {}
            Some(_) if !options.multi_label => {
                return Err(bad(
                    "`threshold` applies to multi-label models only; this model predicts one label per text".into(),
                ));
            }
            Some(Value::Number(n)) => options.threshold = n.as_f64().unwrap_or(f64::NAN) as f32,
            Some(other) => return Err(bad(format!("`threshold` must be a number, not {}", kind(other)))),
        }
        Ok(options)
    }

    /// A row of logits as scores.
    pub fn scores(&self, logits: &[f32]) -> Vec<f32> {
        apply(self.function, logits)
    }

    /// The prediction from a row of scores.
    pub fn predicted(&self, scores: &[f32], labels: &[String]) -> Predicted {
        if self.multi_label {
            let over = ranked(scores).into_iter().filter(|&i| scores[i] > self.threshold);
            Predicted::Many(over.map(|i| labels[i].clone()).collect())
        } else {
            Predicted::One(labels[crate::argmax(scores)].clone())
        }
    }

    /// The sorted `scores` the request asked for with `top_k`, if it did.
    pub fn top(&self, scores: &[f32], labels: &[String]) -> Option<Vec<LabelScore>> {
        let k = self.top_k?.unwrap_or(scores.len());
        Some(
            ranked(scores)
                .into_iter()
                .take(k)
                .map(|i| LabelScore { label: labels[i].clone(), score: scores[i] })
                .collect(),
        )
    }
}

/// The indices of `scores`, highest first; ties keep their order (labels, documents, ...).
pub fn ranked(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// The function's name, as requests spell it.
pub fn name(function: Activation) -> &'static str {
    match function {
        Activation::Softmax => "softmax",
        Activation::Sigmoid => "sigmoid",
        Activation::None => "none",
    }
}

/// `function` applied to a row of logits.
pub fn apply(function: Activation, logits: &[f32]) -> Vec<f32> {
    match function {
        Activation::Softmax => crate::softmax(logits),
        Activation::Sigmoid => logits.iter().map(|&x| sigmoid(x)).collect(),
        Activation::None => logits.to_vec(),
    }
}

/// The logistic function, without overflow at either end.
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
