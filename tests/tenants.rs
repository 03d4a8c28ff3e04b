//! Multi-tenant hosting, end to end: routes and keys, per-tenant quotas, and a hostile plugin
//! (plugins/hostile) attacking the host in every way a tenant could. After each attack the
//! other tenants are served normally.
//!
//! Needs `make setup`, `make test-models` (the second model) and `make plugins`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{PREDICT, Server, assert_json_error, batchbox, predict_body, workspace, write_config};
use serde_json::{Value, json};

const ALPHA_KEY: &str = "alpha-secret-key";
const BETA_KEY: &str = "beta-secret-key";
const HOSTILE_KEY: &str = "hostile-secret-key";
const HOSTILE_CPU_MS: u64 = 300;

fn sha256(key: &str) -> String {
    hex::encode(batchbox_tenants::KeyHash::of(key).0)
}

/// Three tenants with keys (alpha: the default model; beta: a second model, reached by Host
/// header, key from an env var; hostile: tight limits, key from a file) and a public one whose
/// plugin only ever sleeps. The models in fp32: `cpu_dtype: auto` measures for seconds at load.
fn config(name: &str) -> PathBuf {
    config_with_dtype(name, "fp32")
}

/// [`config`], with the default model's `cpu_dtype` as given.
fn config_with_dtype(name: &str, cpu_dtype: &str) -> PathBuf {
    let dir = workspace().join("target/http-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let keys_file = dir.join("hostile.keys");
    std::fs::write(&keys_file, format!("# the hostile tenant's key\n{HOSTILE_KEY}\n")).unwrap();
    write_config(
        name,
        &format!(
            r#"
models:
  - {{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: {cpu_dtype} }}
  - {{ name: tiny-deberta, path: "{tiny}", device: cpu, cpu_dtype: fp32 }}
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - name: alpha
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    keys: ["sha256:{alpha}"]
  - name: beta
    wasm: "{{classifier}}"
    model: tiny-deberta
    routes: ["beta.example{PREDICT}"]
    keys: [env:BATCHBOX_TEST_BETA_KEY]
  - name: hostile
    wasm: "{{hostile}}"
    routes: [/hostile]
    keys: ["file:{keys}"]
    limits:
      memory_bytes: 67108864
      cpu_ms: {HOSTILE_CPU_MS}
      wall_ms: 5000
      max_concurrent: 8
      max_body_bytes: 1024
      max_sequences: 1000
      max_tokens: 500
      max_text_bytes: 1048576
      max_hostcall_bytes: 4194304
  - name: sleepy
    wasm: "{{hostile}}"
    routes: [/sleepy]
    limits: {{ cpu_ms: 60000, wall_ms: 1000, max_concurrent: 2 }}
"#,
            tiny = workspace().join("models/test/tiny-deberta").display(),
            alpha = sha256(ALPHA_KEY),
            keys = keys_file.display(),
        ),
    )
}

fn start() -> Server {
    Server::launch_with_env(
        &config("tenants"),
        &[("BATCHBOX_TEST_BETA_KEY", BETA_KEY), ("BATCHBOX_SECRET", "do-not-leak")],
    )
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Alpha's normal request: what every attack must leave working.
fn assert_alpha_served(server: &Server, after: &str) {
    common::assert_served(server, &[("authorization", &bearer(ALPHA_KEY))], after);
}

fn hostile(server: &Server, path: &str) -> (u16, Value) {
    server.post_with(&format!("/hostile/{path}"), "", &[("authorization", &bearer(HOSTILE_KEY))])
}

#[test]
fn keys_open_their_own_tenant_only() {
    let server = start();
    let alpha = bearer(ALPHA_KEY);
    let beta = bearer(BETA_KEY);

    let response = server.send(PREDICT, predict_body(), &[]);
    assert_eq!(response.headers().get("www-authenticate").unwrap(), "Bearer");
    let (status, body) = common::read(response);
    assert_json_error(status, &body, 401, "unauthorized", "no key");
    let (status, body) = server.post_with(PREDICT, predict_body(), &[("authorization", "Bearer wrong-key")]);
    assert_json_error(status, &body, 401, "unauthorized", "unknown key");
    let (status, body) = server.post_with(PREDICT, predict_body(), &[("authorization", &beta)]);
    assert_json_error(status, &body, 403, "forbidden", "beta's key on alpha's route");
    assert!(!body.to_string().contains(BETA_KEY), "errors never echo keys: {body}");
    assert_alpha_served(&server, "auth checks");

    // Beta: its own model, reached by Host header; its key comes from an environment variable.
    let (status, body) =
        server.post_with(PREDICT, predict_body(), &[("host", "beta.example"), ("authorization", &beta)]);
    assert_eq!(status, 200, "{body}");
    assert!(body["metadata"]["model_version"].as_str().unwrap().starts_with("checkpoint-best-"), "{body}");
    let (status, body) =
        server.post_with(PREDICT, predict_body(), &[("host", "beta.example:8080"), ("authorization", &alpha)]);
    assert_json_error(status, &body, 403, "forbidden", "alpha's key on beta's host");
    // Hostile: its key comes from a file.
    assert_eq!(hostile(&server, "ok"), (200, json!("ok")));

    // Host routes stay open.
    assert_eq!(server.get("/health").0, 200);
    let (status, ready) = server.get("/ready");
    assert_eq!(status, 200);
    assert!(ready["models"]["tiny-deberta"].is_string(), "{ready}");
    let (_, models) = server.get("/v1/models");
    assert_eq!(models["models"][1]["name"], "tiny-deberta", "{models}");
    assert!(!models.to_string().contains("beta"), "tenant names are not public: {models}");
}

#[test]
fn quotas_answer_429_naming_the_quota() {
    let server = start();
    // Body size: the hostile tenant takes 1 KiB.
    let (status, body) = server.post_with("/hostile/ok", vec![b'x'; 2048], &[("authorization", &bearer(HOSTILE_KEY))]);
    assert_json_error(status, &body, 429, "quota_exceeded", "big body");
    assert_eq!(body["error"]["quota"], "max_body_bytes");

    // Concurrency: sleepy takes 2 requests at once; they sleep until its 1 s wall limit.
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| server.post("/sleepy/sleep", ""))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 429).map(|(_, b)| b).collect();
    assert_eq!(refused.len(), 2, "{answers:?}");
    assert!(refused.iter().all(|b| b["error"]["quota"] == "max_concurrent"), "{refused:?}");
    assert_eq!(answers.iter().filter(|(s, _)| *s == 504).count(), 2, "{answers:?}");

    // Sequences and tokens per request, refused by the host before any work.
    let (status, body) = hostile(&server, "infer-many?n=5000");
    assert_json_error(status, &body, 429, "quota_exceeded", "5000 sequences");
    assert_eq!(body["error"]["quota"], "max_sequences", "{body}");
    let (status, body) = hostile(&server, "infer-many?n=900");
    assert_json_error(status, &body, 429, "quota_exceeded", "900 one-token sequences");
    assert_eq!(body["error"]["quota"], "max_tokens", "{body}");
    let (status, body) = hostile(&server, "tokenize-huge?n=2097152");
    assert_json_error(status, &body, 429, "quota_exceeded", "2 MiB of text");
    assert_eq!(body["error"]["quota"], "max_text_bytes", "{body}");
    // Past the bytes one host call may pass: refused before the host even reads them.
    for attack in ["infer-many?n=1000000", "tokenize-huge?n=16777216"] {
        let (status, body) = hostile(&server, attack);
        assert_json_error(status, &body, 429, "quota_exceeded", attack);
        assert_eq!(body["error"]["quota"], "max_hostcall_bytes", "{attack}");
    }
    assert_alpha_served(&server, "quotas");
}

