//! The real server binary, real plugins, the real default model, real HTTP on an ephemeral port.
//!
//! Needs `make setup` (default model) and `make plugins` (the .wasm files).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use batchbox_batcher::ChunkOrder;
use batchbox_model::QueueOptions;
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use common::{PREDICT, Server, assert_json_error, fixture_sentences, read, workspace, write_config};
use serde_json::{Value, json};

/// The default model and one public tenant, the sentence classifier, with `classifier_config`.
fn config(name: &str, classifier_config: &str) -> PathBuf {
    write_config(
        name,
        &format!(
            r#"
# fp32: the tests compare the server's numbers with the fp32 runtime's.
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", max_body_bytes: 2097152, plugin_cache_dir: "{{cache}}", shutdown_grace_ms: 10000 }}
tenants:
  - name: sentence-classifier
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    config: {classifier_config}
    # Generous: 16 concurrent 120-sentence requests on a busy 2-core machine take a while.
    limits: {{ wall_ms: 120000 }}
  - name: hostile
    wasm: "{{hostile}}"
    routes: [/hostile]
"#
        ),
    )
}

fn start() -> Server {
    Server::launch(&config("default", "{ max_sentences: 1000, max_sentence_chars: 10000 }"))
}

#[test]
fn predicts_120_sentences_with_the_runtimes_numbers() {
    let server = start();
    let sentences = fixture_sentences();
    let (status, body) = server.post(PREDICT, json!({ "sentences": sentences }).to_string());
    assert_eq!(status, 200, "{body}");

    // The model runtime, driven directly, for the same sentences.
    let model = batchbox_model_tch::load(&ModelOptions {
        path: workspace().join("models/minilm-topics"),
        device: DeviceSpec::Cpu,
        use_fp16: true,
        cpu_dtype: CpuDtype::Fp32,
        cpu_backend: FormatChoice::TorchScript,
        gpu_backend: FormatChoice::TorchScript,
        pass: PassShape::fixed(32, 8192),
        queue: QueueOptions {
            name: "minilm-topics".into(),
            max_queue_delay: std::time::Duration::ZERO,
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        },
    })
    .unwrap();
    let encodings = model.tokenize(&sentences).unwrap();
    let direct = model.infer_blocking(encodings.iter().map(|e| e.ids.clone()).collect()).unwrap().outputs;

    let labels: Vec<&str> = body["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(labels, model.info().manifest.labels);
    let rows = body["probabilities"].as_array().unwrap();
    assert_eq!(rows.len(), 120);
    for (i, (row, logits)) in rows.iter().zip(&direct).enumerate() {
        let p: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(p.len(), labels.len());
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "row {i} sums to {}", p.iter().sum::<f64>());
        let max = logits.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.data.iter().map(|x| (x - max).exp()).sum();
        for (got, logit) in p.iter().zip(&logits.data) {
            assert!((got - f64::from((logit - max).exp() / z)).abs() < 1e-5, "row {i}");
        }
        let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(body["predictions"][i], labels[best]);
    }

    let meta = &body["metadata"];
    assert_eq!(meta["num_sentences"], 120);
    let words: usize = sentences.iter().map(|s| s.split_whitespace().count()).sum();
    assert_eq!(meta["total_words"], words);
    assert_eq!(meta["total_tokens"], encodings.iter().map(|e| e.ids.len()).sum::<usize>());
    assert_eq!(meta["model_version"], model.info().manifest.version.as_str());
    assert_eq!(meta["truncated"], json!([]));
    assert!(meta["forward_passes"].as_u64().unwrap() >= 4);
    let total = meta["processing_time_ms"].as_f64().unwrap();
    let parts: f64 =
        ["tokenize", "queue", "inference", "plugin"].iter().map(|k| meta["breakdown_ms"][k].as_f64().unwrap()).sum();
    assert!(total > 0.0 && meta["breakdown_ms"]["inference"].as_f64().unwrap() > 0.0, "{meta}");
    assert!((parts - total).abs() < 0.5, "breakdown {parts} ms vs total {total} ms");
}

