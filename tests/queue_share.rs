//! Each tenant's share of the model's queue, over real HTTP: tenant A floods the model with many
//! concurrent max-length `infer` calls, more than the whole queue holds; A is refused past its
//! share (503 naming it), and tenant B's normal requests meanwhile are all answered, never 503.
//! A request that can never fit in A's room is refused for good (413).

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, fixture_sentences, read, write_config};
use serde_json::json;

/// Each holds 8 × 256 = 2,048 tokens; 48 of them are 1.5 times the whole queue, in small
/// pieces, so without shares A would take any room the queue has as soon as it opens.
const FLOOD_CLIENTS: usize = 48;
const B_REQUESTS: usize = 6;

#[test]
fn a_flooding_tenant_is_refused_past_its_share_and_never_makes_another_get_503() {
    let config = write_config(
        "queue-share",
        r#"
# fp32, pinned: `cpu_dtype: auto` would measure for seconds at every start, and bf16 runs 6x
# slower than fp32 on a CPU without native bf16.
models: [{ name: minilm-topics, path: "{model}", device: cpu, cpu_dtype: fp32 }]
api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192, max_queue_delay_ms: 2, max_queued_tokens: 65536 }
server: { bind: "127.0.0.1:0", plugin_cache_dir: "{cache}" }
tenants:
  - { name: a, wasm: "{hostile}", routes: [/a], limits: { wall_ms: 600000 } }
  - { name: b, wasm: "{classifier}", routes: [/b], limits: { wall_ms: 600000 } }
"#,
    );
    let server = Server::launch(&config);
    // 200 x 256 tokens can never fit in A's 32,768: 413 at once, not a 503 to retry forever.
    let (status, answer) = server.post("/a/flood?n=200", "");
    assert_eq!((status, answer["error"]["code"].as_str()), (413, Some("too_large")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("32768"), "{answer}");
    let body = json!({ "sentences": fixture_sentences() }).to_string();
    let stop = AtomicBool::new(false);
    let refusals: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let b_statuses = std::thread::scope(|scope| {
        for _ in 0..FLOOD_CLIENTS {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // Fails once the server is stopped under the request, at the end.
                    let Ok(response) = server.agent.post(format!("{}/a/flood?n=8", server.base)).send(b"") else {
                        continue;
                    };
                    let (status, answer) = read(response);
                    if status == 503 {
                        refusals
                            .lock()
                            .unwrap()
                            .push(answer["error"]["message"].as_str().unwrap_or_default().to_owned());
                        // As a client honouring Retry-After would, more or less.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        // Let the flood fill its share of the queue.
        std::thread::sleep(Duration::from_secs(3));
        let statuses: Vec<(u16, String)> = (0..B_REQUESTS)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                let (status, answer) = server.post("/b", &body);
                (status, answer["error"].to_string())
            })
            .collect();
        // The flood's queued requests would take minutes to finish: end them with the server.
        stop.store(true, Ordering::Relaxed);
        server.kill_now();
        statuses
    });
    let refusals = refusals.into_inner().unwrap();
    eprintln!("A was refused {} times; B's answers: {b_statuses:?}", refusals.len());
    assert!(!refusals.is_empty(), "A's flood, 1.5 times the queue, was never refused: the test did not fill A's share");
    assert!(
        refusals.iter().all(|m| m.contains("tenant a's share") && m.contains("32768")),
        "A's refusals name its share of 32,768 tokens: {:?}",
        &refusals[..1]
    );
    assert!(b_statuses.iter().all(|(status, _)| *status == 200), "B's requests while A flooded: {b_statuses:?}");
}
