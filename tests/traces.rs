//! OpenTelemetry trace export (the `otel` cargo feature): the real server sends its spans over
//! OTLP/HTTP (JSON) to a collector this test plays, and each request's trace has the shape the
//! README promises: request → plugin → tokenize and infer → the model's batch.
//!
//! Built only with the feature, which is a default one: `make test` runs it with the rest.
#![cfg(feature = "otel")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PREDICT, Server, predict_body, write_config};
use serde_json::Value;

/// A collector: answers every OTLP/HTTP export with 200 and keeps the JSON bodies.
fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let bodies = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let bodies = bodies.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                // Requests on one connection until the exporter closes it.
                loop {
                    let mut length = None;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse::<usize>().ok();
                        }
                    }
                    let mut body = vec![0; length.expect("exports carry a content-length")];
                    reader.read_exact(&mut body).unwrap();
                    bodies.lock().unwrap().push(serde_json::from_slice(&body).expect("OTLP JSON"));
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    writer.write_all(answer.as_bytes()).unwrap();
                }
            });
        }
    });
    (address, received)
}

/// One exported span.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    links: Vec<String>,
    attributes: Value,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<String> {
        let value = &self.attributes.as_array()?.iter().find(|a| a["key"] == key)?["value"];
        let value = value.as_object()?.values().next()?;
        Some(value.as_str().map_or_else(|| value.to_string(), str::to_owned))
    }
}

fn spans(bodies: &[Value]) -> Vec<Span> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    bodies
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
        .map(|s| Span {
            name: text(&s["name"]),
            trace: text(&s["traceId"]),
            id: text(&s["spanId"]),
            parent: text(&s["parentSpanId"]),
            links: s["links"].as_array().into_iter().flatten().map(|l| text(&l["spanId"])).collect(),
            attributes: s["attributes"].clone(),
        })
        .collect()
}

/// The trace and span a client sends in its `traceparent` (W3C Trace Context's own example).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// A trace the client does not sample (flags 00).
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

#[test]
fn each_request_is_traced_from_the_request_through_its_plugin_to_the_models_passes_and_joins_a_client_trace() {
    let (endpoint, received) = collector();
    let config = write_config(
        "traces",
        &format!(
            r#"{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}" }}
tenants: [{{ name: sentence-classifier, wasm: "{{classifier}}", routes: [{PREDICT}] }}]
"#
        ),
    );
    let server = Server::launch_with_env(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    // Four requests at once, so that passes serve several of them.
    std::thread::scope(|scope| {
        for i in 0..4 {
            let server = &server;
            scope.spawn(move || {
                server.predict(&["The striker scored twice.", &format!("Parliament passed budget {i}.")])
            });
        }
    });

    // A fifth from a client that traces its own calls: it joins the client's trace.
    // A sixth whose client does not sample its trace: it starts its own, recorded as usual.
    for traceparent in [format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"), format!("00-{UNSAMPLED_TRACE}-{CLIENT_SPAN}-00")]
    {
        let (status, body) = server.post_with(PREDICT, predict_body(), &[("traceparent", &traceparent)]);
        assert_eq!(status, 200, "{body}");
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = spans(&received.lock().unwrap());
        if spans.iter().filter(|s| s.name == "request" && s.attribute("path").as_deref() == Some(PREDICT)).count() == 6
            && spans.iter().any(|s| s.name == "batch")
        {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans exported so far: {spans:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };

    let child = |parent: &Span, name: &str| -> Span {
        spans
            .iter()
            .find(|s| s.name == name && s.parent == parent.id && s.trace == parent.trace)
            .unwrap_or_else(|| panic!("no {name} span under {parent:?}"))
            .clone()
    };
    for request in spans.iter().filter(|s| s.name == "request" && s.attribute("path").as_deref() == Some(PREDICT)) {
        if request.trace == CLIENT_TRACE {
            assert_eq!(request.parent, CLIENT_SPAN, "the request is a child of the client's span");
        } else {
            assert_eq!(request.parent, "", "a request without traceparent starts its trace");
        }
        assert_eq!(request.attribute("status").as_deref(), Some("200"), "{request:?}");
        assert_eq!(request.attribute("tenant").as_deref(), Some("sentence-classifier"), "{request:?}");
        let plugin = child(request, "plugin");
        child(&plugin, "tokenize");
        let infer = child(&plugin, "infer");
        // Its pass is in its own trace, or, when the pass was first another request's, linked to it.
        let computed_by =
            spans.iter().filter(|s| s.name == "batch" && (s.parent == infer.id || s.links.contains(&infer.id))).count();
        assert!(computed_by >= 1, "no batch span computed {infer:?}");
    }
    let joined = spans.iter().filter(|s| s.name == "request" && s.trace == CLIENT_TRACE).count();
    assert_eq!(joined, 1, "the request with traceparent joined its client's trace");
    assert!(spans.iter().all(|s| s.trace != UNSAMPLED_TRACE), "an unsampled traceparent is not joined");
    let batch = spans.iter().find(|s| s.name == "batch").unwrap();
    assert!(batch.attribute("rows").is_some() && batch.attribute("padded_len").is_some(), "{batch:?}");
}
