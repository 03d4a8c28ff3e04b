//! The HTTP edge against clients that hold sockets: slow headers, stalled bodies, idle
//! connections, thousands of idle sockets, running out of descriptors, and HTTP/2. Each attack
//! is followed by a normal request that must succeed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PREDICT, Server, assert_json_error, write_config};
use serde_json::{Value, json};

/// The default tenant alone, one request at a time (so a held slot would show as a 429), with
/// the connection limits in `server`.
fn config(name: &str, server: &str) -> PathBuf {
    write_config(
        name,
        &format!(
            r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}", {server} }}
tenants:
  - name: classifier
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    limits: {{ max_concurrent: 1 }}
"#
        ),
    )
}

fn body() -> String {
    json!({ "sentences": ["The striker scored twice."] }).to_string()
}

fn assert_served(server: &Server, after: &str) {
    let (status, body) = server.post(PREDICT, body());
    assert_eq!(status, 200, "after {after}: {body}");
    assert_eq!(body["predictions"], json!(["sports"]), "after {after}");
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Reads until the server closes the connection; returns what it sent and how long that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was still open after {:?}: {e}", started.elapsed()),
        }
    }
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

/// Reads the head of one response, lower-cased.
fn read_head(stream: &mut TcpStream) -> String {
    let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before a whole head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// Reads one response with a `content-length`, leaving the connection open: its head (lower-cased)
/// and its body.
fn read_response(stream: &mut TcpStream) -> (String, String) {
    let head = read_head(stream);
    let length = head.split("content-length: ").nth(1).unwrap().split("\r\n").next().unwrap();
    let mut body = vec![0u8; length.parse().unwrap()];
    stream.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

fn assert_within(elapsed: Duration, limit_ms: u64, what: &str) {
    let limit = Duration::from_millis(limit_ms);
    // Not before the limit (it is the timeout that closed it), and not long after (it did close).
    assert!(
        elapsed >= limit.mul_f64(0.9) && elapsed <= limit + Duration::from_secs(2),
        "{what}: closed after {elapsed:?}, limit {limit:?}"
    );
}

#[test]
fn slow_headers_stalled_bodies_and_idle_connections_are_closed_within_their_timeouts() {
    let server = Server::launch(&config(
        "edge-timeouts",
        "header_read_timeout_ms: 1500, keep_alive_idle_ms: 700, body_read_timeout_ms: 1000",
    ));
    let host = format!("host: {}\r\n", server.address());

    // Headers that never finish: closed at the header-read timeout, without a response.
    let mut stream = connect(&server);
    stream
        .write_all(format!("POST {PREDICT} HTTP/1.1\r\n{host}content-type: application/json\r\n").as_bytes())
        .unwrap();
    let (answer, elapsed) = read_until_closed(&mut stream);
    assert_within(elapsed, 1500, "slow headers");
    assert!(answer.is_empty(), "{answer:?}");
    assert_served(&server, "slow headers");

    // A body that stalls, and one that trickles: 408 at the body timeout, and the tenant's only
    // slot is free again at once.
    for trickle in [false, true] {
        let mut stream = connect(&server);
        stream
            .write_all(
                format!("POST {PREDICT} HTTP/1.1\r\n{host}content-length: 1000\r\n\r\n{{\"sentences\"").as_bytes(),
            )
            .unwrap();
        let started = Instant::now();
        if trickle {
            let mut writer = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                while writer.write_all(b" ").is_ok() && started.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let (answer, _) = read_until_closed(&mut stream);
        assert_within(started.elapsed(), 1000, "slow body");
        let (head, json) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response: {answer:?}"));
        assert!(
            head.starts_with("HTTP/1.1 408") && head.contains("x-request-id") && head.contains("connection: close"),
            "{head}"
        );
        let json: Value = serde_json::from_str(json).unwrap();
        assert_json_error(408, &json, 408, "body_timeout", "slow body");
        assert_served(&server, "slow body");
    }

    // A kept-alive connection with no request in flight: closed at the idle timeout.
    let mut stream = connect(&server);
    stream.write_all(format!("GET /health HTTP/1.1\r\n{host}\r\n").as_bytes()).unwrap();
    let mut first = [0u8; 1024];
    let n = stream.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..n]));
    let (_, elapsed) = read_until_closed(&mut stream);
    assert_within(elapsed, 700, "idle keep-alive");
    assert_served(&server, "idle keep-alive");
}