#[test]
fn an_infinite_loop_is_stopped_within_twice_its_cpu_limit_while_others_are_served() {
    let server = start();
    std::thread::scope(|scope| {
        let others = scope.spawn(|| {
            for _ in 0..3 {
                assert_alpha_served(&server, "the loop started");
            }
        });
        let started = Instant::now();
        let (status, body) = hostile(&server, "loop");
        let elapsed = started.elapsed();
        assert_json_error(status, &body, 500, "plugin_cpu_limit", "infinite loop");
        assert!(elapsed < Duration::from_millis(2 * HOSTILE_CPU_MS), "stopped after {elapsed:?}");
        others.join().unwrap();
    });
    assert_alpha_served(&server, "infinite loop");
}

#[test]
fn traps_are_contained_and_the_host_memory_stays_bounded() {
    let server = start();
    assert_alpha_served(&server, "start");
    let before = server.rss_bytes();
    for _ in 0..3 {
        // Four at once, each trying to take all memory: each is trapped at its 64 MiB. Their
        // freed pool slots keep at most 8 MiB each resident for the next instances.
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| hostile(&server, "memory-bomb"))).collect();
            for handle in handles {
                let (status, body) = handle.join().unwrap();
                assert_json_error(status, &body, 500, "plugin_memory_limit", "memory bomb");
                assert!(body["error"]["message"].as_str().unwrap().contains("67108864 bytes"), "{body}");
            }
        });
    }
    let after = server.rss_bytes();
    assert!(after < before + (64 << 20), "RSS grew from {} MiB to {} MiB", before >> 20, after >> 20);
    assert_alpha_served(&server, "memory bombs");

    for (attack, code) in [("recursion", "plugin_failed"), ("panic", "plugin_failed")] {
        let (status, body) = hostile(&server, attack);
        assert_json_error(status, &body, 500, code, attack);
        assert_alpha_served(&server, attack);
    }
    let (status, body) = hostile(&server, "recursion");
    assert!(status == 500 && body["error"]["message"].as_str().unwrap().contains("call stack exhausted"), "{body}");

    let (status, body) = hostile(&server, "huge-response?n=16777216");
    assert_json_error(status, &body, 429, "quota_exceeded", "a 16 MiB response");
    assert_eq!(body["error"]["quota"], "max_hostcall_bytes");
    assert_alpha_served(&server, "huge response");

    let started = Instant::now();
    let (status, body) = server.post("/sleepy/sleep", "");
    assert_json_error(status, &body, 504, "plugin_timeout", "a plugin that never returns");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_alpha_served(&server, "a plugin that never returns");
}

