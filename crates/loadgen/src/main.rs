//! Load generator: N concurrent clients posting to a running batchbox for T seconds or R
//! requests, then throughput, latency percentiles (HDR histogram), errors by status, and the
//! server's real/padded token ratio over the run.
//!
//! ```sh
//! cargo run --release -p batchbox-host --bin loadgen -- --concurrency 16 --duration 30
//! ```
//!
//! Two more modes need the server's pid (`--pid`), so they run on the server's machine:
//!
//! - **soak** (`--samples FILE`): the server's memory from `/proc/PID/status` before the first
//!   request and after every `--sample-every` answered requests, as CSV (`tools/soak.sh` plots it);
//! - **drain** (`--sigterm-after N`): SIGTERM to the server once N requests are answered, while
//!   the clients keep sending, then what became of every request (see [`Outcome`]) and how long
//!   the server took to exit. Each request goes on a connection of its own (`Connection: close`)
//!   so that its fate shows on its socket. A connection the server never accepted (still in the
//!   listen queue when the listener closed) is reset by the kernel; one the server accepted ends
//!   with the server's own clean close, after its answer or without one. On a reused keep-alive
//!   connection that would not tell: a server may close an idle connection just as the next
//!   request is written (RFC 9112 §9.6), and the request is lost without the server's fault.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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
    /// The server's process id, for --samples and --sigterm-after (same machine).
    #[arg(long)]
    pid: Option<u32>,
    /// Soak: write the server's memory to this CSV file (requests answered, seconds, VmRSS,
    /// RssAnon, RssFile, threads) before the first request and every --sample-every requests.
    #[arg(long, requires = "pid")]
    samples: Option<PathBuf>,
    /// Soak: answered requests between two memory samples.
    #[arg(long, default_value_t = 1000)]
    sample_every: u64,
    /// Drain: send SIGTERM to --pid once this many requests are answered, keep sending, and
    /// report what became of each request and when the server exited.
    #[arg(long, requires = "pid")]
    sigterm_after: Option<u64>,
}

/// What became of one request in a drain run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Outcome {
    /// A whole HTTP response came back (any status).
    Answered,
    /// The connection was refused: the server no longer listens.
    Refused,
    /// The connection was reset before any answer: the kernel's doing when the server never
    /// accepted the connection (it was in the listen queue when the listener closed), or when
    /// the server closed it without reading what was sent. Not accepted.
    Reset,
    /// The server accepted the connection and closed it cleanly without a whole answer: an
    /// accepted request that was dropped, the one failure a drain must not have.
    Dropped,
}

impl Outcome {
    fn of(result: &Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Outcome {
        match result {
            Ok(_) => Outcome::Answered,
            Err(ureq::Error::Io(e)) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(ureq::Error::Io(e)) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                Outcome::Reset
            }
            Err(_) => Outcome::Dropped,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Dropped => "dropped",
        }
    }
}

/// One soak sample: the server's memory after `requests` answered requests.
struct Sample {
    requests: u64,
    seconds: f64,
    rss: u64,
    rss_anon: u64,
    rss_file: u64,
    threads: u64,
}

impl Sample {
    /// Reads `/proc/PID/status` (sizes are in kB there).
    fn take(pid: u32, requests: u64, since: Instant) -> anyhow::Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok(Sample {
            requests,
            seconds: since.elapsed().as_secs_f64(),
            rss: field("VmRSS:")? * 1024,
            rss_anon: field("RssAnon:")? * 1024,
            rss_file: field("RssFile:")? * 1024,
            threads: field("Threads:")?,
        })
    }
}

/// Whether the process has exited: gone, or a zombie its parent has not reaped yet.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
        }
        Err(_) => true,
    }
}

