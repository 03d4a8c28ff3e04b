//! The `batchbox` command line.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use batchbox::config::Config;
use batchbox::loader::{Loader, Overrides};
use batchbox_metrics::PrometheusHandle;
use batchbox_model_tch::DeviceSpec;
use batchbox_plugins::json_post;
use batchbox_server::{self as server, App, ConnectionLimits};
use batchbox_tenants::Tenants;
use clap::{Parser, Subcommand};

#[cfg(feature = "otel")]
mod otel;

#[derive(Parser)]
#[command(version, about = "Serve a libtorch classifier with batched inference")]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "BATCHBOX_CONFIG", default_value = "shared_config.yaml")]
    config: PathBuf,
    /// Overrides every model's `device` (auto, cpu, cuda, cuda:N).
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    /// Log lines as JSON objects or as text, on stderr. Default: text on a terminal, JSON
    /// otherwise (for collectors).
    #[arg(long, global = true, env = "BATCHBOX_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP: host routes and the configured plugins' routes.
    Serve {
        /// Address to listen on (overrides `server.bind`); port 0 picks a free one.
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Port to listen on, keeping the configured address.
        #[arg(long, env = "PORT")]
        port: Option<u16>,
    },
    /// Load the models and every tenant's plugin (compile, check exports, configure) as
    /// `serve` would, print what would be served, and exit without serving.
    CheckConfig,
    /// Classify sentences given as arguments (or one per line on stdin) through the tenant that
    /// serves `POST /api/v1/predict/sentences`, in process, and print each one's top label.
    Predict {
        /// The sentences; none: one per line on stdin.
        sentences: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _traces = init_logs(cli.log_format)?;
    let (bind, port) = match cli.command {
        Command::Serve { bind, port } => (bind, port),
        _ => (None, None),
    };
    let overrides = Overrides { device: cli.device, bind, port };
    let (loader, config, text) = Loader::open(&cli.config, overrides)?;
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve { .. } => runtime.block_on(serve(config, &text, loader)),
        Command::CheckConfig => runtime.block_on(check_config(config, &text, &loader)),
        Command::Predict { sentences } => runtime.block_on(predict(config, &text, &loader, sentences)),
    }
}

async fn serve(config: Config, text: &str, loader: Loader) -> anyhow::Result<()> {
    // Listen first, so /health answers while the model loads and /ready tells when it is done.
    let listener = tokio::net::TcpListener::bind(config.server.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.bind))?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}");
    tracing::info!(%address, "listening");
    let metrics = config.server.metrics.then(batchbox_metrics::install).transpose()?;
    if let Some(metrics) = &metrics {
        tokio::spawn(metrics_upkeep(metrics.clone()));
        if let Some(bind) = config.server.metrics_bind {
            serve_metrics(bind, &config, metrics.clone()).await?;
        }
    }
    let loader = Arc::new(loader);
    let app = App::new(&config.server, metrics).reloading(loader.clone());
    #[cfg(feature = "otel")]
    let app = app.joining_traces(otel::join_client_trace);
    let app = Arc::new(app);
    let limits = ConnectionLimits::from_config(&config.server);
    let server = tokio::spawn(server::serve(listener, app.clone(), limits, shutdown_signal()));

    // Caught from now on, so a SIGHUP while the models load does not end the process (SIGHUP's
    // default); those that arrive meanwhile make one reload once ready.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    app.set_loaded(loader.first(config, text).await?);
    tokio::spawn(reload_on_sighup(app, hangup));
    server.await?;
    Ok(())
}

/// Reloads the config file on every SIGHUP; the outcome is logged (see [`App::reload`]).
async fn reload_on_sighup(app: Arc<App>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        // Success and refusal are both logged by `reload`.
        let _ = app.reload("SIGHUP").await;
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Every request has a line of target
/// `access`; a plugin's output has its tenant and request id. With the `otel` feature and an OTLP
/// endpoint set, traces are exported too (see `otel.rs`); they are sent until the guard this
/// returns is dropped.
fn init_logs(format: Option<LogFormat>) -> anyhow::Result<TraceGuard> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format.unwrap_or(if terminal { LogFormat::Text } else { LogFormat::Json }) {
        // One object per line, the event's fields at the top level, for collectors.
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
        // Colours for a person at a terminal; plain text when redirected.
        LogFormat::Text => logs.with_ansi(terminal).boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    #[cfg(feature = "otel")]
    {
        let (traces, guard) = otel::layer()?.unzip();
        registry.with(traces).init();
        Ok(guard)
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        Ok(None)
    }
}

/// What sends traces until `main` ends: the `otel` feature's exporter, when one is configured.
#[cfg(feature = "otel")]
type TraceGuard = Option<otel::Traces>;
#[cfg(not(feature = "otel"))]
type TraceGuard = Option<std::convert::Infallible>;

/// `/metrics` alone on `bind` (`server.metrics_bind`), until shutdown.
async fn serve_metrics(bind: SocketAddr, config: &Config, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
    // Logged, not printed: stdout's one line is the main address, which scripts read.
    tracing::info!(address = %listener.local_addr()?, "serving /metrics");
    let app = Arc::new(App::metrics_only(&config.server, metrics));
    let limits = ConnectionLimits::from_config(&config.server);
    tokio::spawn(server::serve(listener, app, limits, shutdown_signal()));
    Ok(())
}

/// Folds the histograms' recent samples into their buckets every few seconds, as the exporter
/// needs when nothing scrapes it (otherwise samples pile up until the next scrape).
async fn metrics_upkeep(metrics: PrometheusHandle) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        every.tick().await;
        metrics.run_upkeep();
    }
}