#[test]
fn wasi_grants_no_files_environment_network_or_fine_clock() {
    let server = start();
    let port = server.address().rsplit(':').next().unwrap().to_owned();
    let (status, report) = hostile(&server, &format!("escape?port={port}"));
    assert_eq!(status, 200, "{report}");
    for attempt in ["read_file", "list_dir", "write_file", "env_var", "tcp_connect", "udp_bind", "dns"] {
        let outcome = report[attempt].as_str().unwrap();
        assert!(outcome.starts_with("denied: "), "{attempt}: {outcome}");
    }
    assert_eq!(report["env_vars"], 0, "the server's environment (BATCHBOX_SECRET) is not visible");
    let headers = report["headers"].as_array().unwrap();
    assert!(
        headers.contains(&json!("host")) && !headers.contains(&json!("authorization")),
        "the key stays with the host: {headers:?}"
    );
    let resolution = batchbox_plugins::CLOCK_RESOLUTION.as_nanos() as u64;
    assert_eq!(report["wall_clock_ns"].as_u64().unwrap() % resolution, 0, "{report}");
    let step = report["monotonic_step_ns"].as_u64().unwrap();
    assert!(step > 0 && step % resolution == 0, "the finest monotonic step is {step} ns");
    assert_alpha_served(&server, "escape attempts");
}

#[test]
fn broken_plugins_stop_startup_naming_the_tenant_and_what_is_missing() {
    let base = std::fs::read_to_string(config("lifecycle-base")).unwrap();
    let dir = workspace().join("target/http-tests");
    let hostile = common::wasm("hostile");
    let cases: [(&str, &[u8], &str); 3] = [
        // A valid component that exports nothing.
        ("empty-component", b"\0asm\x0d\0\x01\0", "batchbox:plugin/handler"),
        // A core module, not a component.
        ("core-module", b"\0asm\x01\0\0\0", "tenant hostile"),
        ("garbage", b"not wasm at all", "tenant hostile"),
    ];
    for (name, bytes, expected) in cases {
        let wasm = dir.join(format!("{name}.wasm"));
        std::fs::write(&wasm, bytes).unwrap();
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, base.replace(hostile.to_str().unwrap(), wasm.to_str().unwrap())).unwrap();
        for command in ["check-config", "serve"] {
            let (ok, output) =
                batchbox(&["--config", path.to_str().unwrap(), command], &[("BATCHBOX_TEST_BETA_KEY", BETA_KEY)]);
            assert!(!ok, "{name} {command}: {output}");
            assert!(output.contains("tenant hostile") && output.contains(expected), "{name} {command}: {output}");
        }
    }
    // A key source that cannot be read stops startup too, naming the tenant and the variable.
    let (ok, output) = batchbox(&["--config", config("no-env").to_str().unwrap(), "check-config"], &[]);
    assert!(!ok && output.contains("tenant beta") && output.contains("BATCHBOX_TEST_BETA_KEY"), "{output}");
    assert!(!output.contains(BETA_KEY));
}

