//! The `batchbox` command line.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use batchbox::config::{Config, DeviceSpec};
use batchbox::model::{Model, ModelOptions, Task};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Serve a libtorch classifier with batched inference")]
struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "BATCHBOX_CONFIG", default_value = "shared_config.yaml")]
    config: PathBuf,
    /// Overrides `model.device` (auto, cpu, cuda, cuda:N).
    #[arg(long, global = true)]
    device: Option<DeviceSpec>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify sentences given as arguments (or one per line on stdin) and print the top labels.
    Predict { sentences: Vec<String> },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = Config::load(&cli.config)?;
    if let Some(device) = cli.device {
        config.model.device = device;
    }
    match cli.command {
        Command::Predict { sentences } => predict(&config, sentences),
    }
}

fn predict(config: &Config, mut sentences: Vec<String>) -> anyhow::Result<()> {
    if sentences.is_empty() {
        sentences = std::io::stdin().lock().lines().collect::<Result<_, _>>().context("reading stdin")?;
    }
    let started = Instant::now();
    let model = Model::load(&ModelOptions::from_config(config))?;
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
