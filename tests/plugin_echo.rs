//! The echo plugin in its three languages, examples/plugin-echo (Rust), examples/plugin-echo-py
//! (Python) and examples/plugin-echo-js (JavaScript), in the real server, on the default model,
//! over real HTTP. The examples must keep working, since they are where a plugin's author starts
//! (docs/plugins.md walks through them), and must answer alike, since the guide presents them as
//! one plugin in three languages: every answer of the Python and JavaScript echoes is compared
//! with the Rust one's.
//!
//! Needs `make setup` (default model) and `make plugins` (the .wasm files, the echoes' included).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

use common::{PREDICT, Server, assert_json_error, batchbox, python_wasm, read, wasm, workspace, write_config};
use serde_json::{Value, json};

/// One echo: its language, which names its tenant and prefixes its route, and its component.
struct Echo {
    language: &'static str,
    wasm: PathBuf,
}

impl Echo {
    fn route(&self) -> String {
        format!("/{}/echo", self.language)
    }
}

/// Each echo's tenant may tokenize this many bytes of text per request: more than any other
/// test sends, so that a body one byte longer is refused.
const MAX_TEXT_BYTES: usize = 64;

/// Rust first: the others are compared with it.
fn echoes() -> Vec<Echo> {
    let javascript = workspace().join("plugins/target/js/plugin_echo.wasm");
    assert!(javascript.is_file(), "{} is missing: run `make plugins`", javascript.display());
    vec![
        Echo { language: "rust", wasm: wasm("plugin_echo") },
        Echo { language: "python", wasm: python_wasm("plugin_echo") },
        Echo { language: "javascript", wasm: javascript },
    ]
}

/// Servers start one at a time: the first compiles the Python and JavaScript echoes (seconds
/// each) into the plugin cache and the others read them from it, rather than every test's server
/// compiling them at once on a small machine.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static STARTING: Mutex<()> = Mutex::new(());
    STARTING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A tenant per echo (see `Echo::route`, `MAX_TEXT_BYTES`), and the sentence classifier, to compare
/// token counts with. Each test its own config file, as tests run at once.
fn start(test: &str) -> (Server, Vec<Echo>) {
    start_with(test, |_| {})
}

/// `start`, with `customise` applied to the server's command.
fn start_with(test: &str, customise: impl FnOnce(&mut Command)) -> (Server, Vec<Echo>) {
    let echoes = echoes();
    let mut yaml = format!(
        r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - {{ name: sentence-classifier, wasm: "{{classifier}}", routes: ["{PREDICT}"] }}
"#
    );
    for echo in &echoes {
        let (name, wasm, route) = (echo.language, echo.wasm.display(), echo.route());
        yaml += &format!(
            "  - {{ name: {name}, wasm: \"{wasm}\", routes: [\"{route}\"], limits: {{ max_text_bytes: {MAX_TEXT_BYTES} }} }}\n"
        );
    }
    let config = write_config(&format!("plugin-echo-{test}"), &yaml);
    let _starting = one_at_a_time();
    (Server::launch_with(&config, customise), echoes)
}

/// A request to every echo: `method` on its route followed by `rest`, with `body` and `headers`.
struct Sent {
    method: &'static str,
    rest: &'static str,
    body: &'static [u8],
    headers: &'static [(&'static str, &'static str)],
}

fn send(server: &Server, route: &str, sent: &Sent) -> (u16, Value) {
    let mut request =
        ureq::http::Request::builder().method(sent.method).uri(format!("{}{route}{}", server.base, sent.rest));
    for (name, value) in sent.headers {
        request = request.header(*name, *value);
    }
    read(server.agent.run(request.body(sent.body.to_vec()).unwrap()).unwrap())
}

fn ids(body: &Value) -> Vec<u64> {
    body["ids"].as_array().unwrap_or_else(|| panic!("no ids: {body}")).iter().map(|id| id.as_u64().unwrap()).collect()
}

#[test]
fn every_echo_answers_with_the_request_as_the_rust_one_does() {
    let (server, echoes) = start("echoes");
    let requests = [
        Sent {
            method: "POST",
            rest: "/any/sub/path?lang=en&n=2",
            body: b"Shares fell 4% today.",
            headers: &[("x-echo-test", "Kept As Sent"), ("content-type", "text/plain")],
        },
        Sent { method: "GET", rest: "", body: b"", headers: &[] },
        Sent { method: "PUT", rest: "?q=%C3%A9", body: "naïve café, 東京, 🙂".as_bytes(), headers: &[] },
        // A byte order mark is kept; bytes that are not UTF-8 become U+FFFD, one per bad sequence.
        Sent { method: "DELETE", rest: "/bytes", body: b"\xEF\xBB\xBFbom, \xFF\xFE bad \xE2\x82 end", headers: &[] },
    ];
    for sent in &requests {
        let answers: Vec<Value> = echoes
            .iter()
            .map(|echo| {
                let (language, route) = (echo.language, echo.route());
                let (status, mut answer) = send(&server, &route, sent);
                assert_eq!(status, 200, "{language} {}: {answer}", sent.method);
                let (path, query) = sent.rest.split_once('?').unwrap_or((sent.rest, ""));
                assert_eq!(answer["method"], sent.method, "{language}: {answer}");
                assert_eq!(answer["path"], format!("{route}{path}"), "{language}: {answer}");
                assert_eq!(answer["query"], query, "{language}: {answer}");
                assert_eq!(answer["body"], String::from_utf8_lossy(sent.body).as_ref(), "{language}: {answer}");
                // Header names arrive lower-case; values as sent.
                let headers = answer["headers"].as_array().unwrap_or_else(|| panic!("{language}: {answer}"));
                for (name, value) in sent.headers {
                    assert!(headers.contains(&json!([name, value])), "{language}: {answer}");
                }
                // The rest of the answer must be the Rust echo's, word for word: only the route differs.
                answer["path"] = json!(path);
                answer
            })
            .collect();
        for (echo, answer) in echoes.iter().zip(&answers) {
            assert_eq!(answer, &answers[0], "{} {} {}, against rust", echo.language, sent.method, sent.rest);
        }
    }
}