#[test]
fn check_config_validates_without_serving_and_the_example_config_is_valid() {
    let (ok, output) = batchbox(
        &["--config", config_with_dtype("check", "auto").to_str().unwrap(), "check-config"],
        &[("BATCHBOX_TEST_BETA_KEY", BETA_KEY)],
    );
    assert!(ok, "{output}");
    assert!(
        output
            .contains("tenant beta: routes [\"beta.example/api/v1/predict/sentences\"], model tiny-deberta, 1 key(s)"),
        "{output}"
    );
    assert!(
        output.contains("tenant sleepy") && output.contains("public (no keys)") && output.contains("config OK"),
        "{output}"
    );
    assert!(
        !output.contains(BETA_KEY) && !output.contains(&sha256(ALPHA_KEY)),
        "keys and hashes are never printed: {output}"
    );
    // `cpu_dtype: auto` (the default) says what it measured of each candidate: its time; for fp32,
    // the reference, its batch invariance; for each other, agreement with fp32 over the export's
    // agreement texts and batch invariance, or why it was not checked (slower than fp32).
    let minilm = output.lines().find(|l| l.starts_with("model minilm-topics:")).unwrap_or_else(|| panic!("{output}"));
    for measured in ["auto measured: Fp32 ", "; Bf16", "; Int8", ", the reference"] {
        assert_eq!(minilm.matches(measured).count(), 1, "{measured:?}: {minilm}");
    }
    let (checked, unchecked) = (minilm.matches(" texts, max |dp| ").count(), minilm.matches("not checked: ").count());
    assert_eq!(checked + unchecked, 2, "bf16 and int8 are each checked or say why not: {minilm}");
    assert_eq!(minilm.matches(" beside other texts (").count(), 1 + checked, "{minilm}");
    assert!(minilm.contains("(bound 1e-5") && minilm.matches("(bound 1e-3").count() == checked, "{minilm}");

    let example = workspace().join("examples/two_tenants.yaml");
    let (ok, output) =
        batchbox(&["--config", example.to_str().unwrap(), "check-config"], &[("TEAM_B_API_KEY", "team-b-example-key")]);
    assert!(ok, "{output}");
    assert!(
        output.contains("tenant team-a") && output.contains("tenant team-b") && output.contains("config OK"),
        "{output}"
    );
}

#[test]
fn the_example_config_serves_two_tenants_with_two_plugins_and_two_models() {
    let example = workspace().join("examples/two_tenants.yaml");
    let server = Server::launch_with_env(&example, &[("PORT", "0"), ("TEAM_B_API_KEY", "team-b-example-key")]);
    let team_a = bearer("team-a-example-key");
    let team_b = bearer("team-b-example-key");

    let (status, body) = server.post_with(PREDICT, predict_body(), &[("authorization", &team_a)]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"], json!(["sports", "politics"]));
    let (status, body) = server.post_with(PREDICT, predict_body(), &[("authorization", &team_b)]);
    assert_json_error(status, &body, 403, "forbidden", "team-b's key on team-a's route");

    let text = "Ada Lovelace visited London in 1842.";
    let tag = json!({ "texts": [text] }).to_string();
    for (path, host) in [("/api/v1/tag", "team-b.example.com"), ("/team-b/api/v1/tag", "localhost")] {
        let (status, body) = server.post_with(path, &tag, &[("host", host), ("authorization", &team_b)]);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body["metadata"]["model_version"].as_str().unwrap().starts_with("checkpoint-ner-"), "{body}");
        let words = body["results"][0].as_array().unwrap();
        let labels = body["labels"].as_array().unwrap();
        // Every character of the text but spaces is in exactly one word, in order.
        let joined: String = words.iter().map(|w| w["word"].as_str().unwrap()).collect();
        assert_eq!(joined, text.replace(' ', ""), "{body}");
        for word in words {
            let (start, end) = (word["start"].as_u64().unwrap() as usize, word["end"].as_u64().unwrap() as usize);
            assert_eq!(&text[start..end], word["word"].as_str().unwrap());
            assert!(labels.contains(&word["label"]));
            assert!(word["score"].as_f64().unwrap() > 0.0 && word["score"].as_f64().unwrap() <= 1.0);
        }
    }
    let (status, body) = server.post_with("/api/v1/tag", &tag, &[("authorization", &team_b)]);
    assert_json_error(status, &body, 404, "not_found", "team-b's route on another host");
}

