//! The sentence classifier written in Python (plugins/python, built by `make plugins` with
//! componentize-py) answers as the Rust one does: the same probabilities, predictions and
//! metadata for the same sentences, and the same statuses and error codes for the same mistakes.

mod common;

use common::{PREDICT, Server, fixture_sentences, workspace, write_config};
use serde_json::{Value, json};

const PYTHON: &str = "/py/api/v1/predict/sentences";

fn start() -> Server {
    let python = workspace().join("plugins/target/python/sentence_classifier.wasm");
    assert!(python.exists(), "{} is missing: run `make plugins`", python.display());
    let config = write_config(
        "python-plugin",
        &format!(
            r#"
models: [{{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: fp32 }}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - name: rust
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    config: {{ max_sentences: 3, max_sentence_chars: 50 }}
    limits: {{ wall_ms: 120000 }}
  - name: python
    wasm: "{}"
    routes: [{PYTHON}]
    config: {{ max_sentences: 3, max_sentence_chars: 50 }}
    limits: {{ wall_ms: 120000 }}
"#,
            python.display()
        ),
    );
    Server::launch(&config)
}

#[test]
fn the_python_classifier_gives_the_rust_ones_answers_and_errors() {
    let server = start();
    let sentences: Vec<String> = fixture_sentences().into_iter().filter(|s| s.chars().count() <= 50).take(3).collect();
    let body = json!({ "sentences": sentences }).to_string();
    let (status, rust) = server.post(PREDICT, &body);
    assert_eq!(status, 200, "{rust}");
    let (status, python) = server.post(PYTHON, &body);
    assert_eq!(status, 200, "{python}");
    assert_eq!(python["labels"], rust["labels"]);
    assert_eq!(python["predictions"], rust["predictions"]);
    let probabilities = |answer: &Value| -> Vec<f64> {
        answer["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().clone())
            .map(|p| p.as_f64().unwrap())
            .collect()
    };
    let (rust_p, python_p) = (probabilities(&rust), probabilities(&python));
    assert_eq!(rust_p.len(), python_p.len());
    // The Rust plugin computes its softmax in f32, the Python one in f64.
    assert!(rust_p.iter().zip(&python_p).all(|(r, p)| (r - p).abs() < 1e-5), "{rust_p:?}\n{python_p:?}");
    for key in ["total_words", "total_tokens", "num_sentences", "model_version", "truncated", "forward_passes"] {
        assert_eq!(python["metadata"][key], rust["metadata"][key], "metadata.{key}");
    }
    let keys = |answer: &Value| -> Vec<String> {
        answer["metadata"]["breakdown_ms"].as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&python), keys(&rust));

    // The same mistakes get the same status and code (and the same message where it is the SDK's own).
    let mistakes: [&[u8]; 9] = [
        b"",
        b"{not json",
        b"\"a string\"",
        br#"{"texts": ["a"]}"#,
        br#"{"sentences": ["a"], "extra": 1}"#,
        br#"{"sentences": "a"}"#,
        br#"["a", "  "]"#,
        br#"["a", 3]"#,
        br#"["a", "b", "c", "d"]"#,
    ];
    for body in mistakes {
        let (rust_status, rust) = server.post(PREDICT, body);
        let (python_status, python) = server.post(PYTHON, body);
        let what = String::from_utf8_lossy(body);
        assert_eq!(
            (python_status, &python["error"]["code"]),
            (rust_status, &rust["error"]["code"]),
            "{what}: {python} vs {rust}"
        );
        assert!(rust_status >= 400, "{what}: {rust}");
        if rust["error"]["code"] != "invalid_json" {
            assert_eq!(python["error"]["message"], rust["error"]["message"], "{what}");
        }
    }
    let long = json!({ "sentences": ["x".repeat(51)] }).to_string();
    let (status, python) = server.post(PYTHON, &long);
    assert_eq!((status, python["error"]["code"].as_str()), (413, Some("sentence_too_long")), "{python}");
}