#[test]
fn two_thousand_idle_connections_neither_stop_a_request_nor_stay_open() {
    let server = Server::launch(&config("edge-idle", "header_read_timeout_ms: 4000, keep_alive_idle_ms: 4000"));
    let idle: Vec<TcpStream> = (0..2000).map(|_| connect(&server)).collect();
    let started = Instant::now();
    assert_served(&server, "2,000 idle connections");
    assert!(started.elapsed() < Duration::from_secs(3), "served in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(6));
    for mut stream in idle {
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (answer, _) = read_until_closed(&mut stream);
        assert!(answer.is_empty(), "{answer:?}");
    }
}

#[test]
fn running_out_of_descriptors_is_survived_with_a_short_log() {
    let log = common::workspace().join("target/http-tests/edge-descriptors.log");
    // The held sockets stay open for 3 s: long enough that the server runs out however slowly
    // the test opens them, short enough that it comes back soon.
    let config =
        config("edge-descriptors", "header_read_timeout_ms: 3000, keep_alive_idle_ms: 3000, max_connections: 1000");
    let stderr = std::fs::File::create(&log).unwrap();
    let server = Server::launch_with(&config, |command| {
        command.env("RUST_LOG", "warn").stderr(Stdio::from(stderr));
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    // Far more sockets than the server has descriptors: it runs out, and must come back once the
    // header timeout closes the ones it holds.
    let held: Vec<TcpStream> = (0..600).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let open = std::fs::read_dir(format!("/proc/{}/fd", server.child.id())).unwrap().count();
    assert!(open >= 250, "the server holds {open} descriptors of its 256: the test did not exhaust them");
    let started = Instant::now();
    assert_served(&server, "running out of descriptors");
    let waited = started.elapsed();
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    assert_served(&server, "the held sockets closing");
    let log = std::fs::read_to_string(&log).unwrap();
    let failures = log.matches("accept failed").count();
    assert!(failures >= 1, "the server never ran out of descriptors; the test proves nothing:\n{log}");
    assert!(
        log.len() < 16 << 10 && failures <= 10,
        "{failures} accept warnings, {} bytes of log (served after {waited:?})",
        log.len()
    );
}

#[test]
fn http2_with_prior_knowledge_is_served_under_the_same_limits() {
    let server = Server::launch(&config(
        "edge-http2",
        "keep_alive_idle_ms: 1000, max_header_bytes: 16384, http2_max_concurrent_streams: 7",
    ));
    let address = server.address().to_owned();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();

        let send = |client: &mut h2::client::SendRequest<bytes::Bytes>, extra: Option<(&str, String)>| {
            let mut request =
                http::Request::post(format!("http://{address}{PREDICT}")).header("content-type", "application/json");
            if let Some((name, value)) = extra {
                request = request.header(name, value);
            }
            let (response, mut stream) = client.send_request(request.body(()).unwrap(), false).unwrap();
            stream.send_data(body().into(), true).unwrap();
            response
        };
        let response = send(&mut client, None).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        let mut data = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = data.data().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["predictions"], json!(["sports"]));
        // The server's SETTINGS arrived with its first response.
        assert_eq!(client.current_max_send_streams(), 7, "SETTINGS_MAX_CONCURRENT_STREAMS");

        // Headers past max_header_bytes are refused before they reach a tenant.
        let refused = send(&mut client, Some(("x-padding", "x".repeat(20_000)))).await.unwrap();
        assert_eq!(refused.status(), 431);

        // With nothing in flight, the connection is closed at the idle timeout.
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("the idle HTTP/2 connection was closed")
            .unwrap()
            .ok();
        assert_within(started.elapsed(), 1000, "idle HTTP/2");
    });
    assert_served(&server, "HTTP/2");
}

/// README "Errors" lists the responses hyper writes before a request exists, which therefore
/// carry no JSON body and no `x-request-id`; this keeps that list true.
#[test]
fn only_the_documented_parse_errors_answer_without_json() {
    let server = Server::launch(&config("edge-parse-errors", "max_header_bytes: 16384"));
    let host = format!("host: {}\r\n", server.address());
    let cases = [
        ("NOT A REQUEST\r\n\r\n".to_owned(), "400"),
        (format!("GET /health HTTP/1.1\r\n{host}x-big: {}\r\n\r\n", "x".repeat(20_000)), "431"),
        (format!("GET /{} HTTP/1.1\r\n{host}\r\n", "x".repeat(70_000)), "431"),
    ];
    for (request, status) in cases {
        let mut stream = connect(&server);
        let _ = stream.write_all(request.as_bytes());
        let (answer, _) = read_until_closed(&mut stream);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert!(body.is_empty() && !head.contains("x-request-id"), "{answer:?}");
        assert_served(&server, status);
    }
}