#[test]
fn the_target_names_the_host_and_ambiguous_requests_get_400() {
    let server = start();
    let alpha = format!("authorization: {}", bearer(ALPHA_KEY));
    // The absolute-form target's authority wins over the Host header (RFC 9112 §3.2.2): this is
    // beta's route, so alpha's key is another tenant's key there...
    let (status, body) = common::raw(
        &server,
        &format!("POST http://beta.example{PREDICT} HTTP/1.1\r\nhost: alpha.example\r\n{alpha}"),
        &predict_body(),
    );
    assert_json_error(status, &body, 403, "forbidden", "absolute-form target naming beta");
    // ...and the other way round, alpha's route serves alpha's key.
    let (status, body) = common::raw(
        &server,
        &format!("POST http://alpha.example:80{PREDICT} HTTP/1.1\r\nhost: beta.example\r\n{alpha}"),
        &predict_body(),
    );
    assert_eq!(status, 200, "absolute-form target naming alpha: {body}");

    let ambiguous = [
        (
            format!("POST {PREDICT} HTTP/1.1\r\nhost: alpha.example\r\nhost: beta.example\r\n{alpha}"),
            "several Host headers",
        ),
        (format!("POST {PREDICT} HTTP/1.1\r\n{alpha}"), "need a Host header"),
        (
            format!("POST {PREDICT} HTTP/1.1\r\nhost: alpha.example\r\n{alpha}\r\nauthorization: Bearer other"),
            "several Authorization headers",
        ),
        ("GET /health HTTP/1.1".to_owned(), "need a Host header"),
    ];
    for (head, says) in ambiguous {
        let (status, body) = common::raw(&server, &head, "");
        assert_json_error(status, &body, 400, "bad_request", says);
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{body}");
        assert_alpha_served(&server, says);
    }
    // HTTP/1.0 did not require Host: served.
    let (status, body) = common::raw(&server, &format!("POST {PREDICT} HTTP/1.0\r\n{alpha}"), &predict_body());
    assert_eq!(status, 200, "HTTP/1.0 without Host: {body}");
}

