//! SIGTERM under load: the real server binary, the default model, 64 clients over real sockets
//! (the `loadgen` binary in its drain mode), and the signal sent while they are all waiting.
//!
//! **What "accepted" means here.** A request is accepted when the server has accepted its
//! connection, that is taken it from the listen queue, and must then be answered, whatever the
//! signal. A request is *not* accepted when its connection was refused (the server no longer
//! listens) or was still in the listen queue when the listener closed: the kernel resets those.
//! Each request goes on a connection of its own (`Connection: close`), so the client can tell
//! the cases apart on the socket: an answer, a refusal, a reset (never accepted, or closed by the
//! server without reading what was sent), or a clean close without a whole answer (the server
//! accepted the connection and dropped the request). Keep-alive is left out on purpose: a server
//! may close an idle persistent connection at any time (RFC 9112 §9.6), so a request written on
//! one just then is lost without the server's fault, and the client cannot tell that from a drop.
//! The claim is that none is dropped.
//!
//! Alone in its test binary: it loads the 2-core machine with 64 clients.

mod common;

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{PREDICT, Server, fixture_sentences, workspace, write_config};
use serde_json::{Value, json};

const CLIENTS: usize = 64;
const GRACE_MS: u64 = 30_000;

/// The default model in fp32 and the sentence classifier, public, with room for every client.
fn config() -> PathBuf {
    write_config(
        "drain",
        &format!(
            r#"
models: [{{ name: minilm-topics, path: "{{model}}", device: cpu, cpu_dtype: fp32 }}]
api: {{ inference_batch_size: 32, max_batch_tokens: 8192, use_fp16: true, max_queue_delay_ms: 2 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{{cache}}", shutdown_grace_ms: {GRACE_MS} }}
tenants:
  - name: sentence-classifier
    wasm: "{{classifier}}"
    routes: [{PREDICT}]
    limits: {{ wall_ms: 120000, max_concurrent: 256 }}
"#
        ),
    )
}

/// Requests of four fixture sentences each: 64 of them keep the model busy for seconds on this
/// CPU, so the signal finds every client waiting for an answer, and the drain lasts long enough
/// to see new connections refused while it runs.
fn requests_file() -> PathBuf {
    let sentences = fixture_sentences();
    let lines: Vec<String> = sentences.chunks(4).map(|chunk| json!({ "sentences": chunk }).to_string()).collect();
    let path = workspace().join("target/http-tests/drain-requests.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Waits for the server to exit, for at most `limit`.
fn wait_for_exit(server: &mut Server, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count(outcomes: &Value, outcome: &str) -> u64 {
    outcomes[outcome].as_u64().unwrap_or(0)
}

#[test]
fn sigterm_under_64_clients_answers_every_accepted_request_refuses_new_connections_and_exits_0_within_the_grace() {
    let mut server = Server::launch(&config());
    // Enough requests that the clients are still sending when the server has gone.
    let output = Command::new(common::loadgen())
        .current_dir(workspace())
        .args(["--server", &server.base, "--requests-file", requests_file().to_str().unwrap()])
        .args(["--concurrency", &CLIENTS.to_string(), "--requests", "100000", "--duration", "600", "--json"])
        .args(["--pid", &server.child.id().to_string(), "--sigterm-after", &(2 * CLIENTS).to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "loadgen failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    println!("{report}");
    let drain = &report["drain"];
    let (in_flight, after) = (&drain["in_flight"], &drain["sent_after_signal"]);

    // The signal came under load: nearly every client had a request out.
    let at_signal = drain["in_flight_at_signal"].as_u64().unwrap();
    assert!(at_signal >= CLIENTS as u64 / 2, "only {at_signal} requests in flight at the signal: {drain}");
    // The claim: no accepted request was dropped, before or after the signal.
    assert_eq!(count(in_flight, "dropped"), 0, "requests in flight at the signal were dropped: {drain}");
    assert_eq!(count(after, "dropped"), 0, "requests sent after the signal were dropped: {drain}");
    // Most requests in flight were waiting for the model (it takes seconds), so were answered;
    // only connections still in the listen queue may have been reset.
    assert!(count(in_flight, "answered") * 2 >= at_signal, "most requests in flight went unanswered: {drain}");
    // New connections were refused while the server was still finishing its requests.
    assert!(drain["refused_while_running"].as_u64().unwrap() >= 1, "no connection was refused while draining: {drain}");

    let exit = wait_for_exit(&mut server, Duration::from_millis(GRACE_MS))
        .expect("the server did not exit within the grace period");
    assert!(exit.success(), "the server exited with {exit:?}");
    let drained = drain["exited_after_s"].as_f64().expect("loadgen saw the server exit");
    assert!(drained * 1e3 < GRACE_MS as f64, "exited {drained:.1} s after the signal, past the {GRACE_MS} ms grace");
}
