//! Several replicas behind a real load balancer, on loopback: two `batchbox serve` processes
//! behind HAProxy (active health checks on `/ready`, retries of a request whose replica failed
//! it: prediction is idempotent), 32 `loadgen` clients for 60 s, and one replica stopped in the
//! middle, then started again.
//!
//! - SIGKILL: requests in flight on the killed replica are lost by it; HAProxy sends them again
//!   to the other one. The claim: no client sees a failure, and the restarted replica takes
//!   traffic again once `/ready`.
//! - SIGTERM: the replica drains (stops accepting, finishes what it has); nothing is lost.
//!
//! Alone in its binary: two servers and 32 clients fill the 2-core machine. Needs `haproxy`
//! (`make test` installs the Debian package where it is missing).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, workspace, write_config};
use serde_json::{Value, json};

const CLIENTS: usize = 32;
const RUN: Duration = Duration::from_secs(60);
/// When, into the run, one replica is stopped.
const STOP_AT: Duration = Duration::from_secs(20);
/// The probe client's window around the stop: from 5 s before it to 20 s after.
const PROBE_FROM: Duration = Duration::from_secs(15);
const PROBE_TO: Duration = Duration::from_secs(40);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn replica_config(name: &str, port: u16) -> PathBuf {
    write_config(
        name,
        &format!(
            r#"{{model_and_api}}
server: {{ bind: "127.0.0.1:{port}", plugin_cache_dir: "{{cache}}", shutdown_grace_ms: 20000 }}
tenants:
  - {{ name: classifier, wasm: "{{classifier}}", routes: [/api/v1/predict/sentences], limits: {{ wall_ms: 120000, max_concurrent: 256 }} }}
"#
        ),
    )
}

/// HAProxy in front of `replicas`: least-connections balancing, `/ready` checked every 200 ms
/// (down after 2 failures, up after 2 successes), each request buffered whole and retried on
/// another replica on the `retry_on` conditions (HAProxy's names).
fn haproxy_config(front: u16, stats: u16, replicas: &[u16], retry_on: &str) -> PathBuf {
    let servers: String =
        replicas.iter().enumerate().map(|(i, port)| format!("  server r{i} 127.0.0.1:{port} check\n")).collect();
    let text = format!(
        "global
  maxconn 4096
  # One line per request, with its termination state, to target/http-tests/failover-haproxy-<signal>.log:
  # what to read when a client request fails.
  log stderr format raw local0
defaults
  log global
  option httplog
  mode http
  timeout connect 1s
  timeout client 120s
  timeout server 120s
  retries 3
  option redispatch 1
  retry-on {retry_on}
  # Wait for the whole request before choosing a replica: HAProxy can only retry a request it holds
  # whole, and one whose body came after its headers (a client's two writes) was sent on before it
  # arrived, then lost with its replica as a 502 (seen once in a capture of a SIGKILL run).
  option http-buffer-request
frontend batchbox
  bind 127.0.0.1:{front}
  default_backend replicas
backend replicas
  balance leastconn
  option httpchk GET /ready
  http-check expect status 200
  default-server inter 200ms fall 2 rise 2
{servers}listen stats
  bind 127.0.0.1:{stats}
  stats enable
  stats uri /stats
"
    );
    let path = workspace().join("target/http-tests/failover-haproxy.cfg");
    std::fs::write(&path, text).unwrap();
    path
}

fn haproxy() -> PathBuf {
    let found = ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].map(PathBuf::from);
    found.into_iter().find(|p| p.exists()).expect("haproxy is missing: `make test` installs it")
}

/// The load balancer, stopped on drop.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy's statistics, one map per line of its CSV (frontend, each server, backend); none
/// while it is starting.
fn stats(port: u16) -> Vec<HashMap<String, String>> {
    let Ok(mut response) = ureq::get(format!("http://127.0.0.1:{port}/stats;csv")).call() else { return Vec::new() };
    let text = response.body_mut().read_to_string().unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().trim_start_matches("# ").split(',').map(str::to_owned).collect();
    lines.map(|l| header.iter().cloned().zip(l.split(',').map(str::to_owned)).collect()).collect()
}

fn server_status(port: u16, server: &str) -> String {
    stats(port).into_iter().find(|row| row["svname"] == server).map(|row| row["status"].clone()).unwrap_or_default()
}