#[test]
fn credentials_cookies_and_hop_by_hop_headers_never_reach_a_plugin() {
    let server = start();
    let port = server.address().rsplit(':').next().unwrap().to_owned();
    let head = format!(
        "POST /hostile/escape?port={port} HTTP/1.1\r\nhost: localhost\r\nauthorization: {}\r\nproxy-authorization: Basic c2VjcmV0\r\n\
         keep-alive: timeout=5\r\nte: trailers\r\nupgrade: websocket\r\nproxy-connection: keep-alive\r\nx-connection-only: 1\r\n\
         cookie: session=another-tenants\r\n\
         x-end-to-end: 1\r\nconnection: x-connection-only",
        bearer(HOSTILE_KEY)
    );
    let (status, report) = common::raw(&server, &head, "");
    assert_eq!(status, 200, "{report}");
    let headers: Vec<&str> = report["headers"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    for withheld in [
        "authorization",
        "proxy-authorization",
        "cookie",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "connection",
        "x-connection-only",
    ] {
        assert!(!headers.contains(&withheld), "{withheld} reached the plugin: {headers:?}");
    }
    assert!(headers.contains(&"x-end-to-end") && headers.contains(&"host"), "{headers:?}");
}

#[test]
fn a_plugin_response_that_would_break_framing_or_flood_headers_gets_500_naming_the_problem() {
    let server = start();
    let key = bearer(HOSTILE_KEY);
    let respond = |query: &str, headers: &[(&str, &str)]| {
        let mut headers = headers.to_vec();
        headers.push(("authorization", &key));
        server.post_with(&format!("/hostile/respond?{query}"), "", &headers)
    };
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let refused: [(&str, Headers, &str); 13] = [
        (
            "n=101",
            &[("x-respond-upgrade", "websocket"), ("x-respond-connection", "upgrade")],
            "status 101 is outside 200-599",
        ),
        ("n=199", &[], "status 199 is outside 200-599"),
        ("n=600", &[], "status 600 is outside 200-599"),
        ("", &[("x-respond-content-length", "1000")], "header content-length is set by the host"),
        ("", &[("x-respond-transfer-encoding", "chunked")], "header transfer-encoding is set by the host"),
        ("", &[("x-respond-connection", "close")], "header connection is set by the host"),
        ("", &[("x-respond-upgrade", "h2c")], "header upgrade is set by the host"),
        ("", &[("x-respond-keep-alive", "timeout=1")], "header keep-alive is set by the host"),
        ("", &[("x-respond-te", "trailers")], "header te is set by the host"),
        ("", &[("x-respond-set-cookie", "session=mine; Path=/")], "header set-cookie is set by the host"),
        ("count=101", &[], "101 headers, more than the limit of 100"),
        ("count=20&bytes=4000", &[], "more than the limit of 65536"),
        ("count=1&bytes=70000", &[], "more than the limit of 65536"),
    ];
    for (query, headers, says) in refused {
        let (status, body) = respond(query, headers);
        let what = format!("respond?{query} {headers:?}");
        assert_json_error(status, &body, 500, "bad_plugin_response", &what);
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{what}: {body}");
        assert_alpha_served(&server, &what);
    }
    // 200,000 headers: the hostile tenant's 4 MiB hostcall budget stops them (429), the default
    // 16 MiB (the sleepy tenant's) lets them through to the count check.
    let (status, body) = respond("count=200000", &[]);
    assert_json_error(status, &body, 429, "quota_exceeded", "200,000 headers from the hostile tenant");
    let (status, body) = server.post("/sleepy/respond?count=200000", "");
    assert_json_error(status, &body, 500, "bad_plugin_response", "200,000 headers from the sleepy tenant");
    assert!(body["error"]["message"].as_str().unwrap().contains("200000 headers"), "{body}");
    assert_alpha_served(&server, "200,000 headers");

    // What a plugin may set arrives as it was set, on a well-framed response.
    let response = server.send(
        "/hostile/respond?n=201&count=99",
        "",
        &[("authorization", &key), ("x-respond-cache-control", "no-store")],
    );
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers().get("cache-control").unwrap(), "no-store");
    assert_eq!(response.headers().get("content-length").unwrap(), "5");
    assert!(response.headers().get("x-request-id").is_some());
    assert_eq!(response.into_body().with_config().read_to_string().unwrap(), "hello");
}

#[test]
fn past_max_instances_requests_get_503_at_once_and_the_next_is_served() {
    // Two instances in the whole pool, and a tenant that would take eight requests at once.
    let config = write_config(
        "instances",
        r#"
models: [{ name: minilm-topics, path: "{model}", device: cpu, cpu_dtype: fp32 }]
api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }
server: { bind: "127.0.0.1:0", plugin_cache_dir: "{cache}", max_instances: 2 }
tenants:
  - name: sleepy
    wasm: "{hostile}"
    routes: [/sleepy]
    limits: { cpu_ms: 60000, wall_ms: 1500, max_concurrent: 8 }
"#,
    );
    let server = Server::launch(&config);
    let started = Instant::now();
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let response = server.send("/sleepy/sleep", "", &[]);
                    let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    let (status, body) = common::read(response);
                    (status, retry, body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Two sleep until the wall limit; two find no instance and are refused without waiting.
    let refused: Vec<_> = answers.iter().filter(|(status, _, _)| *status == 503).collect();
    assert_eq!(refused.len(), 2, "{answers:?}");
    for (status, retry, body) in &refused {
        assert_json_error(*status, body, 503, "overloaded", "no free instance");
        assert_eq!(retry.as_deref(), Some("1"), "{body}");
    }
    assert_eq!(answers.iter().filter(|(status, _, _)| *status == 504).count(), 2, "{answers:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    // The permits came back with the stores: the pool serves again.
    let (status, body) = server.post("/sleepy/ok", "");
    assert_eq!(status, 200, "{body}");
}
