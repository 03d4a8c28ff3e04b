//! What an operator sees. `/metrics`: exact values after a known sequence of requests, the same
//! values in `/v1/models`, `server.metrics_bind` keeping the scrape off the tenants' address, and
//! metrics turned off. Logs: one JSON access line per request.

mod common;

use std::path::PathBuf;

use batchbox_metrics::{Scrape, names};
use common::{PREDICT, Server, workspace, write_config};
use serde_json::{Value, json};

/// Tenant `a` classifies (at most 100 tokens a request), tenant `b` is hostile (50 ms of CPU, and
/// 1 MiB per host call).
fn config(name: &str, server: &str) -> PathBuf {
    write_config(
        name,
        &format!(
            r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}"{server} }}
tenants:
  - {{ name: a, wasm: "{{classifier}}", routes: [{PREDICT}], limits: {{ max_tokens: 100 }} }}
  - {{ name: b, wasm: "{{hostile}}", routes: [/b], limits: {{ cpu_ms: 50, wall_ms: 5000, max_hostcall_bytes: 1048576 }} }}
"#
        ),
    )
}

/// GET `url`: its status and body as text.
fn get_text(server: &Server, url: &str) -> (u16, String) {
    let mut response = server.agent.get(url).call().unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

#[test]
fn a_scrape_counts_exactly_what_happened_and_v1_models_agrees() {
    let server = Server::launch(&config("metrics-exact", ""));
    let two = json!({ "sentences": ["The striker scored twice.", "Parliament passed the budget."] }).to_string();
    for _ in 0..3 {
        assert_eq!(server.post(PREDICT, &two).0, 200);
    }
    assert_eq!(server.post(PREDICT, "[").0, 400);
    let long = json!([vec!["word"; 200].join(" ")]).to_string();
    let (status, answer) = server.post(PREDICT, &long);
    assert_eq!((status, answer["error"]["quota"].as_str()), (429, Some("max_tokens")), "{answer}");
    assert_eq!(server.post("/b/loop", "").0, 500);
    assert_eq!(server.post("/b/ok", "").0, 200);
    assert_eq!(server.post("/b/huge-response?n=2097152", "").0, 429);

    let (status, text) = get_text(&server, &format!("{}/metrics", server.base));
    assert_eq!(status, 200);
    let scrape = Scrape::parse(&text);
    let value = |name: &str, labels: &[(&str, &str)]| scrape.value(name, labels);
    let count = |name: &str, labels: &[(&str, &str)]| value(&format!("{name}_count"), labels);
    let (a, b, model) = (("tenant", "a"), ("tenant", "b"), ("model", "minilm-topics"));

    assert_eq!(value(names::REQUESTS, &[a, ("status", "2xx")]), 3.0);
    assert_eq!(value(names::REQUESTS, &[a, ("status", "4xx")]), 2.0);
    assert_eq!(value(names::REQUESTS, &[b, ("status", "5xx")]), 1.0);
    assert_eq!(value(names::REQUESTS, &[b, ("status", "2xx")]), 1.0);
    assert_eq!(value(names::REQUESTS, &[b, ("status", "4xx")]), 1.0);
    assert_eq!(count(names::REQUEST_SECONDS, &[a]), 5.0);
    assert_eq!(count(names::REQUEST_SECONDS, &[b]), 3.0);
    // Every request ran its plugin, so each has its time split.
    for split in [names::TOKENIZE_SECONDS, names::QUEUE_SECONDS, names::INFERENCE_SECONDS, names::PLUGIN_SECONDS] {
        assert_eq!((count(split, &[a]), count(split, &[b])), (5.0, 3.0), "{split}");
    }
    assert_eq!(value(names::PLUGIN_TRAPS, &[b, ("kind", "cpu")]), 1.0);
    // A response over max_hostcall_bytes: the plugin is stopped, and the quota refused it.
    assert_eq!(value(names::PLUGIN_TRAPS, &[b, ("kind", "hostcall")]), 1.0);
    assert_eq!(value(names::QUOTA_REJECTIONS, &[b, ("quota", "max_hostcall_bytes")]), 1.0);
    for kind in batchbox_metrics::TRAP_KINDS {
        assert_eq!(value(names::PLUGIN_TRAPS, &[a, ("kind", kind)]), 0.0, "{kind}");
    }
    assert_eq!(value(names::QUOTA_REJECTIONS, &[a, ("quota", "max_tokens")]), 1.0);

    // The model: three passes of two sentences each; the refused request never reached it.
    assert_eq!(value(names::BATCHES, &[model]), 3.0);
    assert_eq!(value(names::SEQUENCES, &[model]), 6.0);
    assert_eq!(count(names::BATCH_ROWS, &[model]), 3.0);
    assert_eq!(value(&format!("{}_sum", names::BATCH_ROWS), &[model]), 6.0);
    assert_eq!(count(names::PASS_SECONDS, &[model]), 3.0);
    assert_eq!(value(names::QUEUED_SEQUENCES, &[model]), 0.0);
    let real = value(names::REAL_TOKENS, &[model]);
    assert!(real > 6.0 && value(names::PADDED_TOKENS, &[model]) >= real);
    assert_eq!(value(names::PLUGIN_INSTANCES, &[]), 0.0, "fresh instances are gone after their requests");
    assert!(value(names::CONNECTIONS, &[]) >= 1.0, "the scrape's own connection");
    assert_eq!(value(names::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(text.contains("batchbox_model_info{model=\"minilm-topics\""), "{text}");
    assert!(!text.contains("loop") && !text.contains("striker"), "no path or text in a label");

    let (_, models) = server.get("/v1/models");
    let stats = &models["models"][0]["stats"];
    assert_eq!((stats["batches"].as_u64(), stats["sequences"].as_u64()), (Some(3), Some(6)), "{models}");
    assert_eq!(stats["real_tokens"].as_f64(), Some(real));
}

#[test]
fn metrics_bind_serves_the_scrape_there_and_nowhere_else() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Server::launch(&config("metrics-bind", &format!(", metrics_bind: \"127.0.0.1:{port}\"")));
    assert_eq!(server.post(PREDICT, r#"["The striker scored twice."]"#).0, 200);
    assert_eq!(get_text(&server, &format!("{}/metrics", server.base)).0, 404, "not on the tenants' address");
    let (status, text) = get_text(&server, &format!("http://127.0.0.1:{port}/metrics"));
    assert_eq!(status, 200);
    assert_eq!(Scrape::parse(&text).value(names::REQUESTS, &[("tenant", "a"), ("status", "2xx")]), 1.0);
    for other in ["/health", "/v1/models", PREDICT] {
        assert_eq!(get_text(&server, &format!("http://127.0.0.1:{port}{other}")).0, 404, "{other}");
    }
}

#[test]
fn with_metrics_off_there_is_no_scrape_and_v1_models_shows_no_counters() {
    let server = Server::launch(&config("metrics-off", ", metrics: false"));
    assert_eq!(server.post(PREDICT, r#"["The striker scored twice."]"#).0, 200);
    assert_eq!(get_text(&server, &format!("{}/metrics", server.base)).0, 404);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert!(models["models"][0].get("stats").is_none(), "{models}");
    assert_eq!(models["models"][0]["name"], "minilm-topics");
}

#[test]
fn every_request_has_one_json_access_line_with_its_id_tenant_status_bytes_and_time_split() {
    let log = workspace().join("target/http-tests/observability-access.log");
    let file = std::fs::File::create(&log).unwrap();
    // stderr is a file, not a terminal: JSON without being asked.
    let server = Server::launch_with(&config("observability-access", ""), |command| {
        command.env("RUST_LOG", "error,access=info").stderr(file);
    });
    let response = server.send(PREDICT, r#"["The striker scored twice."]"#, &[]);
    let id = common::request_id(&response);
    let (status, body) = common::read(response);
    assert_eq!(status, 200, "{body}");
    let refused = server.send("/nowhere", "", &[]);
    let refused_id = common::request_id(&refused);
    assert_eq!(refused.status(), 404);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> =
        text.lines().map(|line| serde_json::from_str(line).expect("a JSON object per line")).collect();
    let line = |id: u64| {
        let mut matching = lines.iter().filter(|l| l["target"] == "access" && l["request_id"] == id);
        let line = matching.next().unwrap_or_else(|| panic!("no access line for request {id}:\n{text}"));
        assert!(matching.next().is_none(), "request {id} has one line");
        line.clone()
    };
    let served = line(id);
    assert_eq!((served["tenant"].as_str(), served["status"].as_u64()), (Some("a"), Some(200)), "{served}");
    assert_eq!((served["method"].as_str(), served["path"].as_str()), (Some("POST"), Some(PREDICT)));
    assert!(served["bytes"].as_u64().unwrap() > 100, "{served}");
    let ms = |key: &str| served[key].as_f64().unwrap_or_else(|| panic!("no {key}: {served}"));
    assert!(ms("inference_ms") > 0.0 && ms("tokenize_ms") > 0.0 && ms("plugin_ms") > 0.0, "{served}");
    let parts = ms("tokenize_ms") + ms("queue_ms") + ms("inference_ms") + ms("plugin_ms");
    assert!(parts <= ms("total_ms") + 0.01, "the parts fit in the whole: {served}");
    let refused = line(refused_id);
    assert_eq!((refused["tenant"].as_str(), refused["status"].as_u64()), (Some("-"), Some(404)), "{refused}");
}

/// deploy/prometheus: the scrape config loads the rules, and every rule is complete and names only
/// metrics a running server exports (a renamed metric would leave an alert that never fires).
#[test]
fn the_example_scrape_config_and_alert_rules_name_only_metrics_the_server_exports() {
    let dir = workspace().join("deploy/prometheus");
    let yaml =
        |file: &str| -> Value { yaml_serde::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap() };
    let prometheus = yaml("prometheus.yml");
    assert_eq!(prometheus["rule_files"], json!(["alerts.yml"]));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!((job["job_name"].as_str(), job["metrics_path"].as_str()), (Some("batchbox"), Some("/metrics")));

    // What a server exports once it has served, refused and trapped.
    let server = Server::launch(&config("observability-rules", ""));
    assert_eq!(server.post(PREDICT, r#"["The striker scored twice."]"#).0, 200);
    assert_eq!(server.post("/b/loop", "").0, 500);
    let (_, text) = get_text(&server, &format!("{}/metrics", server.base));
    let exported: std::collections::HashSet<&str> =
        text.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next()).collect();

    let rules = yaml("alerts.yml");
    let rules = rules["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 4, "queue depth, 5xx rate and trap rate at least");
    for rule in rules {
        let alert = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{alert}: no expr"));
        assert!(rule["for"].is_string() && rule["annotations"]["summary"].is_string(), "{alert}: {rule}");
        assert!(["page", "warn"].contains(&rule["labels"]["severity"].as_str().unwrap_or_default()), "{alert}");
        let metrics =
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("batchbox_"));
        for metric in metrics {
            let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| metric.strip_suffix(s)).unwrap_or(metric);
            assert!(exported.contains(family), "{alert}: {metric} is not a metric the server exports");
        }
    }
    let all: String = rules.iter().map(|r| r["expr"].as_str().unwrap()).collect();
    for needed in ["batchbox_model_queued_tokens", "batchbox_requests_total", "batchbox_plugin_traps_total"] {
        assert!(all.contains(needed), "no alert on {needed}");
    }
}