#[test]
fn an_answer_sent_without_reading_the_body_keeps_the_connection_only_if_the_body_came() {
    let server = Server::launch(&config("edge-early-answer", "keep_alive_idle_ms: 10000"));
    let host = server.address().to_owned();
    let mut stream = connect(&server);
    // POST /nowhere declaring `declared` bytes of body and sending `sent`: the response's head,
    // lower-cased (its body read too).
    let post = |stream: &mut TcpStream, declared: usize, sent: &str| {
        let request = format!("POST /nowhere HTTP/1.1\r\nhost: {host}\r\ncontent-length: {declared}\r\n\r\n{sent}");
        stream.write_all(request.as_bytes()).unwrap();
        read_response(stream).0
    };
    // Without a body, a refusal leaves the connection open for the next request.
    let first = post(&mut stream, 0, "");
    assert!(first.starts_with("http/1.1 404") && !first.contains("connection: close"), "{first}");
    // A small body that arrives with its request is read and dropped: the connection stays.
    let kept = post(&mut stream, 5, "hello");
    assert!(kept.starts_with("http/1.1 404") && !kept.contains("connection: close"), "{kept}");
    // With a body that does not come, the 404 says the connection closes; then it does.
    let second = post(&mut stream, 5, "");
    assert!(second.starts_with("http/1.1 404") && second.contains("connection: close"), "{second}");
    let (_, waited) = read_until_closed(&mut stream);
    assert!(waited < Duration::from_secs(5), "still open after {waited:?}");
    assert_served(&server, "an early answer");
}

#[test]
fn a_request_refused_before_its_body_gets_its_final_status_without_100_continue() {
    let config = write_config(
        "edge-expect-continue",
        &format!(
            r#"
{{model_and_api}}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}", max_body_bytes: 1048576 }}
tenants:
  - {{ name: a, wasm: "{{classifier}}", routes: [{PREDICT}], keys: [env:EDGE_KEY_A], limits: {{ max_concurrent: 1 }} }}
  - {{ name: b, wasm: "{{classifier}}", routes: [/b], keys: [env:EDGE_KEY_B] }}
"#
        ),
    );
    let server = Server::launch_with_env(&config, &[("EDGE_KEY_A", "key-of-a"), ("EDGE_KEY_B", "key-of-b")]);
    let host = server.address().to_owned();
    // Sends a request's head with `Expect: 100-continue` and no body; answers the first head the
    // server sends back, lower-cased, and the connection.
    let ask = |path: &str, key: Option<&str>, length: usize| {
        let mut stream = connect(&server);
        let authorization = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\n{authorization}content-type: application/json\r\n\
             expect: 100-continue\r\ncontent-length: {length}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        (read_head(&mut stream), stream)
    };
    let body = body();
    // Let through: the client is told to send its body, and is answered once it has.
    let (head, mut holding) = ask(PREDICT, Some("key-of-a"), body.len());
    assert!(head.starts_with("http/1.1 100 continue"), "{head}");
    // While that request holds tenant a's only slot, every refusal comes without `100 Continue`:
    // the final status, `Connection: close`, and the connection closed without waiting for a body.
    let refusals = [
        (PREDICT, None, 100_000, "401"),
        (PREDICT, Some("key-of-b"), 100_000, "403"),
        ("/nowhere", Some("key-of-a"), 100_000, "404"),
        ("/b", Some("key-of-b"), 2 << 20, "413"),
        (PREDICT, Some("key-of-a"), 100, "429"),
    ];
    for (path, key, length, status) in refusals {
        let (head, mut stream) = ask(path, key, length);
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{path} {key:?}: {head}");
        assert!(head.contains("connection: close"), "{path} {key:?}: {head}");
        let (rest, waited) = read_until_closed(&mut stream);
        assert!(waited < Duration::from_secs(5), "{status}: still open after {waited:?}");
        let error: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{status}: {e}: {rest:?}"));
        assert!(error["error"]["code"].is_string(), "{status}: {rest}");
    }
    holding.write_all(body.as_bytes()).unwrap();
    let (head, answer) = read_response(&mut holding);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["predictions"], json!(["sports"]));
}
