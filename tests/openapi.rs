//! `GET /openapi.json`: the host's routes and each tenant's, with the schemas its plugin
//! describes; validated by a maintained validator (openapi-spec-validator, pinned in
//! tools/requirements.txt).

mod common;

use std::process::Command;

use common::{PREDICT, Server, js_wasm, python_wasm, workspace, write_config};
use serde_json::json;

#[test]
fn the_document_validates_and_describes_the_bundled_plugins_routes_and_schemas() {
    let config = write_config(
        "openapi",
        &format!(
            r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants:
  - {{ name: a, wasm: "{{classifier}}", routes: [{PREDICT}], keys: ["sha256:{key}"], config: {{ max_sentences: 50 }} }}
  - {{ name: b, wasm: "{{hostile}}", routes: [/b] }}
  - {{ name: py, wasm: "{py}", routes: [/py/sentences], config: {{ max_sentences: 50 }} }}
  - {{ name: js, wasm: "{js}", routes: [/js/sentences], config: {{ max_sentences: 50 }} }}
  - {{ name: docs, wasm: "{docs}", routes: [/docs], config: {{ max_documents: 7 }} }}
"#,
            key = "0".repeat(64),
            py = python_wasm("sentence_classifier").display(),
            js = js_wasm("sentence_classifier").display(),
            docs = python_wasm("document_classifier").display(),
        ),
    );
    let server = Server::launch(&config);
    let (status, document) = server.get("/openapi.json");
    assert_eq!(status, 200, "{document}");
    let file = workspace().join("target/http-tests/openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&document).unwrap()).unwrap();
    let validator = workspace().join(".venv/bin/openapi-spec-validator");
    let output =
        Command::new(&validator).arg(&file).output().unwrap_or_else(|e| panic!("{}: {e}", validator.display()));
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    assert_eq!(document["openapi"], "3.1.0");
    let paths = &document["paths"];
    for host_route in ["/health", "/ready", "/v1/models", "/metrics", "/openapi.json"] {
        assert!(paths[host_route]["get"].is_object(), "{host_route} in {paths}");
    }
    // The host's pages under every tenant's route: /info keyed as the tenant is, /health public.
    let info = &paths[format!("{PREDICT}/info")]["get"];
    assert_eq!((info["tags"].clone(), info["security"].clone()), (json!(["a"]), json!([{ "bearer": [] }])));
    assert!(paths[format!("{PREDICT}/health")]["get"]["security"].is_null(), "{paths}");
    assert!(paths["/b/info"]["get"]["security"].is_null() && paths["/b/health"]["get"].is_object(), "{paths}");
    // Tenant a: its plugin's description, under its route, with its key and its configured limits.
    let post = &paths[PREDICT]["post"];
    let body = &post["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(body["$ref"], "#/components/schemas/a.Sentences");
    assert_eq!((post["tags"].clone(), post["security"].clone()), (json!(["a"]), json!([{ "bearer": [] }])));
    let schemas = &document["components"]["schemas"];
    let sentences = &schemas["a.Sentences"]["oneOf"][1];
    assert_eq!((sentences["maxItems"].as_u64(), sentences["items"]["maxLength"].as_u64()), (Some(50), Some(10_000)));
    let prediction = &schemas["a.Prediction"]["properties"];
    for field in ["probabilities", "labels", "predictions", "metadata"] {
        assert!(prediction[field].is_object(), "a.Prediction.{field}");
    }
    let answer = &post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(answer, "#/components/schemas/a.Prediction");
    assert_eq!(
        post["responses"]["429"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/a.Error"
    );
    // The Python and JavaScript twins describe the same API; the document classifier its own.
    for twin in ["py", "js"] {
        for schema in ["Sentences", "Prediction", "Error"] {
            assert_eq!(schemas[format!("{twin}.{schema}")], schemas[format!("a.{schema}")], "{twin}.{schema}");
        }
        let route = format!("/{twin}/sentences");
        let responses = paths[PREDICT]["post"]["responses"].to_string().replace("/a.", &format!("/{twin}."));
        assert_eq!(paths[&route]["post"]["responses"].to_string(), responses, "{route}");
    }
    let documents = &paths["/docs"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(documents["$ref"], "#/components/schemas/docs.Documents");
    assert_eq!(schemas["docs.Documents"]["oneOf"][1]["maxItems"], 7);
    assert!(schemas["docs.DocumentPrediction"]["properties"]["documents"].is_object());
    // Tenant b: listed, though its plugin describes nothing.
    assert!(paths["/b"]["description"].as_str().unwrap().contains("describes no API"), "{}", paths["/b"]);
    // Every reference resolves.
    let text = document.to_string();
    for reference in text.split("\"#/components/schemas/").skip(1).map(|rest| rest.split('"').next().unwrap()) {
        assert!(schemas[reference].is_object(), "{reference} does not resolve");
    }
}
