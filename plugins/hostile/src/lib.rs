//! A hostile tenant's plugin, for the host's isolation tests: each path attacks the host in one
//! way (see tests/tenants.rs). `/ok` behaves, for the fast path and the instantiation benchmark;
//! `/count` says how many requests this instance has served, which shows whether instances are
//! reused (tests/plugin_instances.rs).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use batchbox_sdk::{Plugin, Request, Response, host, json};
use serde_json::json;

struct Hostile;

impl Plugin for Hostile {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn handle(request: Request) -> Response {
        let n = |default: usize| param(&request, "n").unwrap_or(default);
        match request.path.rsplit('/').next().unwrap_or_default() {
            "panic" => panic!("this plugin panics on purpose"),
            "count" => {
                static SERVED: AtomicU64 = AtomicU64::new(0);
                json(200, &(SERVED.fetch_add(1, Ordering::Relaxed) + 1))
            }
            "loop" => {
                // Spins without calling the host: only the CPU deadline can stop it.
                let mut x: u64 = 0;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            // Blocks without using CPU: only the wall-clock limit can stop it.
            "sleep" => {
                std::thread::sleep(Duration::from_secs(3600));
                json(200, "woke up")
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "recursion" => json(200, &recurse(black_box(u64::MAX))),
            "huge-response" => Response { status: 200, headers: Vec::new(), body: vec![b'x'; n(32 << 20)] },
            "infer-many" => {
                let sequences = vec![vec![101u32]; n(1_000_000)];
                match host::infer(&sequences) {
                    Ok(inference) => json(200, &inference.outputs.len()),
                    Err(e) => e.into_response(),
                }
            }
            // Floods the model: `n` sequences (64 unless set) as long as the model takes, the most
            // expensive forward passes a tenant can ask for.
            "flood" => {
                let sequences = vec![vec![101u32; host::model().max_length as usize]; n(64)];
                match host::infer(&sequences) {
                    Ok(inference) => json(200, &inference.outputs.len()),
                    Err(e) => e.into_response(),
                }
            }
            "tokenize-huge" => match host::tokenize(&["a ".repeat(n(16 << 20) / 2)]) {
                Ok(encodings) => json(200, &encodings.len()),
                Err(e) => e.into_response(),
            },
            "escape" => {
                let mut report = escape(param(&request, "port").unwrap_or(80) as u16);
                report["headers"] = request.headers.iter().map(|(name, _)| name.clone()).collect();
                json(200, &report)
            }
            // Status `n`, a header for each request header `x-respond-<name>: <value>`, and
            // `count` filler headers of `bytes` bytes each: for the host's checks of responses.
            "respond" => {
                let mut headers: Vec<(String, String)> = request
                    .headers
                    .iter()
                    .filter_map(|(name, value)| Some((name.strip_prefix("x-respond-")?.to_owned(), value.clone())))
                    .collect();
                let filler = "x".repeat(param(&request, "bytes").unwrap_or(1));
                headers.extend(
                    (0..param(&request, "count").unwrap_or(0)).map(|i| (format!("x-filler-{i}"), filler.clone())),
                );
                Response { status: n(200) as u16, headers, body: b"hello".to_vec() }
            }
            _ => json(200, "ok"),
        }
    }
}

fn param(request: &Request, name: &str) -> Option<usize> {
    request.query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn recurse(depth: u64) -> u64 {
    if depth == 0 { 0 } else { black_box(recurse(depth - 1)) + 1 }
}

/// Tries what WASI did not grant: each entry says `allowed: ...` or `denied: <error>`. The
/// report also lists the request headers the plugin was given.
fn escape(port: u16) -> serde_json::Value {
    fn attempt<T: std::fmt::Debug, E: std::fmt::Display>(result: Result<T, E>) -> String {
        match result {
            Ok(value) => format!("allowed: {value:?}"),
            Err(e) => format!("denied: {e}"),
        }
    }
    use std::net::ToSocketAddrs;
    // The finest step the monotonic clock shows.
    let start = Instant::now();
    let mut step = Duration::ZERO;
    while step.is_zero() {
        step = Instant::now() - start;
    }
    json!({
        "read_file": attempt(std::fs::read_to_string("/etc/passwd").map(|s| s.len())),
        "list_dir": attempt(std::fs::read_dir("/").map(|d| d.count())),
        "write_file": attempt(std::fs::write("/tmp/batchbox-escape", b"x")),
        "env_var": attempt(std::env::var("PATH")),
        "env_vars": std::env::vars().count(),
        "tcp_connect": attempt(std::net::TcpStream::connect(("127.0.0.1", port))),
        "udp_bind": attempt(std::net::UdpSocket::bind("0.0.0.0:0")),
        "dns": attempt(("localhost", port).to_socket_addrs().map(|a| a.count())),
        "wall_clock_ns": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
        "monotonic_step_ns": step.as_nanos() as u64,
    })
}

impl batchbox_sdk::Describe for Hostile {
    fn describe() -> String {
        String::new()
    }
}

batchbox_sdk::export_plugin!(Hostile);
