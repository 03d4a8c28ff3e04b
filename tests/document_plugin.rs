//! The document classifier (plugins/python/document_classifier, a Python plugin) splits documents
//! into sentences as its docs say, classifies them as the Rust sentence classifier does, in one
//! forward pass, and sums them up per document consistently with its own per-sentence answers.

mod common;

use common::{PREDICT, Server, python_wasm, write_config};
use serde_json::{Value, json};

const DOCUMENTS: &str = "/api/v1/classify/documents";

/// The example in the plugin's docs, and the sentences they say it splits into.
const DOCUMENTED: &str = "Dr. Smith met J. R. R. Tolkien at 3.30 p.m. on Monday. Was it late? Yes!\n\nNo title";
const DOCUMENTED_SENTENCES: [&str; 4] =
    ["Dr. Smith met J. R. R. Tolkien at 3.30 p.m. on Monday.", "Was it late?", "Yes!", "No title"];

fn start() -> Server {
    let config = write_config(
        "document-plugin",
        &format!(
            r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - name: sentences
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    limits: {{ wall_ms: 120000 }}
  - name: documents
    wasm: "{}"
    routes: [{DOCUMENTS}]
    config: {{ max_documents: 3, max_document_chars: 400, max_sentences: 10 }}
    limits: {{ memory_bytes: 67108864, wall_ms: 120000 }}
"#,
            python_wasm("document_classifier").display()
        ),
    );
    Server::launch(&config)
}