#[test]
fn every_echo_tokenizes_the_body_with_the_tenants_model() {
    let (server, echoes) = start("tokenizes");
    let sentences = ["Shares fell 4% today.", "Parliament passed the budget after a long debate."];
    // As many tokens as the classifier, which tokenizes through the same host call, counts.
    let tokens: Vec<u64> = sentences
        .iter()
        .map(|sentence| server.predict(&[sentence])["metadata"]["total_tokens"].as_u64().unwrap())
        .collect();
    for echo in &echoes {
        let language = echo.language;
        let echoed: Vec<Vec<u64>> = sentences
            .iter()
            .map(|sentence| {
                let (status, body) = server.post(&echo.route(), sentence);
                assert_eq!(status, 200, "{language}: {body}");
                ids(&body)
            })
            .collect();
        for ((sentence, ids), tokens) in sentences.iter().zip(&echoed).zip(&tokens) {
            assert_eq!(ids.len() as u64, *tokens, "{language}, {sentence}: {ids:?}");
        }
        // Different texts, different ids, between the same special tokens.
        let (a, b) = (&echoed[0], &echoed[1]);
        assert_ne!(a, b, "{language}");
        assert_eq!((a.first(), a.last()), (b.first(), b.last()), "{language}: {a:?} {b:?}");
        // An empty body is only the special tokens.
        let (status, empty) = server.get(&echo.route());
        assert_eq!(status, 200, "{language}: {empty}");
        assert_eq!(ids(&empty), [a[0], *a.last().unwrap()], "{language}");
    }
}

#[test]
fn every_echo_turns_a_refused_host_call_into_the_http_error_it_stands_for() {
    let (server, echoes) = start("refused");
    let mut refusals = Vec::new();
    for echo in &echoes {
        let (language, route) = (echo.language, echo.route());
        // A byte past the tenant's max_text_bytes, so the host refuses the `tokenize`.
        let (status, body) = server.post(&route, "x".repeat(MAX_TEXT_BYTES + 1));
        assert_json_error(status, &body, 429, "quota_exceeded", &format!("{language}: a byte too many to tokenize"));
        assert_eq!(body["error"]["quota"], "max_text_bytes", "{language}: {body}");
        refusals.push(body);
        // Within the quota, the same plugin answers.
        let (status, body) = server.post(&route, "x".repeat(MAX_TEXT_BYTES));
        assert_eq!(status, 200, "{language}: {body}");
        assert_eq!(body["body"], "x".repeat(MAX_TEXT_BYTES), "{language}");
    }
    // The host's message, passed on by each SDK as it came.
    for (echo, refusal) in echoes.iter().zip(&refusals) {
        assert_eq!(refusal, &refusals[0], "{} against rust", echo.language);
    }
}

#[test]
fn every_echo_logs_through_the_host_tagged_with_its_tenant_and_the_request_id() {
    let log = workspace().join("target/http-tests/plugin-echo-logs.log");
    let file = std::fs::File::create(&log).unwrap();
    let (server, echoes) = start_with("logs", |command| {
        command.env("RUST_LOG", "info").env("BATCHBOX_LOG_FORMAT", "text").env("NO_COLOR", "1").stderr(file);
    });
    for echo in &echoes {
        let (language, route) = (echo.language, echo.route());
        let response = server.send(&route, "Shares fell 4% today.", &[]);
        let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        let (status, body) = read(response);
        assert_eq!(status, 200, "{language}: {body}");
        // Logged while the plugin ran, so before its response was written.
        let message = format!("echoing 21 bytes as {} tokens", ids(&body).len());
        let (tenant, request_id) = (format!("tenant=\"{language}\""), format!("request_id={id}"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.lines().any(|line| line.contains(&message) && line.contains(&tenant) && line.contains(&request_id)),
            "{language}: no `{message}` with {tenant} {request_id} in the log:\n{text}"
        );
    }
}

/// examples/echo.yaml, the config docs/plugins.md serves the echoes with, passes `check-config`.
#[test]
fn the_guides_config_passes_check_config() {
    let config = workspace().join("examples/echo.yaml");
    let _starting = one_at_a_time();
    let (ok, text) = batchbox(&["--config", config.to_str().unwrap(), "check-config"], &[("RUST_LOG", "error")]);
    assert!(ok, "{text}");
    for echo in echoes() {
        let line = format!("tenant echo-{}: routes [\"{}\"]", echo.language, echo.route());
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    assert!(text.contains("config OK"), "{text}");
}
