//! examples/plugin-echo in the real server, on the default model, over real HTTP: the example
//! must keep working, since it is where a plugin's author starts.
//!
//! Needs `make setup` (default model) and `make plugins` (the .wasm files, the echo's included).

mod common;

use common::{PREDICT, Server, assert_json_error, wasm, write_config};
use serde_json::{Value, json};

/// The echo at /echo, a second echo whose tenant may tokenize at most 16 bytes of text, and
/// the sentence classifier, to compare token counts with. Each test its own config file, as
/// tests run at once.
fn start(test: &str) -> Server {
    let echo = wasm("plugin_echo");
    let yaml = format!(
        r#"
models: [{{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: fp32 }}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - name: echo
    wasm: "{echo}"
    routes: [/echo]
  - name: echo-small
    wasm: "{echo}"
    routes: [/echo-small]
    limits: {{ max_text_bytes: 16 }}
  - name: sentence-classifier
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
"#,
        echo = echo.display(),
    );
    Server::launch(&write_config(&format!("plugin-echo-{test}"), &yaml))
}

fn ids(body: &Value) -> Vec<u64> {
    body["ids"].as_array().unwrap_or_else(|| panic!("no ids: {body}")).iter().map(|id| id.as_u64().unwrap()).collect()
}

#[test]
fn echoes_the_method_path_query_headers_and_body() {
    let server = start("echoes");
    let (status, body) =
        server.post_with("/echo/any/sub/path?lang=en&n=2", "Shares fell 4% today.", &[("x-echo-test", "Kept As Sent")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/echo/any/sub/path");
    assert_eq!(body["query"], "lang=en&n=2");
    assert_eq!(body["body"], "Shares fell 4% today.");
    // Header names arrive lower-case; values as sent.
    let headers = body["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-echo-test", "Kept As Sent"])), "{body}");

    let (status, body) = server.get("/echo");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/echo");
    assert_eq!((body["query"].as_str(), body["body"].as_str()), (Some(""), Some("")));
}

#[test]
fn tokenizes_the_body_with_the_tenants_model() {
    let server = start("tokenizes");
    let sentences = ["Shares fell 4% today.", "Parliament passed the budget after a long debate."];
    let echoed: Vec<Vec<u64>> = sentences
        .iter()
        .map(|sentence| {
            let (status, body) = server.post("/echo", sentence);
            assert_eq!(status, 200, "{body}");
            ids(&body)
        })
        .collect();
    for (sentence, ids) in sentences.iter().zip(&echoed) {
        // As many tokens as the classifier, which tokenizes through the same host call, counts.
        let tokens = &server.predict(&[sentence])["metadata"]["total_tokens"];
        assert_eq!(ids.len() as u64, tokens.as_u64().unwrap(), "{sentence}: {ids:?}");
    }
    // Different texts, different ids, between the same special tokens.
    let (a, b) = (&echoed[0], &echoed[1]);
    assert_ne!(a, b);
    assert_eq!((a.first(), a.last()), (b.first(), b.last()), "{a:?} {b:?}");
    // An empty body is only the special tokens.
    let (status, empty) = server.get("/echo");
    assert_eq!(status, 200, "{empty}");
    assert_eq!(ids(&empty), [a[0], *a.last().unwrap()]);
}

#[test]
fn a_refused_host_call_becomes_the_http_error_it_stands_for() {
    let server = start("refused");
    // 17 bytes of text: past echo-small's max_text_bytes, so the host refuses the `tokenize`.
    let (status, body) = server.post("/echo-small", "seventeen bytes!!");
    assert_json_error(status, &body, 429, "quota_exceeded", "17 bytes to tokenize");
    assert_eq!(body["error"]["quota"], "max_text_bytes", "{body}");
    // Within the quota, the same plugin answers.
    let (status, body) = server.post("/echo-small", "sixteen bytes!!!");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body"], "sixteen bytes!!!");
}
