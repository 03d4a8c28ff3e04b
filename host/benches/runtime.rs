//! 120 sentences through the model runtime on CPU, the seed's ways against batchbox's.
//!
//! `make bench` (exports the synthetic DeBERTa-v3-base first), or
//! `cargo bench -p batchbox-host --bench runtime -- [--rounds N] [--models a,b]`.
//!
//! Each round runs every setup once, in turn, so a noisy neighbour slows them all alike;
//! the table gives medians over rounds and ratios against the seed's two ways.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use batchbox_batcher::ChunkOrder;
use batchbox_model::{QueueOptions, RunStats};
use batchbox_model_tch::{CpuDtype, DeviceSpec, FormatChoice, ModelOptions, PassShape};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser)]
struct Args {
    /// Timed rounds per setup (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Model directories under models/.
    #[arg(long, value_delimiter = ',', default_value = "minilm-topics,synthetic-deberta-v3-base")]
    models: Vec<String>,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Setup {
    name: &'static str,
    dtype: CpuDtype,
    max_sequences: usize,
    order: ChunkOrder,
}

const SETUPS: [Setup; 5] = [
    Setup {
        name: "one pass per sentence (seed's old way)",
        dtype: CpuDtype::Fp32,
        max_sequences: 1,
        order: ChunkOrder::InputOrder,
    },
    Setup {
        name: "batches of 32, input order (seed's fix)",
        dtype: CpuDtype::Fp32,
        max_sequences: 32,
        order: ChunkOrder::InputOrder,
    },
    Setup {
        name: "batches of 32, length-sorted",
        dtype: CpuDtype::Fp32,
        max_sequences: 32,
        order: ChunkOrder::LengthSorted,
    },
    Setup {
        name: "batches of 32, input order, bf16",
        dtype: CpuDtype::Bf16,
        max_sequences: 32,
        order: ChunkOrder::InputOrder,
    },
    Setup {
        name: "batches of 32, length-sorted, bf16",
        dtype: CpuDtype::Bf16,
        max_sequences: 32,
        order: ChunkOrder::LengthSorted,
    },
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    #[derive(Deserialize)]
    struct Fixture {
        sentences: Vec<String>,
    }
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/test_120_sentences.json"))?)?;
    let sentences = fixture.sentences;
    println!("{} sentences, {} rounds, torch threads: {}", sentences.len(), args.rounds, tch::get_num_threads());

    for model_name in &args.models {
        let path: PathBuf = root.join("models").join(model_name);
        let models = SETUPS
            .iter()
            .map(|setup| {
                batchbox_model_tch::load(&ModelOptions {
                    path: path.clone(),
                    device: DeviceSpec::Cpu,
                    use_fp16: false,
                    cpu_dtype: setup.dtype,
                    cpu_backend: FormatChoice::TorchScript,
                    gpu_backend: FormatChoice::TorchScript,
                    pass: PassShape::fixed(setup.max_sequences, 8192),
                    queue: QueueOptions {
                        name: setup.name.to_string(),
                        max_queue_delay: std::time::Duration::ZERO,
                        max_queued_tokens: 1 << 20,
                        queue_shares: Vec::new(),
                        max_batch_time: None,
                        chunk_order: setup.order,
                    },
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); SETUPS.len()];
        let mut stats = vec![RunStats::default(); SETUPS.len()];
        for round in 0..=args.rounds {
            for (i, model) in models.iter().enumerate() {
                let started = Instant::now();
                let ids = model.tokenize(&sentences)?.into_iter().map(|e| e.ids).collect();
                let inference = model.infer_blocking(ids)?;
                let elapsed = started.elapsed();
                if round > 0 {
                    times[i].push(elapsed);
                }
                stats[i] = inference.stats;
            }
        }

        let medians: Vec<f64> = times.iter_mut().map(|t| median_ms(t)).collect();
        println!("\n### {model_name}\n");
        println!("| setup | median ms | min–max ms | passes | real/padded tokens | vs one pass each | vs seed's fix |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (i, setup) in SETUPS.iter().enumerate() {
            let (min, max) = (times[i].first().unwrap(), times[i].last().unwrap());
            println!(
                "| {} | {:.1} | {:.1}–{:.1} | {} | {}/{} | {:.2}× | {:.2}× |",
                setup.name,
                medians[i],
                min.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3,
                stats[i].forward_passes,
                stats[i].real_tokens,
                stats[i].padded_tokens,
                medians[0] / medians[i],
                medians[1] / medians[i],
            );
        }
    }
    Ok(())
}

/// Sorts in place and returns the median in milliseconds.
fn median_ms(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}
