//! What the plugin layer costs: the 120-sentence request through the WebAssembly plugin, with
//! and without HTTP, against the model's own time for the same request; then what a plugin's
//! language adds: the sentence classifier in Rust, Python and JavaScript side by side.
//!
//! `make bench`, or `cargo bench -p batchbox --bench plugins -- [--rounds N] [--languages ...]`.
//! Needs the default model (`make setup`) and the plugins (`make plugins`).
//!
//! Overhead is measured per request: end-to-end time minus the time the response's metadata
//! says went to tokenizing, queueing and inference. Medians of those differences are robust to
//! the model's own noise, which is far larger than the overhead. The languages take turns
//! request by request, so the machine's noise falls on each alike.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchbox::config::Config;
use batchbox_plugins::{PluginHost, PluginRuntime, json_post, with_caches};
use batchbox_server::{self as server, App, ConnectionLimits, Loaded};
use batchbox_tenants::Tenants;
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Timed requests per setup (after warm-up).
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// No-op requests for the instantiation figure.
    #[arg(long, default_value_t = 2000)]
    noop_requests: usize,
    /// Timed requests per language and request size, in the languages' comparison.
    #[arg(long, default_value_t = 200)]
    language_rounds: usize,
    /// The sentence classifiers to compare; the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "rust,python,javascript")]
    languages: Vec<Language>,
    #[arg(long, hide = true)]
    bench: bool,
}

const PREDICT: &str = "/api/v1/predict/sentences";

/// A sentence classifier's language: where its component is, and the route it gets here.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Language {
    Rust,
    Python,
    Javascript,
}

impl Language {
    fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::Javascript => "javascript",
        }
    }

    fn wasm(self) -> &'static str {
        match self {
            Language::Rust => "plugins/target/wasm32-wasip2/release/sentence_classifier.wasm",
            Language::Python => "plugins/target/python/sentence_classifier.wasm",
            Language::Javascript => "plugins/target/js/sentence_classifier.wasm",
        }
    }
}

/// One column of the comparison: a language, with a fresh instance per request or reused ones.
#[derive(Clone, Copy)]
struct Setup {
    language: Language,
    reuse: bool,
}

impl Setup {
    fn tenant(self) -> String {
        format!("{}{}", self.language.name(), if self.reuse { "-reused" } else { "" })
    }

    fn route(self) -> String {
        format!("/{}{PREDICT}", self.tenant())
    }

    fn describe(self) -> String {
        format!("{}, {}", self.language.name(), if self.reuse { "reused instances" } else { "fresh instance" })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut config = Config::load(&root.join("shared_config.yaml"))?;
    config.models[0].device = batchbox_model_tch::DeviceSpec::Cpu;
    config.server.bind = "127.0.0.1:0".parse()?;
    let mut hostile: batchbox_tenants::TenantConfig = yaml_serde::from_str(&format!(
        "{{name: hostile, wasm: {}, routes: [/hostile]}}",
        root.join("plugins/target/wasm32-wasip2/release/hostile.wasm").display()
    ))?;
    hostile.model.clone_from(&config.models[0].name);
    config.tenants.push(hostile);
    let setups: Vec<Setup> = [false, true]
        .into_iter()
        .flat_map(|reuse| args.languages.iter().map(move |&language| Setup { language, reuse }))
        .collect();
    for setup in &setups {
        let mut tenant: batchbox_tenants::TenantConfig = yaml_serde::from_str(&format!(
            "{{name: {}, wasm: {}, routes: [{}], config: {{max_sentences: 1000}}, reuse_instances: {}}}",
            setup.tenant(),
            root.join(setup.language.wasm()).display(),
            setup.route(),
            if setup.reuse { 4 } else { 0 }
        ))?;
        tenant.model.clone_from(&config.models[0].name);
        config.tenants.push(tenant);
    }
    let body = std::fs::read(root.join("tests/fixtures/test_120_sentences.json"))?;

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let model = {
            let options = config.model_options(&config.models[0]);
            tokio::task::spawn_blocking(move || batchbox_model_tch::load(&options)).await??
        };
        let models = [(config.models[0].name.clone(), model.clone())];
        let by_name = models.iter().cloned().collect();
        let host = PluginHost::new(
            config.server.max_instances,
            &config.server.plugin_cache_dir,
            config.server.plugin_cache_max_bytes,
        )?;
        let plugins = PluginRuntime::load(&host, &config.tenants, with_caches(&by_name)).await?;
        let request = |path: &str, body: &[u8]| json_post(path, body.to_vec());

        // Instantiation with pooling: a request that does nothing but exist.
        let mut noop = Histogram::<u64>::new(3)?;
        for i in 0..args.noop_requests + 100 {
            let started = Instant::now();
            plugins.handle("hostile", 0, request("/hostile/ok", b"")).await?;
            if i >= 100 {
                noop.record(started.elapsed().as_nanos() as u64)?;
            }
        }

        // The 120 sentences through the plugin, in process (no HTTP).
        let mut in_process = Samples::default();
        for i in 0..args.rounds + 3 {
            let started = Instant::now();
            let response = plugins.handle("sentence-classifier", 0, request(PREDICT, &body)).await?;
            let elapsed = started.elapsed();
            anyhow::ensure!(response.status == 200, "{}", String::from_utf8_lossy(&response.body));
            if i >= 3 {
                in_process.record(elapsed, &serde_json::from_slice(&response.body)?);
            }
        }

        // And end to end over HTTP, against a server in this process.
        let listener = tokio::net::TcpListener::bind(config.server.bind).await?;
        let address = listener.local_addr()?;
        let url = format!("http://{address}{PREDICT}");
        let app = Arc::new(App::new(&config.server, None));
        let tenants = Tenants::new(&config.tenants);
        app.set_loaded(Loaded {
            models: models.to_vec(),
            plugins,
            tenants,
            admin_keys: Vec::new(),
            about: Value::Null,
            settled_shares: Vec::new(),
        });
        tokio::spawn(server::serve(
            listener,
            app,
            ConnectionLimits::from_config(&config.server),
            std::future::pending(),
        ));
        let rounds = args.rounds;
        let fixture = body.clone();
        let over_http = tokio::task::spawn_blocking(move || -> anyhow::Result<Samples> {
            let agent = ureq::Agent::new_with_defaults();
            let mut samples = Samples::default();
            for i in 0..rounds + 3 {
                let started = Instant::now();
                let mut response = agent.post(&url).header("content-type", "application/json").send(&body[..])?;
                let text = response.body_mut().read_to_string()?;
                let elapsed = started.elapsed();
                if i >= 3 {
                    samples.record(elapsed, &serde_json::from_str(&text)?);
                }
            }
            Ok(samples)
        })
        .await??;

        println!("model: {} on {}, {:?}", model.info().manifest.version, model.info().device, model.info().precision);
        println!("\n| measure | median | p90 | share of end to end (median) |");
        println!("|---|---:|---:|---:|");
        println!(
            "| instantiate + configure + no-op call (pooling), {} requests | {:.1} µs | {:.1} µs | |",
            args.noop_requests,
            noop.value_at_quantile(0.5) as f64 / 1e3,
            noop.value_at_quantile(0.9) as f64 / 1e3
        );
        in_process.print("120 sentences, plugin in process");
        over_http.print("120 sentences over HTTP");

        let small_rounds = args.language_rounds;
        tokio::task::spawn_blocking(move || compare_languages(address, &setups, small_rounds, rounds, &fixture))
            .await??;
        Ok::<_, anyhow::Error>(())
    })
}