/// A drain run's record: when the signal went, and each request's outcome, split by whether it
/// was sent before the signal and answered (or not) after it, or sent after it.
#[derive(Default)]
struct Drain {
    signalled: OnceLock<Instant>,
    exited_after: OnceLock<Duration>,
    /// Requests sent before the signal whose outcome came after it.
    in_flight: Mutex<BTreeMap<Outcome, u64>>,
    /// Requests sent after the signal.
    after: Mutex<BTreeMap<Outcome, u64>>,
    /// Refused connections while the server was still running (draining).
    refused_while_running: AtomicU64,
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
    anyhow::ensure!(args.sample_every > 0, "--sample-every must be at least 1");
    let url = format!("{}{}", args.server, args.path);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let before = server_stats(&agent, &args.server);

    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let issued = AtomicU64::new(0);
    let answered = AtomicU64::new(0);
    let totals = Mutex::new(Totals { latency_us: Some(new_histogram()), ..Totals::default() });
    let started = Instant::now();
    let samples = match (args.pid, &args.samples) {
        (Some(pid), Some(path)) => Some(Mutex::new(Samples::create(path, Sample::take(pid, 0, started)?)?)),
        _ => None,
    };
    let drain = Drain::default();
    let progress = if args.json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    progress.set_style(ProgressStyle::with_template("{spinner} {elapsed} {pos} requests {msg}")?);
    progress.enable_steady_tick(Duration::from_millis(200));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut clients = Vec::new();
        for _ in 0..args.concurrency {
            clients.push(scope.spawn(|| -> anyhow::Result<()> {
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
                    if args.sigterm_after.is_some() {
                        request = request.header("connection", "close");
                    }
                    let sent_before_signal = drain.signalled.get().is_none();
                    let sent = Instant::now();
                    let outcome = request.send(&bodies[n as usize % bodies.len()][..]);
                    let mut fate = Outcome::of(&outcome);
                    let status = match outcome {
                        Ok(mut response) => {
                            let status = response.status().as_u16();
                            match response.body_mut().with_config().limit(64 << 20).read_to_string() {
                                Ok(text) => {
                                    if let Ok(body) = serde_json::from_str::<Value>(&text) {
                                        sentences += body["metadata"]["num_sentences"].as_u64().unwrap_or(0);
                                    }
                                    status.to_string()
                                }
                                // The head came, the whole body did not.
                                Err(e) => {
                                    fate = Outcome::Dropped;
                                    format!("transport error: {e}")
                                }
                            }
                        }
                        Err(e) => format!("transport error: {e}"),
                    };
                    latency.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    *statuses.entry(status).or_default() += 1;
                    progress.inc(1);
                    if fate == Outcome::Answered {
                        let done = answered.fetch_add(1, Ordering::Relaxed) + 1;
                        if let (Some(pid), Some(samples)) = (args.pid, &samples)
                            && done.is_multiple_of(args.sample_every)
                        {
                            samples.lock().unwrap().push(Sample::take(pid, done, started)?)?;
                        }
                        if let (Some(pid), Some(after)) = (args.pid, args.sigterm_after)
                            && done == after
                        {
                            signal(scope, pid, &drain)?;
                        }
                    }
                    if drain.signalled.get().is_some() {
                        let record = if sent_before_signal { &drain.in_flight } else { &drain.after };
                        *record.lock().unwrap().entry(fate).or_default() += 1;
                        if fate == Outcome::Refused {
                            if !exited(args.pid.expect("a drain run has a pid")) {
                                drain.refused_while_running.fetch_add(1, Ordering::Relaxed);
                            }
                            // Nobody listens any more: this client is done.
                            break;
                        }
                    }
                }
                let mut totals = totals.lock().unwrap();
                totals.latency_us.as_mut().unwrap().add(&latency).expect("same histogram bounds");
                for (status, n) in statuses {
                    *totals.statuses.entry(status).or_default() += n;
                }
                totals.sentences += sentences;
                Ok(())
            }));
        }
        clients.into_iter().try_for_each(|c| c.join().expect("a client panicked"))
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let after = if drain.signalled.get().is_some() { None } else { server_stats(&agent, &args.server) };

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
    let mut report = json!({
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
    if let Some(samples) = samples {
        let mut samples = samples.into_inner().unwrap().taken;
        // Clients record their samples as they finish, not quite in order.
        samples.sort_by_key(|s| s.requests);
        let (first, last) = (samples.first().expect("the first sample"), samples.last().expect("the first sample"));
        report["rss"] = json!({
            "samples": samples.len(),
            "file": args.samples,
            "first_mib": first.rss as f64 / 1048576.0,
            "last_mib": last.rss as f64 / 1048576.0,
            "max_mib": samples.iter().map(|s| s.rss).max().unwrap_or(0) as f64 / 1048576.0,
        });
    }
    if let Some(&signalled) = drain.signalled.get() {
        // The watcher saw the exit, or the server is still running; wait for it a little more.
        let give_up = Instant::now() + Duration::from_secs(120);
        while drain.exited_after.get().is_none() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        let counts = |m: &Mutex<BTreeMap<Outcome, u64>>| -> serde_json::Map<String, Value> {
            m.lock().unwrap().iter().map(|(o, n)| (o.name().to_owned(), (*n).into())).collect()
        };
        let in_flight = counts(&drain.in_flight);
        report["drain"] = json!({
            "signal_at_s": (signalled - started).as_secs_f64(),
            "in_flight_at_signal": in_flight.values().filter_map(Value::as_u64).sum::<u64>(),
            "in_flight": in_flight,
            "sent_after_signal": counts(&drain.after),
            "refused_while_running": drain.refused_while_running.load(Ordering::Relaxed),
            "exited_after_s": drain.exited_after.get().map(Duration::as_secs_f64),
        });
    }
    if args.json {
        println!("{report}");
    } else {
        println!("{} clients, {:.1} s: {requests} requests, {} sentences", args.concurrency, elapsed, totals.sentences);
        println!(
            "throughput: {:.2} requests/s, {:.1} sentences/s",
            report["requests_per_s"], report["sentences_per_s"]
        );
        println!(
            "latency ms: p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1}",
            ms(0.5),
            ms(0.95),
            ms(0.99),
            latency.max() as f64 / 1e3
        );
        println!("statuses: {}", report["statuses"]);
        if let Some(p) = &report["server"].as_object() {
            println!(
                "server: {} batches, real/padded tokens {:.3}",
                p["batches"],
                p["real_over_padded"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(rss) = report.get("rss") {
            println!("server memory: {rss}");
        }
        if let Some(drain) = report.get("drain") {
            println!("drain: {drain}");
        }
    }
    Ok(())
}

/// Sends SIGTERM to the server (once), and watches for its exit from another thread so that the
/// drain time does not depend on when the clients finish.
fn signal<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, pid: u32, drain: &'scope Drain) -> anyhow::Result<()> {
    // Marked before the signal goes, so that every request sent unmarked was sent before it.
    let signalled = *drain.signalled.get_or_init(Instant::now);
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().context("running kill")?;
    anyhow::ensure!(status.success(), "kill -TERM {pid} failed: {status}");
    scope.spawn(move || {
        while !exited(pid) && signalled.elapsed() < Duration::from_secs(600) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if exited(pid) {
            let _ = drain.exited_after.set(signalled.elapsed());
        }
    });
    Ok(())
}

/// The soak samples so far, each also written to the CSV file as it is taken, so that a long
/// run can be watched, and stopped, without losing what it measured.
struct Samples {
    taken: Vec<Sample>,
    file: std::fs::File,
}

impl Samples {
    fn create(path: &std::path::Path, first: Sample) -> anyhow::Result<Samples> {
        let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        writeln!(file, "requests,seconds,rss_bytes,rss_anon_bytes,rss_file_bytes,threads")?;
        let mut samples = Samples { taken: Vec::new(), file };
        samples.push(first)?;
        Ok(samples)
    }

    fn push(&mut self, s: Sample) -> anyhow::Result<()> {
        writeln!(self.file, "{},{:.3},{},{},{},{}", s.requests, s.seconds, s.rss, s.rss_anon, s.rss_file, s.threads)?;
        self.taken.push(s);
        Ok(())
    }
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
