//! The response cache over HTTP: the real server, the sentence-classifier plugin, the default
//! model. Whether a request reached the model shows in its `metadata.forward_passes`, and the
//! cache's counters in `/v1/models`.
//!
//! Needs `make setup` and `make plugins`.

mod common;

use common::{PREDICT, Server, fixture_sentences, write_config};
use serde_json::{Value, json};

/// Tenants `alpha` and `beta` run the same plugin on the same model, each with a cache of its
/// own; `plain` has none. `max_bytes` is alpha's and beta's budget. The model in fp32.
fn server(name: &str, max_bytes: u64) -> Server {
    server_at(name, max_bytes, "fp32")
}

/// [`server`], with the model's `cpu_dtype` as given.
fn server_at(name: &str, max_bytes: u64, cpu_dtype: &str) -> Server {
    Server::launch(&write_config(
        name,
        &format!(
            r#"
models: [{{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: {cpu_dtype} }}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - {{ name: alpha, wasm: "{{classifier}}", routes: [/alpha{PREDICT}], cache: {{ max_bytes: {max_bytes} }} }}
  - {{ name: beta, wasm: "{{classifier}}", routes: [/beta{PREDICT}], cache: {{ max_bytes: {max_bytes} }} }}
  - {{ name: plain, wasm: "{{classifier}}", routes: [{PREDICT}] }}
"#
        ),
    ))
}

fn predict(server: &Server, route: &str, sentences: &[String]) -> Value {
    let (status, body) = server.post(route, json!({ "sentences": sentences }).to_string());
    assert_eq!(status, 200, "{body}");
    body
}

fn forward_passes(body: &Value) -> u64 {
    body["metadata"]["forward_passes"].as_u64().unwrap()
}

fn cache_stats(server: &Server) -> Value {
    server.get("/v1/models").1["models"][0]["cache"].clone()
}

#[test]
fn a_repeated_request_is_answered_from_the_cache_bit_for_bit() {
    let server = server("cache-repeat", 1 << 20);
    let sentences = fixture_sentences();
    let route = format!("/alpha{PREDICT}");
    let computed = predict(&server, &route, &sentences);
    assert!(forward_passes(&computed) > 0);
    let cached = predict(&server, &route, &sentences);
    assert_eq!(forward_passes(&cached), 0, "every sentence was cached: {}", cached["metadata"]);
    // serde_json writes each f32 probability exactly, so equal JSON numbers are equal bits.
    assert_eq!(cached["probabilities"], computed["probabilities"]);
    assert_eq!(cached["predictions"], computed["predictions"]);
    let stats = cache_stats(&server);
    assert_eq!((stats["misses"].as_u64(), stats["hits"].as_u64()), (Some(120), Some(120)), "{stats}");

    // Half old, half new: only the new half reaches the model, and the old half is unchanged.
    let mixed: Vec<String> =
        sentences[..60].iter().cloned().chain(sentences[..60].iter().map(|s| format!("{s} Again."))).collect();
    let partly = predict(&server, &route, &mixed);
    assert!(forward_passes(&partly) > 0);
    assert_eq!(partly["probabilities"].as_array().unwrap()[..60], computed["probabilities"].as_array().unwrap()[..60]);
    assert_eq!(cache_stats(&server)["hits"].as_u64(), Some(180));
}

#[test]
fn one_tenants_cache_never_answers_another_tenant() {
    let server = server("cache-tenants", 1 << 20);
    let sentences: Vec<String> = fixture_sentences()[..20].to_vec();
    predict(&server, &format!("/alpha{PREDICT}"), &sentences);
    assert_eq!(
        forward_passes(&predict(&server, &format!("/alpha{PREDICT}"), &sentences)),
        0,
        "alpha's repeat is a hit"
    );
    // beta sends what alpha sent: computed for beta, not served from alpha's entries.
    let beta = predict(&server, &format!("/beta{PREDICT}"), &sentences);
    assert!(forward_passes(&beta) > 0, "beta must not be answered from alpha's cache");
    // A tenant without a cache always computes.
    for _ in 0..2 {
        assert!(forward_passes(&predict(&server, PREDICT, &sentences)) > 0);
    }
    let stats = cache_stats(&server);
    assert_eq!((stats["hits"].as_u64(), stats["misses"].as_u64()), (Some(20), Some(40)), "{stats}");
}

#[test]
fn the_cache_never_holds_more_than_max_bytes() {
    // About 60 of the fixture's 120 entries fit (ids, 7 logits and the per-entry overhead).
    const MAX_BYTES: u64 = 16_000;
    let server = server("cache-bounded", MAX_BYTES);
    let sentences = fixture_sentences();
    let route = format!("/alpha{PREDICT}");
    for _ in 0..2 {
        predict(&server, &route, &sentences);
        let stats = cache_stats(&server);
        let (bytes, entries) = (stats["bytes"].as_u64().unwrap(), stats["entries"].as_u64().unwrap());
        assert!(bytes <= MAX_BYTES && bytes > MAX_BYTES / 2, "{stats}");
        assert!(entries > 0 && entries < 120, "{stats}");
        assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
    }
    // The second pass found what the first pass cached last, and only that.
    let hits = cache_stats(&server)["hits"].as_u64().unwrap();
    assert!(hits > 0 && hits < 120, "{hits}");
}

#[test]
fn a_sentence_repeated_within_one_request_is_computed_once() {
    let server = server("cache-duplicates", 1 << 20);
    let model_sequences =
        |server: &Server| server.get("/v1/models").1["models"][0]["stats"]["sequences"].as_u64().unwrap();
    let before = model_sequences(&server);
    let sentences: Vec<String> =
        ["The striker scored twice.", "Parliament passed the budget.", "The striker scored twice."]
            .map(String::from)
            .to_vec();
    let body = predict(&server, &format!("/alpha{PREDICT}"), &sentences);
    assert_eq!(model_sequences(&server) - before, 2, "two distinct sentences reach the model");
    let rows = body["probabilities"].as_array().unwrap();
    assert_eq!(rows[0], rows[2], "both copies get the one computed answer");
    let stats = cache_stats(&server);
    assert_eq!(
        (stats["misses"].as_u64(), stats["hits"].as_u64(), stats["entries"].as_u64()),
        (Some(3), Some(0), Some(2)),
        "{stats}"
    );
}

#[test]
fn a_cache_hit_answers_what_the_sentence_gets_alone() {
    // In fp32, set by hand: `cpu_dtype: auto` measures every precision at startup, which took
    // over 5 minutes on a 2-core AVX2 machine without VNNI (int8's `_int_mm` ran a 32-row pass in
    // 14.6 s there); model_runtime.rs tests what auto chooses, and invariance.rs that every
    // variant it may choose is batch-invariant.
    let server = server_at("cache-alone", 1 << 20, "fp32");
    let sentences: Vec<String> = fixture_sentences()[..12].to_vec();
    // Cached from one request, each sentence computed beside the eleven others (and padded).
    let batched = predict(&server, &format!("/alpha{PREDICT}"), &sentences);
    let model = server.get("/v1/models").1["models"][0].clone();
    let precision = model["precision"].as_str().unwrap().to_owned();
    assert_eq!(precision, "fp32", "{model}");
    let bound = 1e-5;
    for (i, sentence) in sentences.iter().enumerate() {
        let hit = predict(&server, &format!("/alpha{PREDICT}"), std::slice::from_ref(sentence));
        assert_eq!(forward_passes(&hit), 0, "a hit");
        assert_eq!(hit["probabilities"][0], batched["probabilities"][i]);
        // The same sentence alone, computed for the tenant without a cache.
        let alone = predict(&server, PREDICT, std::slice::from_ref(sentence));
        assert_eq!(forward_passes(&alone), 1);
        let probabilities = |body: &Value| -> Vec<f64> {
            body["probabilities"][0].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect()
        };
        let moved =
            probabilities(&hit).iter().zip(probabilities(&alone)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved <= bound, "sentence {i} at {precision}: the cached answer is {moved:.2e} from its answer alone");
    }
}
