//! The sentence classifier is written three times: in Rust (plugins/sentence-classifier), in
//! Python (plugins/python, built by componentize-py) and in JavaScript (plugins/js, built by
//! componentize-js), all by `make plugins`. A client cannot tell them apart: the same
//! probabilities, predictions and metadata for the same sentences, the same status, error code
//! and message for the same mistake, and the same refusal of a config they cannot take.
//!
//! The three run side by side in one server, on one model, each as its own tenant: once with the
//! default config and once with small limits, so the 413s are checked at both.

mod common;

use std::path::PathBuf;

use common::{PREDICT, Server, batchbox, fixture_sentences, python_wasm, read, wasm, workspace, write_config};
use serde_json::{Value, json};

/// One implementation of the classifier: the tenant's name and its component.
struct Language {
    name: &'static str,
    wasm: PathBuf,
}

/// Rust first: the others are compared with it.
fn languages() -> Vec<Language> {
    let javascript = workspace().join("plugins/target/js/sentence_classifier.wasm");
    assert!(javascript.is_file(), "{} is missing: run `make plugins`", javascript.display());
    vec![
        Language { name: "rust", wasm: wasm("sentence_classifier") },
        Language { name: "python", wasm: python_wasm("sentence_classifier") },
        Language { name: "javascript", wasm: javascript },
    ]
}

/// A tenant's plugin config: the defaults (`{}`), or limits small enough to pass in a test.
#[derive(Clone, Copy)]
enum Limits {
    Default,
    Small,
}

const SMALL: &str = "{ max_sentences: 3, max_sentence_chars: 50 }";

fn route(language: &Language, limits: Limits) -> String {
    match limits {
        Limits::Default => format!("/{}{PREDICT}", language.name),
        Limits::Small => format!("/{}-small{PREDICT}", language.name),
    }
}

/// The server's config up to its tenants.
const HEAD: &str = r#"
models: [{ name: minilm-topics, path: "{model}", device: cpu, cpu_dtype: fp32 }]
api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192, max_batch_ms: 60000 }
server: { bind: "127.0.0.1:0", plugin_cache_dir: "{cache}" }
tenants:
"#;

/// The server's config: two tenants per language, one per `Limits`. `max_batch_ms` at its
/// largest so that the pass-time target never splits a batch: forward passes then depend on the
/// sentences alone, and can be compared between requests.
fn config(name: &str, languages: &[Language], config_of: impl Fn(Limits) -> String) -> PathBuf {
    let mut yaml = String::from(HEAD);
    for language in languages {
        for (limits, suffix) in [(Limits::Default, ""), (Limits::Small, "-small")] {
            yaml += &format!(
                "  - {{ name: {}{suffix}, wasm: \"{}\", routes: [\"{}\"], config: {}, limits: {{ wall_ms: 120000 }} }}\n",
                language.name,
                language.wasm.display(),
                route(language, limits),
                config_of(limits),
            );
        }
    }
    write_config(name, &yaml)
}

fn start() -> (Server, Vec<Language>) {
    let languages = languages();
    let config = config("plugin-languages", &languages, |limits| match limits {
        Limits::Default => "{}".into(),
        Limits::Small => SMALL.into(),
    });
    (Server::launch(&config), languages)
}

#[test]
fn python_and_javascript_classify_the_fixture_as_rust_does() {
    let (server, languages) = start();
    let body = json!({ "sentences": fixture_sentences() }).to_string();
    let answers: Vec<Value> = languages
        .iter()
        .map(|language| {
            let (status, answer) = server.post(&route(language, Limits::Default), &body);
            assert_eq!(status, 200, "{}: {answer}", language.name);
            answer
        })
        .collect();
    let rust = &answers[0];
    assert_eq!(rust["predictions"].as_array().unwrap().len(), 120, "{rust}");
    for (language, answer) in languages.iter().zip(&answers).skip(1) {
        let name = language.name;
        assert_eq!(answer["labels"], rust["labels"], "{name}");
        assert_eq!(answer["predictions"], rust["predictions"], "{name}");
        // Rust's softmax runs in f32, Python's and JavaScript's in f64.
        let (theirs, ours) = (probabilities(answer), probabilities(rust));
        assert_eq!(theirs.len(), ours.len(), "{name}: rows and labels");
        for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
            assert!((a - b).abs() < 1e-5, "{name}: probability {i}: {a} vs {b}");
        }
        // The same fields, and the same values for all but the timings and the passes: each
        // request has passes of its own, and how the scheduler splits 120 sentences into passes
        // follows the pass costs it learns from every pass before (CI saw 4 and then 23).
        assert_eq!(keys(&answer["metadata"]), keys(&rust["metadata"]), "{name}");
        assert_eq!(keys(&answer["metadata"]["breakdown_ms"]), keys(&rust["metadata"]["breakdown_ms"]), "{name}");
        for key in ["total_words", "total_tokens", "num_sentences", "model_version", "truncated"] {
            assert_eq!(answer["metadata"][key], rust["metadata"][key], "{name}: metadata.{key}");
        }
    }
    // Each plugin passes the runtime's count on: one pass per batch id, and at least the 4
    // passes that 120 sentences in passes of 32 rows need.
    for (language, answer) in languages.iter().zip(&answers) {
        let metadata = &answer["metadata"];
        let passes = metadata["forward_passes"].as_u64().unwrap();
        let batches = metadata["batch_ids"].as_array().unwrap().len() as u64;
        assert!(passes == batches && passes >= 4, "{}: {passes} passes, {batches} batch ids", language.name);
    }
}