fn texts(answer: &Value) -> Vec<&str> {
    answer["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect()
}

fn floats(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect()
}

/// The first index of the largest value, as the plugins' `argmax`.
fn argmax(values: &[f64]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

#[test]
fn the_documented_paragraph_splits_into_the_documented_sentences_normalised() {
    let server = start();
    // Decomposed "é" (e + U+0301) comes back composed (NFC); runs of whitespace become one space.
    let messy = "  Caf\u{65}\u{301} prices\t rose\n again.   Tea fell!  ";
    let (status, answer) = server.post(DOCUMENTS, json!({ "documents": [DOCUMENTED, messy] }).to_string());
    assert_eq!(status, 200, "{answer}");
    let mut expected = DOCUMENTED_SENTENCES.to_vec();
    expected.extend(["Caf\u{e9} prices rose again.", "Tea fell!"]);
    assert_eq!(texts(&answer), expected);
    let owners: Vec<u64> =
        answer["sentences"].as_array().unwrap().iter().map(|s| s["document"].as_u64().unwrap()).collect();
    assert_eq!(owners, [0, 0, 0, 0, 1, 1]);
}

#[test]
fn sentences_match_the_rust_classifier_in_one_forward_pass_and_documents_sum_them_up() {
    let server = start();
    let body = json!({ "documents": [
        DOCUMENTED,
        // Sports and politics, one sentence each: a tie that the mean probability breaks.
        { "id": "tie", "text": "The striker scored twice. Parliament passed the budget." },
        { "id": "markets", "text": "Shares fell 4% today. The central bank raised rates. Investors sold bonds." },
    ]});
    let (status, answer) = server.post(DOCUMENTS, body.to_string());
    assert_eq!(status, 200, "{answer}");
    let labels = answer["labels"].as_array().unwrap();
    let sentences = answer["sentences"].as_array().unwrap();
    let documents = answer["documents"].as_array().unwrap();
    assert_eq!((sentences.len(), documents.len()), (9, 3), "{answer}");

    // Every sentence, classified once in a single forward pass.
    let metadata = &answer["metadata"];
    assert_eq!((metadata["num_documents"].as_u64(), metadata["num_sentences"].as_u64()), (Some(3), Some(9)));
    assert_eq!(metadata["forward_passes"], 1, "{metadata}");
    assert_eq!(metadata["batch_ids"].as_array().unwrap().len(), 1, "{metadata}");

    // The Rust sentence classifier, given the split sentences, says the same of each.
    let (status, rust) = server.post(PREDICT, json!({ "sentences": texts(&answer) }).to_string());
    assert_eq!(status, 200, "{rust}");
    assert_eq!(&rust["labels"], &answer["labels"]);
    assert_eq!(metadata["total_tokens"], rust["metadata"]["total_tokens"]);
    for (i, sentence) in sentences.iter().enumerate() {
        assert_eq!(sentence["label"], rust["predictions"][i], "sentence {i}");
        let (python, rust) = (floats(&sentence["probabilities"]), floats(&rust["probabilities"][i]));
        assert!(python.iter().zip(&rust).all(|(p, r)| (p - r).abs() < 1e-5), "sentence {i}: {python:?} vs {rust:?}");
    }

    // Each document's summary, recomputed from its own sentences.
    for (d, document) in documents.iter().enumerate() {
        let rows: Vec<Vec<f64>> =
            sentences.iter().filter(|s| s["document"] == d).map(|s| floats(&s["probabilities"])).collect();
        assert_eq!(document["num_sentences"], rows.len(), "document {d}");
        let mean: Vec<f64> =
            (0..labels.len()).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64).collect();
        let given = floats(&document["mean_probabilities"]);
        assert!(mean.iter().zip(&given).all(|(m, g)| (m - g).abs() < 1e-12), "document {d}: {given:?} vs {mean:?}");
        assert_eq!(document["mean_label"], labels[argmax(&mean)], "document {d}");
        let mut counts = vec![0u64; labels.len()];
        rows.iter().for_each(|row| counts[argmax(row)] += 1);
        assert_eq!(document["label_counts"], json!(counts), "document {d}");
        // The most counted label; a tie goes to the higher mean, then to the first label.
        let majority = (0..labels.len())
            .max_by(|&a, &b| counts[a].cmp(&counts[b]).then(mean[a].total_cmp(&mean[b])).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(document["majority_label"], labels[majority], "document {d}");
    }
    assert_eq!(documents[0]["id"], Value::Null);
    assert_eq!((&documents[1]["id"], &documents[2]["id"]), (&json!("tie"), &json!("markets")));
    assert_eq!(documents[1]["label_counts"].as_array().unwrap().iter().filter(|c| **c == 1).count(), 2, "a tie");
}

#[test]
fn bad_requests_get_the_documented_4xx_naming_the_item() {
    let server = start();
    let eleven = ["One. Two. Three. Four. Five.", "Six. Seven. Eight. Nine. Ten. Eleven."];
    let cases: [(String, u16, &str, &str); 14] = [
        (String::new(), 400, "invalid_json", "empty"),
        ("{not json".into(), 400, "invalid_json", "invalid JSON"),
        (r#"{"texts": ["a"]}"#.into(), 400, "invalid_request", "missing field `documents`"),
        (r#"{"documents": "a"}"#.into(), 400, "invalid_request", "`documents` must be an array of documents"),
        (r#"["a", 3]"#.into(), 400, "invalid_request", "documents[1] must be a string or an object, not a number"),
        ("[\"a\", \" \\n \"]".into(), 400, "invalid_request", "documents[1] is empty"),
        (r#"[{"id": "a"}]"#.into(), 400, "invalid_request", "documents[0]: missing field `text`"),
        (
            r#"[{"text": "a", "id": 7}]"#.into(),
            400,
            "invalid_request",
            "documents[0].id must be a string, not a number",
        ),
        (r#"[{"text": "a", "lang": "en"}]"#.into(), 400, "invalid_request", "documents[0]: unknown field `lang`"),
        (r#"["a", {"text": "\t"}]"#.into(), 400, "invalid_request", "documents[1].text is empty"),
        (r#"["a", "b", "c", "d"]"#.into(), 413, "too_many_documents", "4 documents in one request; the limit is 3"),
        (
            json!(["x".repeat(401)]).to_string(),
            413,
            "document_too_long",
            "documents[0] has 401 characters; the limit is 400",
        ),
        (
            json!(eleven).to_string(),
            413,
            "too_many_sentences",
            "documents[1] brings the request to 11 sentences; the limit is 10",
        ),
        (
            json!(["a", { "text": "x".repeat(401), "id": "long" }]).to_string(),
            413,
            "document_too_long",
            "documents[1].text has 401",
        ),
    ];
    for (body, status, code, says) in cases {
        let (got, answer) = server.post(DOCUMENTS, &body);
        common::assert_json_error(got, &answer, status, code, &body);
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{body}: {answer}");
    }
    let response = server.agent.get(format!("{}{DOCUMENTS}", server.base)).call().unwrap();
    assert_eq!(response.headers().get("allow").unwrap(), "POST");
    let (status, answer) = common::read(response);
    common::assert_json_error(status, &answer, 405, "method_not_allowed", "GET");

    // No documents is no work: 200 with nothing in it, and no forward pass.
    let (status, answer) = server.post(DOCUMENTS, r#"{"documents": []}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["sentences"].clone(), answer["documents"].clone()), (json!([]), json!([])));
    assert_eq!(answer["metadata"]["forward_passes"], 0);
}