/// The sentence classifier in each language, with fresh and with reused instances, over HTTP,
/// the setups taking turns request by request. Three requests: one refused at once (an empty
/// body: instantiation, `configure` and the SDK's first check), one sentence, and the 120
/// sentences (`large_rounds` of those). The first setup is the baseline.
fn compare_languages(
    address: std::net::SocketAddr,
    setups: &[Setup],
    small_rounds: usize,
    large_rounds: usize,
    fixture: &[u8],
) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let fixture: Value = serde_json::from_slice(fixture)?;
    let one = serde_json::json!({ "sentences": [fixture["sentences"][0]] }).to_string();
    let requests = [
        ("refused (empty body)", String::new(), 400, small_rounds),
        ("1 sentence", one, 200, small_rounds),
        ("120 sentences", fixture.to_string(), 200, large_rounds),
    ];
    println!(
        "\n| request | plugin | end to end p50 | over {0} | overhead p50 | overhead over {0} |",
        setups[0].describe()
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (what, body, status, rounds) in requests {
        let mut samples: Vec<Samples> = setups.iter().map(|_| Samples::default()).collect();
        for round in 0..rounds + 3 {
            for (setup, samples) in setups.iter().zip(&mut samples) {
                let started = Instant::now();
                let url = format!("http://{address}{}", setup.route());
                let mut response = agent.post(&url).header("content-type", "application/json").send(&body)?;
                let text = response.body_mut().read_to_string()?;
                let elapsed = started.elapsed();
                anyhow::ensure!(response.status() == status, "{}: {what}: {text}", setup.describe());
                if round >= 3 {
                    samples.record(elapsed, &serde_json::from_str(&text)?);
                }
            }
        }
        let baseline = &samples[0];
        for (setup, samples) in setups.iter().zip(&samples) {
            let (total, overhead) = (quantile(&samples.total_ms, 0.5), quantile(&samples.overhead_ms, 0.5));
            let (base_total, base_overhead) = (quantile(&baseline.total_ms, 0.5), quantile(&baseline.overhead_ms, 0.5));
            println!(
                "| {what} | {} | {total:.2} ms | {:+.2} ms ({:+.1}%) | {overhead:.2} ms | {:+.2} ms |",
                setup.describe(),
                total - base_total,
                100.0 * (total / base_total - 1.0),
                overhead - base_overhead
            );
        }
    }
    Ok(())
}

/// Per-request end-to-end times and the overhead part of each.
#[derive(Default)]
struct Samples {
    total_ms: Vec<f64>,
    model_ms: Vec<f64>,
    overhead_ms: Vec<f64>,
}

impl Samples {
    /// One request's time; the model's part is what its metadata reports (none for an error).
    fn record(&mut self, elapsed: Duration, response: &Value) {
        let b = &response["metadata"]["breakdown_ms"];
        let model: f64 = ["tokenize", "queue", "inference"].iter().filter_map(|k| b[k].as_f64()).sum();
        let total = elapsed.as_secs_f64() * 1e3;
        self.total_ms.push(total);
        self.model_ms.push(model);
        self.overhead_ms.push(total - model);
    }

    fn print(&self, what: &str) {
        let median = |v: &[f64]| quantile(v, 0.5);
        let share = 100.0 * median(&self.overhead_ms) / median(&self.total_ms);
        println!(
            "| {what}: end to end | {:.1} ms | {:.1} ms | |",
            median(&self.total_ms),
            quantile(&self.total_ms, 0.9)
        );
        println!(
            "| {what}: tokenize + queue + inference | {:.1} ms | {:.1} ms | |",
            median(&self.model_ms),
            quantile(&self.model_ms, 0.9)
        );
        println!(
            "| {what}: overhead (the rest) | {:.3} ms | {:.3} ms | {share:.2}% |",
            median(&self.overhead_ms),
            quantile(&self.overhead_ms, 0.9)
        );
    }
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
