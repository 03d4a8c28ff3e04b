//! `manifest.json`, written by `tools/export_model.py` beside the exported files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The manifest layout this build reads; [`Manifest::load`] refuses any other.
pub const FORMAT_VERSION: u32 = 1;

/// What the model predicts, which sets the shape of each output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One row of logits per sequence: `[labels]`.
    SequenceClassification,
    /// One row of logits per token: `[tokens, labels]`, trimmed to the sequence's own length.
    TokenClassification,
}

/// The function that turns a row of logits into the model's scores, as the export read it from
/// the checkpoint's config (`batchbox_export.sources.activation`, transformers' pipeline rule):
/// what the SDKs apply unless a request asks for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// One distribution over the labels: a single-label classifier.
    Softmax,
    /// A probability per label: a multi-label classifier, or a one-label head (a score).
    Sigmoid,
    /// The logits as they are: a regression head.
    None,
}

/// How a variant's file runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A TorchScript module (`torch.jit.trace`), `.pt`: every manifest before AOTInductor.
    #[default]
    TorchScript,
    /// An AOTInductor package (`torch._inductor.aoti_compile_and_package`), `.pt2`: compiled
    /// for one device and one torch build.
    Aoti,
}

/// One exported file: a plain file name in the manifest (TorchScript, as every export before
/// AOTInductor wrote it), or `{"file": ..., "format": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "VariantEntry")]
pub struct Variant {
    /// The file, relative to the model directory.
    pub file: String,
    /// How it runs.
    pub format: Format,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VariantEntry {
    File(String),
    Described {
        file: String,
        #[serde(default)]
        format: Format,
    },
}

impl From<VariantEntry> for Variant {
    fn from(entry: VariantEntry) -> Self {
        match entry {
            VariantEntry::File(file) => Self { file, format: Format::TorchScript },
            VariantEntry::Described { file, format } => Self { file, format },
        }
    }
}

/// What the export says about the model; read and checked by [`Manifest::load`].
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The file's layout version; must be [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The model's name, as given to the export; the prefix of `version`.
    pub name: String,
    /// Sequence or token classification.
    pub task: Task,
    /// Label names, in the order of the logits; at least one.
    pub labels: Vec<String>,
    /// The checkpoint's `problem_type` (`single_label_classification`,
    /// `multi_label_classification`, `regression`), when its config sets one.
    #[serde(default)]
    pub problem_type: Option<String>,
    /// The model's scoring function; see [`Manifest::activation`] for manifests without one.
    #[serde(default, rename = "activation")]
    activation_field: Option<Activation>,
    /// Longest sequence the model takes, in tokens; at least 2. Texts are truncated to it and
    /// longer id sequences are refused.
    pub max_length: usize,
    /// The traced module's inputs, by name; must be `[input_ids, attention_mask]`.
    pub inputs: Vec<String>,
    /// The model takes sentence pairs (a sequence classifier: NLI, a cross-encoder). False in a
    /// manifest exported before pairs were known: re-export to serve them.
    #[serde(default)]
    pub pairs: bool,
    /// The model reads token types (BERT's `type_vocab_size: 2`), and they travel inside the
    /// ids: `token + vocab_size * type`, split again in the traced graph. A pair's second member
    /// is type 1; everything else is type 0, the plain token id.
    #[serde(default)]
    pub token_types: bool,
    /// Exported files by variant name: `<device>-<dtype>` (`cpu-float32`, `cuda-float16`, ...)
    /// for TorchScript, `<device>-<dtype>-aoti` for AOTInductor packages. A trace or a package
    /// bakes in its device and dtype, so each combination the host may run is its own file.
    pub variants: BTreeMap<String, Variant>,
    /// The id padding positions are filled with (their attention mask is 0).
    pub pad_token_id: i64,
    /// Token ids must be below this: an out-of-range id would fault inside the model (on CUDA,
    /// poisoning the whole context), so the runtime refuses it first.
    pub vocab_size: usize,
    /// `<name>-<first 12 hex digits of sha256>`: changes whenever the weights or tokenizer do.
    pub version: String,
    /// SHA-256, in hex, of `tokenizer.json` and the traced files, hashed in that order as one stream.
    pub sha256: String,
}