/// Waits until HAProxy says `server` is `status`, for at most 30 s.
fn wait_for_status(stats_port: u16, server: &str, status: &str) -> Duration {
    let started = Instant::now();
    while !server_status(stats_port, server).starts_with(status) {
        assert!(started.elapsed() < Duration::from_secs(30), "{server} never became {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Requests a replica answered 2xx, from its own /metrics.
fn answered(server: &Server) -> f64 {
    let (_, text) =
        (0, server.agent.get(format!("{}/metrics", server.base)).call().unwrap().body_mut().read_to_string().unwrap());
    batchbox_metrics::Scrape::parse(&text)
        .value(batchbox_metrics::names::REQUESTS, &[("tenant", "classifier"), ("status", "2xx")])
}

/// A 33rd client, one sentence at a time through the proxy from [`PROBE_FROM`] to [`PROBE_TO`]
/// into the run: the latency around the stop, and how many of its requests failed.
fn probe(front: u16) -> (Vec<Duration>, usize) {
    let started = Instant::now();
    std::thread::sleep(PROBE_FROM);
    let agent = common::agent();
    let body = json!({ "sentences": ["The striker scored twice."] }).to_string();
    let (mut latencies, mut failures) = (Vec::new(), 0);
    while started.elapsed() < PROBE_TO {
        let sent = Instant::now();
        match agent.post(format!("http://127.0.0.1:{front}/api/v1/predict/sentences")).send(&body) {
            Ok(response) if response.status() == 200 => latencies.push(sent.elapsed()),
            _ => failures += 1,
        }
    }
    (latencies, failures)
}

/// One run: the load through HAProxy (retrying on `retry_on`), replica 0 stopped with `signal` at
/// [`STOP_AT`] and started again once it has exited. Returns loadgen's report, HAProxy's backend
/// line, and how many requests the restarted replica answered.
fn run(signal: &str, retry_on: &str) -> (Value, HashMap<String, String>, f64) {
    let ports = [free_port(), free_port()];
    let configs: Vec<PathBuf> =
        ports.iter().enumerate().map(|(i, port)| replica_config(&format!("failover-r{i}"), *port)).collect();
    let mut replicas: Vec<Server> = configs.iter().map(|c| Server::launch(c)).collect();
    let (front, stats_port) = (free_port(), free_port());
    let config = haproxy_config(front, stats_port, &ports, retry_on);
    let log = std::fs::File::create(haproxy_log(signal)).unwrap();
    let _proxy = Proxy(Command::new(haproxy()).args(["-db", "-f"]).arg(&config).stderr(log).spawn().unwrap());
    for server in ["r0", "r1"] {
        wait_for_status(stats_port, server, "UP");
    }

    let sentences = common::fixture_sentences();
    let requests = workspace().join("target/http-tests/failover-requests.jsonl");
    let lines: Vec<String> = sentences.chunks(4).map(|chunk| json!({ "sentences": chunk }).to_string()).collect();
    std::fs::write(&requests, lines.join("\n")).unwrap();
    let load = Command::new(common::loadgen())
        .args(["--server", &format!("http://127.0.0.1:{front}"), "--requests-file", requests.to_str().unwrap()])
        .args(["--concurrency", &CLIENTS.to_string(), "--duration", &RUN.as_secs().to_string(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let probe = std::thread::spawn(move || probe(front));
    std::thread::sleep(STOP_AT);
    let stopped = Instant::now();
    Command::new("kill").args([&format!("-{signal}"), &replicas[0].child.id().to_string()]).status().unwrap();
    // A drain takes as long as the replica's requests in flight: bounded by its grace (20 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    while replicas[0].child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "replica 0 did not exit after SIG{signal}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = wait_for_status(stats_port, "r0", "DOWN");
    replicas[0] = Server::launch(&configs[0]);
    let up = wait_for_status(stats_port, "r0", "UP");
    eprintln!(
        "SIG{signal}: replica 0 exited and was DOWN in HAProxy {down:?} later; restarted, UP {up:?} after /ready ({:?} after the signal)",
        stopped.elapsed()
    );

    let output = load.wait_with_output().unwrap();
    assert!(output.status.success(), "loadgen failed");
    let mut report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let (mut latencies, failures) = probe.join().unwrap();
    assert_eq!(failures, 0, "the probe's requests around the stop all answered 200");
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    report["probe"] = json!({ "requests": latencies.len(), "p99_ms": p99.as_secs_f64() * 1e3 });
    let backend = stats(stats_port).into_iter().find(|row| row["svname"] == "BACKEND").unwrap();
    let after_restart = answered(&replicas[0]);
    (report, backend, after_restart)
}

/// The two tests take turns: each fills the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where HAProxy logs `signal`'s run: one line per request, with its termination state.
fn haproxy_log(signal: &str) -> PathBuf {
    workspace().join(format!("target/http-tests/failover-haproxy-{signal}.log"))
}

/// The lines of HAProxy's log for `signal`'s run whose request ended with a termination state other
/// than `----` (a normal end): what explains a failed client request.
fn unclean_requests(signal: &str) -> String {
    std::fs::read_to_string(haproxy_log(signal))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" \"POST ") && !l.contains(" ---- "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs [`run`] and checks its claims; answers HAProxy's retry count.
fn check(signal: &str, retry_on: &str) -> u64 {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (report, backend, after_restart) = run(signal, retry_on);
    let (retries, redispatches) = (&backend["wretr"], &backend["wredis"]);
    eprintln!(
        "SIG{signal}: {} requests, statuses {}, p50 {} ms, p99 {} ms, max {} ms; probe around the stop: {}; \
         HAProxy retries {retries}, redispatches {redispatches}; the restarted replica answered {after_restart}",
        report["requests"],
        report["statuses"],
        report["latency_ms"]["p50"],
        report["latency_ms"]["p99"],
        report["latency_ms"]["max"],
        report["probe"]
    );
    let statuses = report["statuses"].as_object().unwrap();
    assert_eq!(
        statuses.keys().collect::<Vec<_>>(),
        ["200"],
        "every client request answered 200: {statuses:?}; HAProxy's requests that ended otherwise (none \
         logged: it never saw the request whole):\n{}",
        unclean_requests(signal)
    );
    assert!(report["requests"].as_u64().unwrap() > 100, "{report}");
    assert!(after_restart > 0.0, "the restarted replica took no traffic");
    retries.parse().unwrap()
}

#[test]
fn a_replica_killed_under_load_loses_no_client_request_and_takes_traffic_again_once_ready() {
    // A killed replica's requests in flight are lost: retried on the other one.
    check("KILL", "conn-failure empty-response response-timeout");
}

#[test]
fn a_replica_stopped_with_sigterm_drains_and_loses_no_client_request() {
    // Only a refused connection may be tried elsewhere (nothing was sent on it): a drain that
    // dropped a request would fail it.
    let retries = check("TERM", "conn-failure");
    assert_eq!(retries, 0, "a draining replica answers what it accepted: no request needed a retry");
}
