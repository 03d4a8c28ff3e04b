//! Load generator: N concurrent clients posting to a running batchbox for T seconds or R
//! requests, then throughput, latency percentiles (HDR histogram), errors by status, and the
//! server's real/padded token ratio over the run.
//!
//! ```sh
//! cargo run --release -p batchbox-host --bin loadgen -- --concurrency 16 --duration 30
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Load a running batchbox server with concurrent clients")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Route to post to.
    #[arg(long, default_value = "/api/v1/predict/sentences")]
    path: String,
    /// Request body to post (JSON).
    #[arg(long, default_value = "tests/fixtures/test_120_sentences.json")]
    body: PathBuf,
    /// A file of request bodies, one JSON document per line, sent round-robin (instead of --body).
    #[arg(long)]
    requests_file: Option<PathBuf>,
    /// Concurrent clients, each with one request in flight.
    #[arg(short, long, default_value_t = 4)]
    concurrency: usize,
    /// Stop after this many seconds...
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// ...or after this many requests, whichever comes first.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// `Authorization: Bearer` key, if the route needs one.
    #[arg(long, env = "BATCHBOX_KEY")]
    key: Option<String>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Totals {
    latency_us: Option<Histogram<u64>>,
    statuses: BTreeMap<String, u64>,
    sentences: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bodies: Vec<Vec<u8>> = match &args.requests_file {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect(),
        None => vec![std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?],
    };
    anyhow::ensure!(!bodies.is_empty(), "no request bodies");
    let url = format!("{}{}", args.server, args.path);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let before = server_stats(&agent, &args.server);

    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let issued = AtomicU64::new(0);
    let totals = Mutex::new(Totals { latency_us: Some(new_histogram()), ..Totals::default() });
    let progress = if args.json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {pos} requests {msg}")?);
    progress.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency {
            scope.spawn(|| {
                let mut latency = new_histogram();
                let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
                let mut sentences = 0;
                loop {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= deadline || args.requests.is_some_and(|r| n >= r) {
                        break;
                    }
                    let mut request = agent.post(&url).header("content-type", "application/json");
                    if let Some(key) = &args.key {
                        request = request.header("authorization", format!("Bearer {key}"));
                    }
                    let sent = Instant::now();
                    let outcome = request.send(&bodies[n as usize % bodies.len()][..]);
                    let status = match outcome {
                        Ok(mut response) => {
                            let status = response.status().as_u16();
                            let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap_or_default();
                            if let Ok(body) = serde_json::from_str::<Value>(&text) {
                                sentences += body["metadata"]["num_sentences"].as_u64().unwrap_or(0);
                            }
                            status.to_string()
                        }
                        Err(e) => format!("transport error: {e}"),
                    };
                    latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    *statuses.entry(status).or_default() += 1;
                    progress.inc(1);
                }
                let mut totals = totals.lock().unwrap();
                totals.latency_us.as_mut().unwrap().add(&latency).expect("same histogram bounds");
                for (status, n) in statuses {
                    *totals.statuses.entry(status).or_default() += n;
                }
                totals.sentences += sentences;
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let after = server_stats(&agent, &args.server);

    let totals = totals.into_inner().unwrap();
    let latency = totals.latency_us.unwrap();
    let requests = latency.len();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
    let padding = match (before, after) {
        (Some(b), Some(a)) => {
            let delta = |k: &str| a[k].as_u64().unwrap_or(0).saturating_sub(b[k].as_u64().unwrap_or(0));
            let (batches, real, padded) = (delta("batches"), delta("real_tokens"), delta("padded_tokens"));
            (padded > 0).then(|| json!({ "batches": batches, "real_tokens": real, "padded_tokens": padded, "real_over_padded": real as f64 / padded as f64 }))
        }
        _ => None,
    };
    let report = json!({
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests": requests,
        "sentences": totals.sentences,
        "requests_per_s": requests as f64 / elapsed,
        "sentences_per_s": totals.sentences as f64 / elapsed,
        "latency_ms": { "p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "max": latency.max() as f64 / 1e3 },
        "statuses": totals.statuses,
        "server": padding,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{} clients, {:.1} s: {requests} requests, {} sentences", args.concurrency, elapsed, totals.sentences);
        println!("throughput: {:.2} requests/s, {:.1} sentences/s", report["requests_per_s"], report["sentences_per_s"]);
        println!("latency ms: p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1}", ms(0.5), ms(0.95), ms(0.99), latency.max() as f64 / 1e3);
        println!("statuses: {}", report["statuses"]);
        if let Some(p) = &report["server"].as_object() {
            println!("server: {} batches, real/padded tokens {:.3}", p["batches"], p["real_over_padded"].as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}

/// Latencies in microseconds, 1 µs to an hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The model's counters from `/v1/models`, if the server offers them.
fn server_stats(agent: &ureq::Agent, server: &str) -> Option<Value> {
    let mut response = agent.get(format!("{server}/v1/models")).call().ok()?;
    let body: Value = serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
    Some(body["models"][0]["stats"].clone())
}
