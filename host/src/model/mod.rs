//! The model runtime: an exported model directory loaded on CPU or CUDA, with a Rust tokenizer
//! and a dedicated thread that owns the torch module.
//!
//! Callers tokenize on their own threads ([`Model::tokenize`]) and send token ids to the model
//! thread through a bounded channel ([`Model::infer`]); the thread plans length-sorted chunks
//! (see [`crate::batcher`]) and answers with one output per sequence, in input order.

mod device;
mod engine;
pub mod manifest;
pub mod tokenize;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use engine::RunStats;
pub use manifest::{Manifest, Task};
pub use tokenize::{Encoding, TextTokenizer};

use crate::batcher::{BatchLimits, ChunkOrder};
use crate::config::{Config, CpuDtype, DeviceSpec};
use engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("cannot load TorchScript module {path}: {source}")]
    Load { path: PathBuf, source: tch::TchError },
    #[error("CUDA was required (device: {requested}) but is not usable: {why}")]
    CudaUnavailable { requested: String, why: String },
    #[error("the model has no {variant} variant (it has {available:?}); re-export it with tools/export_model.py --variants {variant}, on a machine with CUDA for cuda variants")]
    MissingVariant { variant: String, available: Vec<String> },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("model returned shape {got:?}, expected {expected:?}")]
    OutputShape { expected: Vec<i64>, got: Vec<i64> },
    #[error("forward pass failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("forward pass panicked: {0}")]
    Panicked(String),
    #[error("the model thread has stopped")]
    Stopped,
}

/// One sequence's logits: `[labels]`, or `[tokens, labels]` for token classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Numeric precision of the loaded weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// The manifest's name for the traced file that runs at this precision on `device`.
    fn variant(self, device: tch::Device) -> String {
        let device = if device.is_cuda() { "cuda" } else { "cpu" };
        let dtype = match self {
            Self::Fp32 => "float32",
            Self::Fp16 => "float16",
            Self::Bf16 => "bfloat16",
        };
        format!("{device}-{dtype}")
    }

    /// fp16 only on CUDA (`use_fp16`); on CPU, bf16 if asked for, as fp16 matmuls are slow there.
    fn choose(device: tch::Device, use_fp16: bool, cpu_dtype: CpuDtype) -> Self {
        match (device.is_cuda(), use_fp16, cpu_dtype) {
            (true, true, _) => Self::Fp16,
            (true, false, _) | (false, _, CpuDtype::Fp32) => Self::Fp32,
            (false, _, CpuDtype::Bf16) => Self::Bf16,
        }
    }
}

/// Everything needed to load a model; usually built from the config file.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub path: PathBuf,
    pub device: DeviceSpec,
    pub use_fp16: bool,
    pub cpu_dtype: CpuDtype,
    pub limits: BatchLimits,
    pub queue_capacity: usize,
    /// `InputOrder` reproduces the seed's batching; only benchmarks want it.
    pub chunk_order: ChunkOrder,
}

impl ModelOptions {
    pub fn from_config(config: &Config) -> Self {
        Self {
            path: config.model.path.clone(),
            device: config.model.device,
            use_fp16: config.api.use_fp16,
            cpu_dtype: config.model.cpu_dtype,
            limits: config.batch_limits(),
            queue_capacity: config.model.queue_capacity.get(),
            chunk_order: ChunkOrder::LengthSorted,
        }
    }
}

/// What a loaded model is, for logs and responses.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub manifest: Manifest,
    pub device: String,
    pub precision: Precision,
}

/// The result of one [`Model::infer`] call.
#[derive(Debug, Clone)]
pub struct Inference {
    pub outputs: Vec<Output>,
    /// Time spent waiting for the model thread.
    pub queued: Duration,
    /// Time the model thread spent on this call.
    pub computed: Duration,
    pub stats: RunStats,
}

struct Job {
    sequences: Vec<Vec<u32>>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Inference, ModelError>>,
}

/// A loaded model. Cheap to share behind an `Arc`; dropping the last one stops the model thread.
pub struct Model {
    info: ModelInfo,
    tokenizer: TextTokenizer,
    jobs: mpsc::Sender<Job>,
}

