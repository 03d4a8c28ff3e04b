//! Fairness under load, over real HTTP: tenant A floods the model with 32 concurrent clients
//! while tenant B sends one request at a time; B's median latency stays within 2x of its median
//! on an idle server.
//!
//! Alone in its test binary, so nothing else competes for the CPU while it measures.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, fixture_sentences, median, write_config};
use serde_json::json;

const FLOOD_CLIENTS: usize = 32;
const B_REQUESTS: usize = 7;

#[test]
fn a_light_tenant_keeps_its_latency_while_another_floods() {
    let config = write_config(
        "fairness",
        r#"
# fp32, pinned: `cpu_dtype: auto` would measure for seconds at every start, and bf16 runs 6x
# slower than fp32 on a CPU without native bf16.
models: [{ name: minilm-topics, path: "{model}", device: cpu, cpu_dtype: fp32 }]
api: { inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192, max_queue_delay_ms: 2 }
server: { bind: "127.0.0.1:0", plugin_cache_dir: "{cache}" }
tenants:
  - { name: a, wasm: "{classifier}", routes: [/a], limits: { wall_ms: 600000 } }
  - { name: b, wasm: "{classifier}", routes: [/b], limits: { wall_ms: 600000 } }
"#,
    );
    let server = Server::launch(&config);
    let body = json!({ "sentences": fixture_sentences() }).to_string();
    // B: the 120-sentence fixture, one request at a time with a pause between: alone, it keeps
    // the model busy about a third of the time, less than its fair half.
    let b_latencies = || server.timed_posts("/b", &body, B_REQUESTS, Duration::from_millis(1500));

    server.post("/b", &body); // warm-up
    let unloaded = median(b_latencies());

    let stop = AtomicBool::new(false);
    let (loaded, flood_answered) = std::thread::scope(|scope| {
        let flood: Vec<_> = (0..FLOOD_CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut answered = 0;
                    while !stop.load(Ordering::Relaxed) {
                        // Fails once the server is stopped under the request, at the end.
                        if server
                            .agent
                            .post(format!("{}/a", server.base))
                            .send(body.as_bytes())
                            .is_ok_and(|r| r.status() == 200)
                        {
                            answered += 1;
                        }
                    }
                    answered
                })
            })
            .collect();
        // Let the flood fill the queue first.
        std::thread::sleep(Duration::from_secs(3));
        let loaded = median(b_latencies());
        let (_, models) = server.get("/v1/models");
        let queued = models["models"][0]["stats"]["queued_sequences"].as_u64().unwrap();
        // The flood's queued requests would take long to finish: end them with the server.
        stop.store(true, Ordering::Relaxed);
        server.kill_now();
        let answered: usize = flood.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(queued > 120, "the flood kept the queue full while B was measured: {queued} sequences queued");
        (loaded, answered)
    });
    eprintln!("A's flood got {flood_answered} answers while B was measured");
    eprintln!(
        "B's median latency: unloaded {unloaded:?}, with A flooding {loaded:?} ({:.2}x)",
        loaded.as_secs_f64() / unloaded.as_secs_f64()
    );
    assert!(loaded <= unloaded * 2, "B's median went from {unloaded:?} to {loaded:?} under A's flood");
}