#[test]
fn order_shape_and_both_body_forms() {
    let server = start();
    let sentences = ["The striker scored twice.", "Parliament passed the budget.", "Shares fell 4% today."];
    let forward = server.predict(&sentences);
    let (status, bare) = server.post(
        PREDICT,
        json!(["Shares fell 4% today.", "Parliament passed the budget.", "The striker scored twice."]).to_string(),
    );
    assert_eq!(status, 200, "{bare}");
    let mut reversed = bare["probabilities"].as_array().unwrap().clone();
    reversed.reverse();
    assert_eq!(&reversed, forward["probabilities"].as_array().unwrap());
    assert_eq!(forward["predictions"], json!(["sports", "politics", "business"]));

    let (status, empty) = server.post(PREDICT, r#"{"sentences": []}"#);
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["probabilities"], json!([]));
    assert_eq!(empty["predictions"], json!([]));
    assert_eq!(empty["metadata"]["num_sentences"], 0);

    let long = "word ".repeat(2000);
    let truncated = server.predict(&["short", &long]);
    assert_eq!(truncated["metadata"]["truncated"], json!([1]));
}

#[test]
fn bad_requests_get_documented_errors_and_the_server_keeps_serving() {
    let server = start();
    let many = json!({ "sentences": vec!["a sentence"; 10_000] }).to_string();
    let huge_sentence = json!({ "sentences": ["x".repeat(1 << 20)] }).to_string();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("invalid UTF-8", b"{\"sentences\": [\"caf\xe9\"]}".to_vec(), 400, "invalid_json"),
        ("truncated JSON", br#"{"sentences": ["a", "#.to_vec(), 400, "invalid_json"),
        ("not JSON", b"hello".to_vec(), 400, "invalid_json"),
        ("empty body", Vec::new(), 400, "invalid_json"),
        ("sentences is a string", br#"{"sentences": "hello"}"#.to_vec(), 400, "invalid_request"),
        ("numbers", br#"{"sentences": [1, 2]}"#.to_vec(), 400, "invalid_request"),
        ("null body", b"null".to_vec(), 400, "invalid_request"),
        ("null sentences", br#"{"sentences": null}"#.to_vec(), 400, "invalid_request"),
        ("null item", br#"{"sentences": ["ok", null]}"#.to_vec(), 400, "invalid_request"),
        ("nested arrays", br#"[["a", "b"]]"#.to_vec(), 400, "invalid_request"),
        ("missing field", b"{}".to_vec(), 400, "invalid_request"),
        ("unknown field", br#"{"sentences": ["a"], "lang": "en"}"#.to_vec(), 400, "invalid_request"),
        ("empty string", br#"{"sentences": ["fine", ""]}"#.to_vec(), 400, "invalid_request"),
        ("whitespace only", br#"{"sentences": ["  \t\n "]}"#.to_vec(), 400, "invalid_request"),
        ("10k sentences", many.into_bytes(), 413, "too_many_sentences"),
        ("a 1 MB sentence", huge_sentence.into_bytes(), 413, "sentence_too_long"),
    ];
    for (what, body, status, code) in &cases {
        let (got, error) = server.post(PREDICT, body);
        assert_json_error(got, &error, *status, code, what);
        // Each failure leaves the server serving.
        assert_eq!(server.predict(&["Still here."])["predictions"].as_array().unwrap().len(), 1, "after {what}");
    }

    let response = server.agent.get(format!("{}{PREDICT}", server.base)).call().unwrap();
    assert_eq!(response.headers().get("allow").unwrap(), "POST");
    let (status, error) = read(response);
    assert_json_error(status, &error, 405, "method_not_allowed", "GET on the predict route");
    let (status, error) = server.post("/api/v1/nope", "[]");
    assert_json_error(status, &error, 404, "not_found", "unknown route");
    let (status, error) = server.post("/health", "");
    assert_json_error(status, &error, 405, "method_not_allowed", "POST on /health");

    // Over the body limit: refused from the Content-Length alone, before reading the body.
    let (status, error) = raw_request(
        &server,
        &format!("POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\nConnection: close\r\n\r\n"),
    );
    assert_json_error(status, &error, 413, "body_too_large", "oversize body");
    // And a chunked body that grows past it.
    let chunk = vec![b'a'; 1 << 20];
    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(stream, "POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .unwrap();
    for _ in 0..3 {
        if write!(stream, "{:x}\r\n", chunk.len())
            .and_then(|()| stream.write_all(&chunk))
            .and_then(|()| stream.write_all(b"\r\n"))
            .is_err()
        {
            break; // the server may answer and close before the rest is sent
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let (status, error) = read_raw(stream);
    assert_json_error(status, &error, 413, "body_too_large", "chunked oversize body");

    // Unusual but valid text is served.
    let odd = server.predict(&[
        "Great game 🎉⚽",
        "今日は良い天気です。",
        "مرحبا بالعالم",
        "tab\there\u{0007}bell\u{0000}nul",
    ]);
    assert_eq!(odd["predictions"].as_array().unwrap().len(), 4);
    assert_eq!(server.predict(&["Still here."])["predictions"].as_array().unwrap().len(), 1);
}

fn raw_request(server: &Server, head: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.address()).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    read_raw(stream)
}

fn read_raw(mut stream: TcpStream) -> (u16, Value) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}")))
}

#[test]
fn host_routes_answer() {
    let server = start();
    assert_eq!(server.get("/health"), (200, json!({ "status": "ok" })));
    let (status, ready) = server.get("/ready");
    assert_eq!(status, 200);
    assert!(ready["models"]["minilm-topics"].as_str().unwrap().starts_with("minilm-topics-"));
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["models"][0]["task"], "sequence-classification");
    assert_eq!(models["models"][0]["labels"].as_array().unwrap().len(), 7);
    assert_eq!(models["models"][0]["device"], "cpu");
    assert_eq!(models["models"][0]["pass"], json!({ "max_sequences": 32, "max_tokens": 8192 }));
}

#[test]
fn a_pass_shape_the_config_leaves_out_is_the_devices_and_what_it_sets_wins() {
    let text = std::fs::read_to_string(config("pass-shape-base", "{}")).unwrap();
    let path = workspace().join("target/http-tests/pass-shape.yaml");
    let api = "api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }";
    assert!(text.contains(api));
    std::fs::write(&path, text.replace(api, "api: { inference_batch_size: 8, use_fp16: true }")).unwrap();
    let server = Server::launch(&path);
    let (_, models) = server.get("/v1/models");
    // Rows as set; tokens the CPU's default (a GPU's would be 32768).
    assert_eq!(models["models"][0]["pass"], json!({ "max_sequences": 8, "max_tokens": 8192 }));
    let answer = server.predict(&fixture_sentences()[..20].iter().map(String::as_str).collect::<Vec<_>>());
    let passes: std::collections::HashSet<u64> =
        answer["metadata"]["batch_ids"].as_array().unwrap().iter().map(|id| id.as_u64().unwrap()).collect();
    assert!(passes.len() >= 3, "20 sentences in passes of at most 8 rows: {passes:?}");
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    let mut server = start();
    let sentences = fixture_sentences();
    let url = format!("{}{PREDICT}", server.base);
    let agent = server.agent.clone();
    let in_flight = std::thread::spawn(move || {
        let response = agent.post(url).send(json!({ "sentences": sentences }).to_string()).unwrap();
        read(response)
    });
    // Long enough for the request to arrive; the model needs far longer to answer it.
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["probabilities"].as_array().unwrap().len(), 120);
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_plugin_that_rejects_its_config_stops_startup() {
    let config = config("bad-plugin-config", "{ max_sentences: many }");
    let output = Command::new(env!("CARGO_BIN_EXE_batchbox"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tenant sentence-classifier: the plugin rejected its config")
            && stderr.contains("max_sentences"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_stops_startup_naming_the_key() {
    let good = std::fs::read_to_string(config("for-bad-key", "{}")).unwrap();
    let path = workspace().join("target/http-tests/bad-key.yaml");
    std::fs::write(&path, good.replace("inference_batch_size", "inference_batch_sise")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_batchbox"))
        .args(["--config", path.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown field `inference_batch_sise`"), "{stderr}");
}

#[test]
fn compiled_plugins_are_cached_on_disk_across_restarts_and_old_ones_are_trimmed() {
    // A cache of its own: other tests' servers must not write into it meanwhile.
    let cache = workspace().join("target/http-tests/plugin-cache-restarts");
    let _ = std::fs::remove_dir_all(&cache);
    let shared = workspace().join("target/http-tests/plugin-cache");
    let text = std::fs::read_to_string(config("restarts-base", "{}")).unwrap();
    let config = workspace().join("target/http-tests/restarts.yaml");
    // A budget of 1 byte: nothing may stay but what the config uses.
    let text = text
        .replace(shared.to_str().unwrap(), cache.to_str().unwrap())
        .replace("shutdown_grace_ms: 10000 }", "shutdown_grace_ms: 10000, plugin_cache_max_bytes: 1 }");
    std::fs::write(&config, text).unwrap();
    let cached = || -> Vec<(PathBuf, std::time::SystemTime)> {
        let mut files: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .map(|p| (p.clone(), std::fs::metadata(&p).unwrap().modified().unwrap()))
            .collect();
        files.sort();
        files
    };
    drop(Server::launch(&config));
    let first = cached();
    // One file per distinct .wasm (the sentence classifier and hostile), named by its hash.
    assert_eq!(first.len(), 2, "{first:?}");
    // An older plugin version's code, left by an earlier config.
    let stale = cache.join("00000000000000000000000000000000.cwasm");
    std::fs::write(&stale, [0; 4096]).unwrap();
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(Server::launch(&config));
    assert!(!stale.exists(), "over its budget, the cache dropped code no plugin of the config uses");
    assert_eq!(cached(), first, "a restart reuses the compiled code instead of writing it again, and keeps it");
}

fn probabilities(body: &Value) -> Vec<Vec<f64>> {
    body["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect())
        .collect()
}

#[test]
fn concurrent_requests_share_batches_and_get_the_sequential_numbers() {
    let server = start();
    let sentences = fixture_sentences();
    let body = json!({ "sentences": sentences }).to_string();
    let (status, sequential) = server.post(PREDICT, &body);
    assert_eq!(status, 200);
    let expected = probabilities(&sequential);

    let responses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16).map(|_| scope.spawn(|| server.post(PREDICT, &body))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut batch_users: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (status, response) in &responses {
        assert_eq!(*status, 200, "{response}");
        for (got, want) in probabilities(response).iter().zip(&expected) {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-4, "concurrent {g} vs sequential {w}");
            }
        }
        for id in response["metadata"]["batch_ids"].as_array().unwrap() {
            *batch_users.entry(id.as_u64().unwrap()).or_default() += 1;
        }
    }
    assert!(batch_users.values().any(|&n| n > 1), "concurrent requests share forward passes: {batch_users:?}");
    let (_, models) = server.get("/v1/models");
    let stats = &models["models"][0]["stats"];
    assert!(stats["sequences"].as_u64().unwrap() >= 17 * 120, "{stats}");
    assert!(stats["padded_tokens"].as_u64() >= stats["real_tokens"].as_u64(), "{stats}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_recovers() {
    let text = std::fs::read_to_string(config("tiny-queue-base", "{}")).unwrap();
    let config = workspace().join("target/http-tests/tiny-queue.yaml");
    // Each of the two tenants' shares (4,000 tokens) holds one fixture request (3,645), not two.
    std::fs::write(
        &config,
        text.replace("max_batch_tokens: 8192 }", "max_batch_tokens: 8192, max_queued_tokens: 8000 }"),
    )
    .unwrap();
    let server = Server::launch(&config);
    let body = json!({ "sentences": fixture_sentences() }).to_string();
    let url = format!("{}{PREDICT}", server.base);
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let response = server.agent.post(&url).send(body.as_bytes()).unwrap();
                    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    let (status, body) = read(response);
                    (status, retry_after, body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().any(|(s, _, _)| *s == 200), "the first request is admitted");
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "{:?}", answers.iter().map(|a| a.0).collect::<Vec<_>>());
    for (status, retry_after, body) in refused {
        assert_json_error(*status, body, 503, "overloaded", "full queue");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    assert_eq!(server.predict(&["Recovered."])["predictions"].as_array().unwrap().len(), 1);
    let (_, models) = server.get("/v1/models");
    assert!(models["models"][0]["stats"]["rejected"].as_u64().unwrap() >= 1);
}

#[test]
fn predict_prints_the_plugins_top_label_and_probability_for_each_sentence() {
    let config = config("predict", "{}");
    let output = Command::new(env!("CARGO_BIN_EXE_batchbox"))
        .args(["--config", config.to_str().unwrap(), "predict"])
        .args(["The striker scored twice in the final", "Parliament passed the budget"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    // The plugin's labels and probabilities, as `POST /api/v1/predict/sentences` gives them.
    let server = start();
    let answer = server.predict(&["The striker scored twice in the final", "Parliament passed the budget"]);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line[0], answer["predictions"][i], "{stdout}");
        let best =
            answer["probabilities"][i].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).fold(0.0, f64::max);
        assert_eq!(line[1], format!("{best:.3}"), "{stdout}");
    }
    assert_eq!((lines[0][0], lines[1][0]), ("sports", "politics"), "{stdout}");
}
