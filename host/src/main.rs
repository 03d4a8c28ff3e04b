//! The `batchbox` command line.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use batchbox::config::Config;
use batchbox_model::{Model, Task};
use batchbox_model_tch::DeviceSpec;
use batchbox_plugins::PluginRuntime;
use batchbox_server::{self as server, App, ConnectionLimits, Loaded};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Serve a libtorch classifier with batched inference")]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "BATCHBOX_CONFIG", default_value = "shared_config.yaml")]
    config: PathBuf,
    /// Overrides every model's `device` (auto, cpu, cuda, cuda:N).
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    #[command(subcommand)]
    command: Command,
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
    /// Classify sentences given as arguments (or one per line on stdin) and print the top labels.
    Predict {
        /// Which of the config's models (default: the first).
        #[arg(long)]
        model: Option<String>,
        sentences: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = Config::load(&cli.config)?;
    if let Some(device) = cli.device {
        config.models.iter_mut().for_each(|m| m.device = device);
    }
    match cli.command {
        Command::Serve { bind, port } => {
            if let Some(bind) = bind {
                config.server.bind = bind;
            }
            if let Some(port) = port {
                config.server.bind.set_port(port);
            }
            tokio::runtime::Runtime::new()?.block_on(serve(config))
        }
        Command::CheckConfig => tokio::runtime::Runtime::new()?.block_on(check_config(&config)),
        Command::Predict { model, sentences } => predict(&config, model, sentences),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Listen first, so /health answers while the model loads and /ready tells when it is done.
    let listener = tokio::net::TcpListener::bind(config.server.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.bind))?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}");
    tracing::info!(%address, "listening");
    let app = Arc::new(App::new(&config.server, &config.tenants));
    let limits = ConnectionLimits::from_config(&config.server);
    let server = tokio::spawn(server::serve(listener, app.clone(), limits, shutdown_signal()));

    let (models, plugins) = load(&config).await?;
    app.set_loaded(Loaded { models, plugins });
    server.await?;
    Ok(())
}

/// Loads every model (each on its own thread, with its own batcher) and every tenant's plugin.
async fn load(config: &Config) -> anyhow::Result<(Vec<(String, Arc<Model>)>, PluginRuntime)> {
    let started = Instant::now();
    let mut models = Vec::new();
    for model_config in &config.models {
        let options = config.model_options(model_config);
        let model = tokio::task::spawn_blocking(move || batchbox_model_tch::load(&options))
            .await?
            .with_context(|| format!("model {}", model_config.name))?;
        let info = model.info();
        tracing::info!(model = model_config.name, version = %info.manifest.version, device = %info.device, precision = ?info.precision, "model loaded");
        models.push((model_config.name.clone(), model));
    }
    let by_name: HashMap<String, Arc<Model>> = models.iter().cloned().collect();
    let plugins =
        PluginRuntime::load(&config.tenants, &by_name, config.server.max_instances, &config.server.plugin_cache_dir)
            .await?;
    for tenant in &config.tenants {
        if tenant.key_hashes.is_empty() {
            tracing::warn!(tenant = tenant.name, "tenant has no keys: anyone may call it");
        }
    }
    tracing::info!(
        models = models.len(),
        tenants = config.tenants.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "ready"
    );
    Ok((models, plugins))
}

/// `check-config`: everything `serve` does before it answers requests, then a summary.
async fn check_config(config: &Config) -> anyhow::Result<()> {
    let (models, _plugins) = load(config).await?;
    for (name, model) in &models {
        let info = model.info();
        let measured: Vec<String> = info
            .precision_choice
            .candidates
            .iter()
            .map(|c| {
                format!(
                    "{:?} {:.1} ms, {}/{} golden texts agree",
                    c.precision, c.median_ms, c.agreeing_texts, c.golden_texts
                )
            })
            .collect();
        let how = if measured.is_empty() {
            String::new()
        } else {
            format!("; cpu_dtype auto measured: {}", measured.join("; "))
        };
        println!("model {name}: {} on {} ({:?}{how})", info.manifest.version, info.device, info.precision);
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

fn predict(config: &Config, model: Option<String>, mut sentences: Vec<String>) -> anyhow::Result<()> {
    let model_config = match &model {
        Some(name) => config.model(name).with_context(|| format!("no model named {name} in the config"))?,
        None => &config.models[0],
    };
    if sentences.is_empty() {
        sentences = std::io::stdin().lock().lines().collect::<Result<_, _>>().context("reading stdin")?;
    }
    let started = Instant::now();
    let model = batchbox_model_tch::load(&config.model_options(model_config))?;
    let info = model.info();
    tracing::info!(
        model = %info.manifest.version, device = %info.device, precision = ?info.precision,
        elapsed_ms = started.elapsed().as_millis() as u64, "model loaded and warmed up"
    );
    anyhow::ensure!(
        info.manifest.task == Task::SequenceClassification,
        "`predict` prints one label per sentence; {} is a {:?} model",
        info.manifest.name,
        info.manifest.task
    );

    let started = Instant::now();
    let encodings = model.tokenize(&sentences)?;
    let tokenized = started.elapsed();
    let inference = model.infer_blocking(encodings.iter().map(|e| e.ids.clone()).collect())?;
    for ((sentence, encoding), output) in sentences.iter().zip(&encodings).zip(&inference.outputs) {
        let probabilities = softmax(&output.data);
        let (best, p) = probabilities.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("labels");
        let flag = if encoding.truncated { " (truncated)" } else { "" };
        println!("{:<14} {p:.3}  {sentence}{flag}", info.manifest.labels[best]);
    }
    eprintln!(
        "{} sentences, {} tokens ({} padded) in {} forward passes: tokenize {:.1} ms, model {:.1} ms",
        sentences.len(),
        inference.stats.real_tokens,
        inference.stats.padded_tokens,
        inference.stats.forward_passes,
        tokenized.as_secs_f64() * 1e3,
        inference.computed.as_secs_f64() * 1e3,
    );
    Ok(())
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|x| x / sum).collect()
}