/// `check-config`: everything `serve` does before it answers requests, then a summary.
async fn check_config(config: Config, text: &str, loader: &Loader) -> anyhow::Result<()> {
    let loaded = loader.first(config.clone(), text).await?;
    for (name, model) in &loaded.models {
        let info = model.info();
        let measured: Vec<String> = info.precision_choice.candidates.iter().map(ToString::to_string).collect();
        let how = if measured.is_empty() {
            String::new()
        } else {
            let by = if info.precision_choice.mode == "auto" { "auto measured" } else { "measured at load" };
            format!("; {by}: {}", measured.join("; "))
        };
        let pass = format!("passes of {} rows, {} tokens", info.limits.max_sequences, info.limits.max_tokens);
        let format = if info.format == batchbox_model::Format::Aoti { ", AOTInductor" } else { "" };
        println!(
            "model {name}: {} on {}, {pass} ({:?}{format}{how})",
            info.manifest.version, info.device, info.precision
        );
    }
    for tenant in &config.tenants {
        let routes: Vec<String> = tenant.routes.iter().map(ToString::to_string).collect();
        let keys = match tenant.key_hashes.len() {
            0 => "public (no keys)".to_owned(),
            n => format!("{n} key(s)"),
        };
        let share = config
            .queue_shares(&tenant.model)
            .into_iter()
            .find(|(name, _)| *name == tenant.name)
            .map_or(0, |(_, share)| share);
        println!(
            "tenant {}: routes {routes:?}, model {}, {keys}, limits {:?}, share of the model's queue {share} tokens",
            tenant.name, tenant.model, tenant.limits
        );
    }
    println!("config OK");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// The route `predict` answers as: the sentence classifier's.
const PREDICT_ROUTE: &str = "/api/v1/predict/sentences";

/// `predict`: the sentences go to the plugin of the tenant that serves [`PREDICT_ROUTE`], as a
/// request to it would, so the labels and probabilities are the plugin's (post-processing is the
/// plugin's job, never the host's); this prints them as a table.
async fn predict(config: Config, text: &str, loader: &Loader, mut sentences: Vec<String>) -> anyhow::Result<()> {
    let tenant = Tenants::new(&config.tenants)
        .route(None, PREDICT_ROUTE)
        .map(|tenant| tenant.name.clone())
        .with_context(|| format!("no tenant serves {PREDICT_ROUTE} in the config"))?;
    if sentences.is_empty() {
        sentences = std::io::stdin().lock().lines().collect::<Result<_, _>>().context("reading stdin")?;
    }
    let plugins = loader.first(config, text).await?.plugins;
    let request = json_post(PREDICT_ROUTE, serde_json::to_vec(&serde_json::json!({ "sentences": sentences }))?);
    let response = plugins.handle(&tenant, 0, request).await?;
    let answer: serde_json::Value = serde_json::from_slice(&response.body)
        .with_context(|| format!("tenant {tenant} answered {} with a body that is not JSON", response.status))?;
    anyhow::ensure!(response.status == 200, "tenant {tenant} answered {}: {answer}", response.status);
    let rows = answer["predictions"].as_array().zip(answer["probabilities"].as_array());
    let (predictions, probabilities) =
        rows.with_context(|| format!("tenant {tenant}'s answer has no predictions and probabilities: {answer}"))?;
    let truncated = &answer["metadata"]["truncated"];
    for (i, ((sentence, label), row)) in sentences.iter().zip(predictions).zip(probabilities).enumerate() {
        let p = row.as_array().into_iter().flatten().filter_map(serde_json::Value::as_f64).fold(0.0, f64::max);
        let flag = if truncated.as_array().is_some_and(|t| t.contains(&i.into())) { " (truncated)" } else { "" };
        println!("{:<14} {p:.3}  {sentence}{flag}", label.as_str().unwrap_or("?"));
    }
    let metadata = &answer["metadata"];
    eprintln!(
        "{} sentences, {} tokens in {} forward passes, {} ms",
        sentences.len(),
        metadata["total_tokens"],
        metadata["forward_passes"],
        metadata["processing_time_ms"],
    );
    Ok(())
}
