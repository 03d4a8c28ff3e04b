//! The plugin runtime needs no real model: a plugin's host calls reach whatever implements
//! `PluginModel`. Here a fake model, whose logits say which sentence they belong to, serves the
//! real sentence-classifier plugin (`make plugins` builds it), with no libtorch anywhere.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batchbox_model::{Encoding, Inference, Manifest, ModelError, Output, RunStats};
use batchbox_plugins::{InferFuture, PluginModel, PluginRuntime, json_post};
use batchbox_tenants::TenantConfig;
use serde_json::{Value, json};

/// Two labels; sentence `i` (its one token is `i`) gets logits `[i, 0]`, so the plugin's
/// softmax must give "no" the probability `sigmoid(i)`. Counts the sequences it was asked for.
struct Fake {
    manifest: Manifest,
    inferred: AtomicUsize,
}

impl PluginModel for Fake {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, ModelError> {
        Ok((0..texts.len() as u32)
            .map(|i| Encoding { ids: vec![i], word_ids: vec![Some(0)], offsets: vec![(0, 1)], truncated: false })
            .collect())
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

#[tokio::test(flavor = "multi_thread")]
async fn a_real_plugin_is_served_by_a_fake_model_through_the_trait() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm = root.join("plugins/target/wasm32-wasip2/release/sentence_classifier.wasm");
    assert!(wasm.exists(), "{} is missing: run `make plugins`", wasm.display());
    let tenant: TenantConfig = serde_json::from_value(json!({
        "name": "classifier", "wasm": wasm, "routes": ["/api/v1/predict/sentences"], "model": "fake",
    }))
    .unwrap();
    let manifest = serde_json::from_value(json!({
        "format_version": 1, "name": "fake", "task": "sequence-classification", "labels": ["no", "yes"],
        "max_length": 8, "inputs": ["input_ids", "attention_mask"], "variants": {}, "pad_token_id": 0,
        "vocab_size": 100, "version": "fake-1", "sha256": "0",
    }))
    .unwrap();
    let fake = Arc::new(Fake { manifest, inferred: AtomicUsize::new(0) });
    let model: Arc<dyn PluginModel> = fake.clone();
    let cache = root.join("target/plugin-cache");
    let runtime = PluginRuntime::load(std::slice::from_ref(&tenant), |_| model.clone(), 4, &cache).await.unwrap();

    let body = json!({ "sentences": ["first", "second", "third"] }).to_string().into_bytes();
    let request = json_post("/api/v1/predict/sentences", body);
    let response = runtime.handle("classifier", 1, request).await.unwrap();
    let answer: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(response.status, 200, "{answer}");
    assert_eq!(answer["labels"], json!(["no", "yes"]));
    // Logits [0, 0], [1, 0], [2, 0]: "no" has probability 0.5, then 0.73, then 0.88.
    let probabilities: Vec<Vec<f64>> = serde_json::from_value(answer["probabilities"].clone()).unwrap();
    for (i, row) in probabilities.iter().enumerate() {
        let expected_no = 1.0 / (1.0 + (-(i as f64)).exp());
        assert!((row[0] - expected_no).abs() < 1e-3, "sentence {i}: {row:?}");
    }
    assert_eq!(fake.inferred.load(Ordering::SeqCst), 3, "one sequence per sentence reached the model");
}