impl Manifest {
    /// The model's scoring function: the manifest's, or, for one exported before it was recorded,
    /// what transformers' pipeline would take: a sigmoid for a one-label head, softmax otherwise.
    pub fn activation(&self) -> Activation {
        self.activation_field.unwrap_or(match (self.task, self.labels.len()) {
            (Task::SequenceClassification, 1) => Activation::Sigmoid,
            _ => Activation::Softmax,
        })
    }

    /// Whether each label is scored on its own (`problem_type: multi_label_classification`), so
    /// that a text may have any number of them.
    pub fn multi_label(&self) -> bool {
        self.problem_type.as_deref() == Some("multi_label_classification")
    }

    /// Ids must be below this: `vocab_size`, or twice it for a model whose ids carry token types.
    pub fn id_limit(&self) -> usize {
        if self.token_types { 2 * self.vocab_size } else { self.vocab_size }
    }

    /// Reads `dir/manifest.json` and checks its format version, inputs, labels and `max_length`;
    /// `ModelError::Manifest` if it is missing or any check fails.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("manifest.json");
        let invalid = |message: String| ModelError::Manifest { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION}); re-export the model",
                manifest.format_version
            )));
        }
        if manifest.inputs != ["input_ids", "attention_mask"] {
            return Err(invalid(format!("inputs {:?} are not [input_ids, attention_mask]", manifest.inputs)));
        }
        if manifest.labels.is_empty() || manifest.max_length < 2 {
            return Err(invalid("needs at least one label and a max_length of 2 or more".into()));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str, labels: &[&str]) -> Manifest {
        let text = format!(
            r#"{{"format_version": 1, "name": "m", "task": "sequence-classification", "labels": {labels:?},
                "max_length": 8, "inputs": ["input_ids", "attention_mask"], "variants": {{}},
                "pad_token_id": 0, "vocab_size": 10, "version": "m-0", "sha256": "0"{extra}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_activation_is_the_manifests_or_the_pipelines_rule_for_older_manifests() {
        let multi = manifest(r#", "problem_type": "multi_label_classification", "activation": "sigmoid""#, &["a", "b"]);
        assert_eq!((multi.activation(), multi.multi_label()), (Activation::Sigmoid, true));
        let regression = manifest(r#", "problem_type": "regression", "activation": "none""#, &["score"]);
        assert_eq!((regression.activation(), regression.multi_label()), (Activation::None, false));
        // Exported before the activation was recorded: softmax, or a sigmoid for one label.
        assert_eq!(manifest("", &["a", "b"]).activation(), Activation::Softmax);
        assert_eq!(manifest("", &["score"]).activation(), Activation::Sigmoid);
        assert!(serde_json::from_str::<Activation>(r#""tanh""#).is_err());
    }

    #[test]
    fn a_variant_is_a_plain_file_name_for_torchscript_or_names_its_format() {
        let variants: BTreeMap<String, Variant> = serde_json::from_str(
            r#"{"cpu-float32": "model-cpu-float32.pt",
                "cpu-float32-aoti": {"file": "model-cpu-float32.pt2", "format": "aoti"},
                "cpu-int8": {"file": "model-cpu-int8.pt"}}"#,
        )
        .unwrap();
        assert_eq!(
            variants["cpu-float32"],
            Variant { file: "model-cpu-float32.pt".into(), format: Format::TorchScript }
        );
        assert_eq!(variants["cpu-float32-aoti"].format, Format::Aoti);
        assert_eq!(variants["cpu-int8"].format, Format::TorchScript);
        assert!(serde_json::from_str::<Variant>(r#"{"file": "x", "format": "onnx"}"#).is_err());
    }
}