/// Every probability, row after row.
fn probabilities(answer: &Value) -> Vec<f64> {
    let rows = answer["probabilities"].as_array().unwrap();
    rows.iter().flat_map(|row| row.as_array().unwrap().iter().map(|p| p.as_f64().unwrap())).collect()
}

fn keys(object: &Value) -> Vec<&String> {
    object.as_object().unwrap().keys().collect()
}

/// A request that must fail, with the status and code the README's API table gives it.
struct Mistake {
    what: &'static str,
    limits: Limits,
    method: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn mistakes() -> Vec<Mistake> {
    let post = |what, limits, body: &[u8], status, code| Mistake {
        what,
        limits,
        method: "POST",
        body: body.to_vec(),
        status,
        code,
    };
    let sentences = |n: usize| json!(vec!["a"; n]).to_string().into_bytes();
    let sentence = |text: String| json!([text]).to_string().into_bytes();
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
    use Limits::{Default, Small};
    vec![
        post("an empty body", Default, b"", 400, "invalid_json"),
        post("not JSON", Default, b"{not json", 400, "invalid_json"),
        post("JSON and more", Default, br#"["a"] x"#, 400, "invalid_json"),
        post("not UTF-8", Default, b"[\"\xff\"]", 400, "invalid_json"),
        // What some parsers take and serde_json does not: a byte order mark, an escaped lone
        // surrogate (not Unicode text), nesting 128 deep, NaN, and numbers beyond f64's range.
        post("a byte order mark", Default, b"\xef\xbb\xbf[\"a\"]", 400, "invalid_json"),
        post("a lone surrogate escape", Default, br#"["\ud800"]"#, 400, "invalid_json"),
        post("a lone surrogate escape in a key", Default, br#"{"\udc00": ["a"]}"#, 400, "invalid_json"),
        post("arrays nested 127 deep", Default, &nested(127), 400, "invalid_request"),
        post("arrays nested 128 deep", Default, &nested(128), 400, "invalid_json"),
        post("arrays nested 100,000 deep", Default, &nested(100_000), 400, "invalid_json"),
        post("NaN", Default, br#"["a", NaN]"#, 400, "invalid_json"),
        post("a number beyond f64", Default, br#"["a", 1e400]"#, 400, "invalid_json"),
        post("an integer beyond f64", Default, &format!("[{}]", "9".repeat(400)).into_bytes(), 400, "invalid_json"),
        post("an integer beyond i64", Default, b"[99999999999999999999]", 400, "invalid_request"),
        post("a string", Default, br#""a string""#, 400, "invalid_request"),
        post("a number", Default, b"3", 400, "invalid_request"),
        post("null", Default, b"null", 400, "invalid_request"),
        post("no `sentences`", Default, br#"{"texts": ["a"]}"#, 400, "invalid_request"),
        post("an extra field", Default, br#"{"sentences": ["a"], "extra": 1}"#, 400, "invalid_request"),
        post("`sentences` a string", Default, br#"{"sentences": "a"}"#, 400, "invalid_request"),
        post("`sentences` null", Default, br#"{"sentences": null}"#, 400, "invalid_request"),
        post("an empty sentence", Default, br#"["a", ""]"#, 400, "invalid_request"),
        post("a blank sentence", Default, b"[\"a\", \" \\t\\n \"]", 400, "invalid_request"),
        // U+3000 and U+0085 are Unicode whitespace; JavaScript's trim() does not know U+0085.
        post("a sentence of Unicode spaces", Default, "[\"\u{3000}\u{85}\"]".as_bytes(), 400, "invalid_request"),
        post("a number for a sentence", Default, br#"["a", 3]"#, 400, "invalid_request"),
        post("null for a sentence", Default, br#"["a", null]"#, 400, "invalid_request"),
        post("a boolean for a sentence", Default, br#"["a", true]"#, 400, "invalid_request"),
        post("an array for a sentence", Default, br#"["a", []]"#, 400, "invalid_request"),
        post("an object for a sentence", Default, br#"{"sentences": ["a", {}]}"#, 400, "invalid_request"),
        post("1,001 sentences", Default, &sentences(1001), 413, "too_many_sentences"),
        post("4 sentences over a limit of 3", Small, &sentences(4), 413, "too_many_sentences"),
        post("a sentence of 10,001 characters", Default, &sentence("x".repeat(10_001)), 413, "sentence_too_long"),
        post("a sentence of 51 characters", Small, &sentence("x".repeat(51)), 413, "sentence_too_long"),
        // Characters are code points: not bytes (204 here), nor UTF-16 units (102).
        post("51 emoji", Small, &sentence("😀".repeat(51)), 413, "sentence_too_long"),
        Mistake { method: "GET", ..post("GET", Default, b"", 405, "method_not_allowed") },
        Mistake { method: "PUT", ..post("PUT", Default, br#"["a"]"#, 405, "method_not_allowed") },
    ]
}

/// The status, the JSON body and the `Allow` header of `method` on `path`.
fn ask(server: &Server, method: &str, path: &str, body: &[u8]) -> (u16, Value, Option<String>) {
    let request = ureq::http::Request::builder().method(method).uri(format!("{}{path}", server.base));
    let response = server.agent.run(request.body(body.to_vec()).unwrap()).unwrap();
    let allow = response.headers().get("allow").map(|value| value.to_str().unwrap().to_owned());
    let (status, json) = read(response);
    (status, json, allow)
}

#[test]
fn every_documented_mistake_gets_the_same_status_code_and_message_in_every_language() {
    let (server, languages) = start();
    for mistake in mistakes() {
        let what = mistake.what;
        let answers: Vec<_> = languages
            .iter()
            .map(|language| ask(&server, mistake.method, &route(language, mistake.limits), &mistake.body))
            .collect();
        let (_, rust, rust_allow) = &answers[0];
        for (language, (status, answer, allow)) in languages.iter().zip(&answers) {
            let name = language.name;
            assert_eq!(
                (*status, answer["error"]["code"].as_str()),
                (mistake.status, Some(mistake.code)),
                "{name}, {what}: {answer}"
            );
            assert_eq!(allow, rust_allow, "{name}, {what}: Allow");
            // The JSON parsers word their errors differently; every other message is the SDK's.
            if mistake.code != "invalid_json" {
                assert_eq!(answer["error"]["message"], rust["error"]["message"], "{name}, {what}");
            }
        }
    }
    // Each language still classifies after its mistakes.
    for language in &languages {
        let (status, answer) = server.post(&route(language, Limits::Small), r#"["Still here."]"#);
        assert_eq!(status, 200, "{}: {answer}", language.name);
    }
}

#[test]
fn a_config_the_plugin_cannot_take_stops_startup_in_every_language() {
    for language in languages() {
        let name = language.name;
        let path = config(&format!("plugin-languages-bad-{name}"), &[language], |limits| match limits {
            Limits::Default => r#"{ max_sentences: "3" }"#.into(),
            Limits::Small => SMALL.into(),
        });
        let (ok, text) = batchbox(&["--config", path.to_str().unwrap(), "check-config"], &[("RUST_LOG", "error")]);
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("tenant {name}: the plugin rejected its config")), "{text}");
        assert!(text.contains("max_sentences"), "{text}");
    }
}

/// A body the plugin has no memory to parse is not the client's mistake: it gets 500
/// `plugin_memory_limit` in every language, never 400 `invalid_json` (the JavaScript SDK once took
/// SpiderMonkey's "out of memory" for a parse error). Each limit leaves a few MiB over the
/// plugin's initial memory (Rust 1.1 MiB of 3, Python 12.3 of 15, JavaScript 9.1 of 14): the body
/// fits, what parsing it builds does not. The sentences' encodings stay in the host, so parsing is
/// all there is: those sentences need 5 MiB in Rust and 18 in either interpreter. The 400,000
/// numbers are the body that tells: at these limits, SDKs that took any exception for a parse
/// error answered it with 400 (tried by hand; the ranges that do were 14 to 16 MiB for Python and
/// 13 to 21 for JavaScript).
#[test]
fn a_body_the_plugin_has_no_memory_to_parse_gets_500_in_every_language() {
    let languages = languages();
    let mut yaml = String::from(HEAD);
    for (language, mib) in languages.iter().zip([3, 15, 14]) {
        yaml += &format!(
            "  - {{ name: {}, wasm: \"{}\", routes: [\"{}\"], limits: {{ memory_bytes: {}, wall_ms: 120000 }} }}\n",
            language.name,
            language.wasm.display(),
            route(language, Limits::Default),
            mib << 20,
        );
    }
    let server = Server::launch(&write_config("plugin-languages-memory", &yaml));
    let numbers = format!("[{}1]", "1,".repeat(400_000));
    let sentences = json!(vec!["word ".repeat(350); 1000]).to_string();
    for (what, body) in [("400,000 numbers", numbers), ("1,000 sentences of 1,750 characters", sentences)] {
        for language in &languages {
            let (status, answer) = server.post(&route(language, Limits::Default), &body);
            let code = answer["error"]["code"].as_str();
            assert_eq!((status, code), (500, Some("plugin_memory_limit")), "{}, {what}: {answer}", language.name);
        }
    }
}