impl Model {
    /// Loads the model on its own thread and warms it up; returns once it is ready to serve.
    pub fn load(options: &ModelOptions) -> Result<Arc<Model>, ModelError> {
        let manifest = Manifest::load(&options.path)?;
        let tokenizer = TextTokenizer::from_file(&options.path.join("tokenizer.json"), manifest.max_length)?;
        let device = device::resolve(options.device)?;
        let precision = Precision::choose(device, options.use_fp16, options.cpu_dtype);
        let (jobs, queue) = mpsc::channel(options.queue_capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_options = options.clone();
        let thread_manifest = manifest.clone();
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                let loaded = Engine::load(
                    &thread_options.path,
                    &thread_manifest,
                    device,
                    precision,
                    thread_options.limits,
                    thread_options.chunk_order,
                )
                .and_then(|engine| warm_up(&engine, &thread_manifest).map(|()| engine));
                match loaded {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(engine, thread_manifest, queue);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .expect("spawning the model thread");
        ready_rx.recv().map_err(|_| ModelError::Stopped)??;
        let info = ModelInfo { manifest, device: format!("{device:?}").to_lowercase(), precision };
        Ok(Arc::new(Model { info, tokenizer, jobs }))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizes on the calling thread (in parallel across texts), truncating to the max length.
    pub fn tokenize<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Encoding>, ModelError> {
        self.tokenizer.encode_batch(texts)
    }

    /// Runs token id sequences through the model; one output per sequence, in input order.
    pub async fn infer(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { sequences, enqueued: Instant::now(), reply };
        self.jobs.send(job).await.map_err(|_| ModelError::Stopped)?;
        answer.await.map_err(|_| ModelError::Stopped)?
    }

    /// [`Model::infer`] for callers outside an async runtime (CLI, tests, benchmarks).
    pub fn infer_blocking(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { sequences, enqueued: Instant::now(), reply };
        self.jobs.blocking_send(job).map_err(|_| ModelError::Stopped)?;
        answer.blocking_recv().map_err(|_| ModelError::Stopped)?
    }
}

/// The model thread's loop: one job at a time until every `Model` handle is gone.
fn serve(engine: Engine, manifest: Manifest, mut queue: mpsc::Receiver<Job>) {
    while let Some(job) = queue.blocking_recv() {
        let started = Instant::now();
        let result = validate(&job.sequences, &manifest).and_then(|()| run_guarded(&engine, &job.sequences));
        let result = result.map(|(outputs, stats)| Inference {
            outputs,
            queued: started - job.enqueued,
            computed: started.elapsed(),
            stats,
        });
        // The caller may have given up waiting; that is not the model's problem.
        let _ = job.reply.send(result);
    }
}

/// A panic inside tch fails this job only; the thread goes on serving the next one.
fn run_guarded(engine: &Engine, sequences: &[Vec<u32>]) -> Result<(Vec<Output>, RunStats), ModelError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(sequences))).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(ModelError::Panicked(message))
    })
}

/// Refuses what the model cannot take before it reaches torch.
fn validate(sequences: &[Vec<u32>], manifest: &Manifest) -> Result<(), ModelError> {
    for (i, sequence) in sequences.iter().enumerate() {
        if sequence.is_empty() || sequence.len() > manifest.max_length {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} has {} tokens; the model takes 1 to {}",
                sequence.len(),
                manifest.max_length
            )));
        }
        if let Some(id) = sequence.iter().find(|&&id| id as usize >= manifest.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} has token id {id}, outside the vocabulary of {}",
                manifest.vocab_size
            )));
        }
    }
    Ok(())
}

/// A first pass pays for lazy initialisation (kernels, allocator, JIT profiling), so the first
/// request does not. Short sequences twice (the JIT optimises after profiling), then the longest.
fn warm_up(engine: &Engine, manifest: &Manifest) -> Result<(), ModelError> {
    let id = (manifest.vocab_size / 2) as u32;
    let short = vec![vec![id; 16.min(manifest.max_length)]; 2];
    for _ in 0..2 {
        engine.run(&short)?;
    }
    engine.run(&[vec![id; manifest.max_length]])?;
    Ok(())
}
