//! The plugin runtime needs no real model: a plugin's host calls reach whatever implements
//! `PluginModel`. Here a fake model, whose logits say which sentence they belong to, serves the
//! real sentence-classifier plugin (`make plugins` builds it), with no libtorch anywhere.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batchbox_model::{Encoding, Inference, Manifest, ModelError, Output, PairTruncation, RunStats};
use batchbox_plugins::{InferFuture, PluginHost, PluginModel, PluginRuntime, json_post};
use batchbox_tenants::TenantConfig;
use serde_json::{Value, json};

const MAX_LENGTH: usize = 2;

/// Two labels; sentence `i` (its tokens are all `i`) gets logits `[i, 0]`, so the plugin's
/// softmax must give "no" the probability `sigmoid(i)`. A sentence has a token per word, at most
/// [`MAX_LENGTH`] (more is truncated). Counts the sequences it was asked for.
struct Fake {
    manifest: Manifest,
    inferred: AtomicUsize,
}

impl PluginModel for Fake {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, ModelError> {
        Ok((0..)
            .zip(texts)
            .map(|(i, text)| {
                let words = text.split_whitespace().count();
                let kept = words.min(MAX_LENGTH);
                Encoding {
                    ids: vec![i; kept],
                    word_ids: (0..kept as u32).map(Some).collect(),
                    offsets: vec![(0, 1); kept],
                    truncated: words > MAX_LENGTH,
                }
            })
            .collect())
    }

    fn tokenize_pairs(&self, _: &[(String, String)], _: PairTruncation) -> Result<Vec<Encoding>, ModelError> {
        Err(ModelError::InvalidInput("the fake model takes no pairs".into()))
    }

    fn infer<'a>(&'a self, _tenant: &'a str, sequences: Vec<Vec<u32>>, _deadline: Instant) -> InferFuture<'a> {
        self.inferred.fetch_add(sequences.len(), Ordering::SeqCst);
        let outputs = sequences.iter().map(|ids| Output { data: vec![ids[0] as f32, 0.0], shape: vec![2] }).collect();
        let stats = RunStats { forward_passes: 1, padded_tokens: sequences.len(), real_tokens: sequences.len() };
        Box::pin(async move {
            Ok(Inference { outputs, queued: Duration::ZERO, computed: Duration::ZERO, batch_ids: vec![1], stats })
        })
    }
}

/// The real sentence-classifier on a fake model, for a tenant with `limits`.
async fn served(limits: Value) -> (PluginRuntime, Arc<Fake>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm = root.join("plugins/target/wasm32-wasip2/release/sentence_classifier.wasm");
    assert!(wasm.exists(), "{} is missing: run `make plugins`", wasm.display());
    let tenant: TenantConfig = serde_json::from_value(json!({
        "name": "classifier", "wasm": wasm, "routes": ["/api/v1/predict/sentences"], "model": "fake",
        "limits": limits,
    }))
    .unwrap();
    let manifest = serde_json::from_value(json!({
        "format_version": 1, "name": "fake", "task": "sequence-classification", "labels": ["no", "yes"],
        "max_length": MAX_LENGTH, "inputs": ["input_ids", "attention_mask"], "variants": {}, "pad_token_id": 0,
        "vocab_size": 100, "version": "fake-1", "sha256": "0",
    }))
    .unwrap();
    let fake = Arc::new(Fake { manifest, inferred: AtomicUsize::new(0) });
    let model: Arc<dyn PluginModel> = fake.clone();
    let cache = root.join("target/plugin-cache");
    let host = PluginHost::new(4, &cache, u64::MAX).unwrap();
    let runtime = PluginRuntime::load(&host, std::slice::from_ref(&tenant), |_| model.clone()).await.unwrap();
    (runtime, fake)
}

async fn classify(runtime: &PluginRuntime, sentences: Value) -> (u16, Value) {
    let request = json_post("/api/v1/predict/sentences", json!({ "sentences": sentences }).to_string().into_bytes());
    let response = runtime.handle("classifier", 1, request).await.unwrap();
    (response.status, serde_json::from_slice(&response.body).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_plugin_is_served_by_a_fake_model_through_the_trait() {
    let (runtime, fake) = served(json!({})).await;
    let (status, answer) = classify(&runtime, json!(["first", "second", "third"])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["labels"], json!(["no", "yes"]));
    // Logits [0, 0], [1, 0], [2, 0]: "no" has probability 0.5, then 0.73, then 0.88.
    let probabilities: Vec<Vec<f64>> = serde_json::from_value(answer["probabilities"].clone()).unwrap();
    for (i, row) in probabilities.iter().enumerate() {
        let expected_no = 1.0 / (1.0 + (-(i as f64)).exp());
        assert!((row[0] - expected_no).abs() < 1e-3, "sentence {i}: {row:?}");
    }
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 3, "one sequence per sentence reached the model");
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_texts_reports_the_tokens_and_truncations_the_host_saw_and_skips_the_model_for_no_texts() {
    let (runtime, fake) = served(json!({})).await;
    // 1, 2 and 3 words: the third keeps MAX_LENGTH = 2 tokens and is reported truncated.
    let (status, answer) = classify(&runtime, json!(["one", "two words", "three words here"])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["metadata"]["total_tokens"], 5);
    assert_eq!(answer["metadata"]["truncated"], json!([2]));
    assert_eq!(answer["metadata"]["forward_passes"], 1);
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 3);

    let (status, answer) = classify(&runtime, json!([])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["predictions"], json!([]));
    assert_eq!(
        (answer["metadata"]["forward_passes"].clone(), answer["metadata"]["batch_ids"].clone()),
        (json!(0), json!([]))
    );
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 3, "no texts, no model call");
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_texts_is_charged_as_tokenize_and_infer_are() {
    // Texts: 4 sentences of 15 bytes are more than max_text_bytes 48.
    let (runtime, fake) = served(json!({ "max_text_bytes": 48, "max_tokens": 5 })).await;
    let (status, answer) =
        classify(&runtime, json!(["a b c d e f g h", "i j k l m n o p", "q r s t u v w x", "y z a b c d e f"])).await;
    assert_eq!((status, answer["error"]["quota"].clone()), (429, json!("max_text_bytes")), "{answer}");
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 0, "refused before the model");
    // Tokens: 2 + 2 + 2 after truncation pass max_tokens 5.
    let (status, answer) = classify(&runtime, json!(["a b", "c d", "e f"])).await;
    assert_eq!((status, answer["error"]["quota"].clone()), (429, json!("max_tokens")), "{answer}");
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 0, "refused before the model");
    let (status, answer) = classify(&runtime, json!(["a b", "c d", "e"])).await;
    assert_eq!(status, 200, "5 tokens fit: {answer}");
}
