//! The model runtime: an exported model directory loaded on CPU or CUDA, with a Rust tokenizer
//! and a dedicated thread that owns the torch module.
//!
//! Callers tokenize on their own threads ([`Model::tokenize`]) and submit token ids
//! ([`Model::infer_for`]) to the model's scheduler (see [`crate::batcher::scheduler`]), which
//! forms batches across all waiting calls; the model thread runs them (see `worker.rs`) and each
//! caller gets one output per sequence, in its own order.

mod device;
mod engine;
pub mod manifest;
mod precision;
pub mod tokenize;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use manifest::{Manifest, Task};
pub use precision::{Candidate, Precision, PrecisionChoice};
pub use tokenize::{Encoding, TextTokenizer};

use crate::batcher::scheduler::{Rejected, Scheduler, SchedulerConfig, SharesTooLarge};
use crate::batcher::{BatchLimits, ChunkOrder};
use crate::config::{Config, CpuDtype, DeviceSpec, ModelConfig};
use worker::{Job, Queue, Shared};
pub use worker::Counters;

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
    #[error(
        "{dir} has no {variant} variant (it has {available:?}); add it by re-exporting the model: \
         `.venv/bin/python tools/export_model.py <checkpoint PATH | default | synthetic> --out {dir} --variants {}`{}",
        with_variant(available, variant),
        if with_variant(available, variant).contains("cuda") { ", on a machine with CUDA" } else { "" }
    )]
    MissingVariant { dir: PathBuf, variant: String, available: Vec<String> },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{0}")]
    Overloaded(Rejected),
    #[error(transparent)]
    Shares(#[from] SharesTooLarge),
    #[error("waited {0:?} in the model's queue, past the request's deadline")]
    TimedOut(Duration),
    #[error("model returned shape {got:?}, expected {expected:?}")]
    OutputShape { expected: Vec<i64>, got: Vec<i64> },
    #[error("out of memory, even for this sequence alone: {0}")]
    OutOfMemory(String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("forward pass panicked: {0}")]
    Panicked(String),
    #[error("the model thread has stopped")]
    Stopped,
}

/// The variants a model has, plus the one it lacks: what `--variants` should say to add it.
fn with_variant(available: &[String], variant: &str) -> String {
    let mut all = available.to_vec();
    all.push(variant.to_owned());
    all.sort();
    all.join(",")
}

impl ModelError {
    /// libtorch reports allocation failures as plain errors; their text tells them apart.
    fn from_torch(error: tch::TchError) -> Self {
        let message = error.to_string();
        let lower = message.to_lowercase();
        if lower.contains("out of memory") || lower.contains("can't allocate memory") || lower.contains("not enough memory") {
            Self::OutOfMemory(message)
        } else {
            Self::Forward(message)
        }
    }

    fn is_out_of_memory(&self) -> bool {
        matches!(self, Self::OutOfMemory(_))
    }
}

/// Runs one padded forward pass. The engine implements it on torch; tests inject faults with
/// their own.
pub(crate) trait Executor {
    fn forward(&mut self, batch: &Padded) -> Result<Vec<Output>, ModelError>;
}

/// A forward pass's inputs: token ids and attention mask, `[rows, padded_len]`, built by a
/// `Padder` before the pass runs.
pub(crate) struct Padded {
    pub ids: tch::Tensor,
    pub mask: tch::Tensor,
    /// Each row's own length.
    pub lens: Vec<usize>,
    pub padded_len: usize,
}

/// One sequence's logits: `[labels]`, or `[tokens, labels]` for token classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Everything needed to load a model; usually built from the config file.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub path: PathBuf,
    pub device: DeviceSpec,
    pub use_fp16: bool,
    pub cpu_dtype: CpuDtype,
    pub limits: BatchLimits,
    /// How long a batch that is not full may wait for more work.
    pub max_queue_delay: Duration,
    /// Tokens that may wait for the model; more is refused at once (`Overloaded`).
    pub max_queued_tokens: usize,
    /// Each tenant's share of `max_queued_tokens` (see [`crate::batcher::scheduler`]); a tenant
    /// not named gets only room no share reserves.
    pub queue_shares: Vec<(String, usize)>,
    /// A target for one forward pass: batches predicted to take longer are shrunk. `None`: no target.
    pub max_batch_time: Option<Duration>,
    /// `InputOrder` reproduces the seed's batching; only benchmarks want it.
    pub chunk_order: ChunkOrder,
}

impl ModelOptions {
    /// The options for one of the config's models; the batching settings are shared by all.
    pub fn from_config(config: &Config, model: &ModelConfig) -> Self {
        Self {
            path: model.path.clone(),
            device: model.device,
            use_fp16: config.api.use_fp16,
            cpu_dtype: model.cpu_dtype,
            limits: config.batch_limits(),
            max_queue_delay: Duration::from_millis(config.api.max_queue_delay_ms),
            max_queued_tokens: config.api.max_queued_tokens.get(),
            queue_shares: config.queue_shares(&model.name),
            max_batch_time: Some(Duration::from_millis(config.api.max_batch_ms)),
            chunk_order: config.api.batch_order.into(),
        }
    }
}

/// What a loaded model is, for logs and responses.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub manifest: Manifest,
    pub device: String,
    pub precision: Precision,
    /// How the precision was chosen, with what `cpu_dtype: auto` measured.
    pub precision_choice: PrecisionChoice,
}

/// What one call cost, for timing metadata and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Forward passes this call's sequences were part of.
    pub forward_passes: usize,
    /// Padded tokens the model computed for this call's rows.
    pub padded_tokens: usize,
    /// Tokens of the call's sequences themselves.
    pub real_tokens: usize,
}

/// The result of one [`Model::infer`] call.
#[derive(Debug, Clone)]
pub struct Inference {
    pub outputs: Vec<Output>,
    /// From submission to the first forward pass that held one of its sequences.
    pub queued: Duration,
    /// Time of the forward passes its sequences were part of.
    pub computed: Duration,
    /// The forward passes (numbered per model) that computed it, shared with other calls.
    pub batch_ids: Vec<u64>,
    pub stats: RunStats,
}

impl Inference {
    /// The answer to a call the model had nothing to compute for.
    pub fn nothing_computed() -> Self {
        Self { outputs: Vec::new(), queued: Duration::ZERO, computed: Duration::ZERO, batch_ids: Vec::new(), stats: RunStats::default() }
    }
}

/// Who a call is for, so the scheduler can share the model fairly.
pub const DEFAULT_TENANT: &str = "default";

/// A loaded model. Cheap to share behind an `Arc`; dropping the last one stops the model thread
/// and waits for it (at most the pass it is running).
pub struct Model {
    info: ModelInfo,
    tokenizer: TextTokenizer,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Model {
    /// Loads the model on its own thread and warms it up; returns once it is ready to serve.
    pub fn load(options: &ModelOptions) -> Result<Arc<Model>, ModelError> {
        let manifest = Manifest::load(&options.path)?;
        let tokenizer = TextTokenizer::from_file(&options.path.join("tokenizer.json"), manifest.max_length)?;
        let device = device::resolve(options.device)?;
        let scheduler = Scheduler::with_shares(
            SchedulerConfig {
                limits: options.limits,
                max_queue_delay: options.max_queue_delay,
                max_queued_tokens: options.max_queued_tokens,
                max_pass_over: 8,
                // Long enough to remember a flood across a light tenant's whole request, short
                // enough that a tenant's own burst is soon forgotten.
                usage_half_life: Duration::from_secs(2),
                max_batch_time: options.max_batch_time,
                order: options.chunk_order,
            },
            &options.queue_shares,
        )?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { scheduler, jobs: Default::default(), next_request: 1, next_batch: 1, stopped: false }),
            wakeup: Condvar::new(),
            counters: Counters::default(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (path, thread_manifest, thread_shared) = (options.path.clone(), manifest.clone(), shared.clone());
        let (use_fp16, cpu_dtype) = (options.use_fp16, options.cpu_dtype);
        let thread = std::thread::Builder::new()
            .name("model".into())
            .spawn(move || match precision::choose(&path, &thread_manifest, device, use_fp16, cpu_dtype) {
                Ok((engine, precision, choice)) => {
                    let _ = ready_tx.send(Ok((precision, choice)));
                    let padder = engine.padder();
                    worker::serve(engine, padder, thread_shared, device.is_cuda());
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .expect("spawning the model thread");
        let (precision, precision_choice) = ready_rx.recv().map_err(|_| ModelError::Stopped)??;
        let info = ModelInfo { manifest, device: format!("{device:?}").to_lowercase(), precision, precision_choice };
        Ok(Arc::new(Model { info, tokenizer, shared, thread: Some(thread) }))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizes on the calling thread (in parallel across texts), truncating to the max length.
    pub fn tokenize<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Encoding>, ModelError> {
        self.tokenizer.encode_batch(texts)
    }

    /// Runs token id sequences through the model for `tenant`; one output per sequence, in input
    /// order. Fails at once with `Overloaded` when the queue is full, and with `TimedOut` if the
    /// sequences are still waiting at `deadline`. Dropping the future withdraws what still waits.
    pub async fn infer_for(&self, tenant: &str, sequences: Vec<Vec<u32>>, deadline: Option<Instant>) -> Result<Inference, ModelError> {
        self.submit(tenant, sequences, deadline)?.await.map_err(|_| ModelError::Stopped)?
    }

    /// [`Model::infer_for`] the default tenant, without a deadline.
    pub async fn infer(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        self.infer_for(DEFAULT_TENANT, sequences, None).await
    }

    /// [`Model::infer`] for callers outside an async runtime (CLI, tests, benchmarks).
    pub fn infer_blocking(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        self.submit(DEFAULT_TENANT, sequences, None)?.blocking_recv().map_err(|_| ModelError::Stopped)?
    }

    /// What a cached output is keyed by besides its token ids: the weights and tokenizer
    /// (version) and the precision they run at.
    pub fn cache_version(&self) -> String {
        format!("{}/{:?}", self.info.manifest.version, self.info.precision)
    }

    /// Queue depth right now: (sequences, tokens).
    pub fn queue_depth(&self) -> (usize, usize) {
        let queue = self.shared.lock();
        (queue.scheduler.queued_sequences(), queue.scheduler.queued_tokens())
    }

    /// What the model has done since it started.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn submit(
        &self,
        tenant: &str,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Result<Inference, ModelError>>, ModelError> {
        validate(&sequences, &self.info.manifest)?;
        let (reply, answer) = oneshot::channel();
        let real_tokens = sequences.iter().map(Vec::len).sum();
        if sequences.is_empty() {
            let _ = reply.send(Ok(Inference::nothing_computed()));
            return Ok(answer);
        }
        let now = Instant::now();
        let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let mut queue = self.shared.lock();
        let id = queue.next_request;
        queue.next_request += 1;
        if let Err(rejected) = queue.scheduler.submit(id, tenant, &lengths, deadline, now) {
            Counters::add(&self.shared.counters.rejected, 1);
            return Err(ModelError::Overloaded(rejected));
        }
        let job = Job {
            outputs: vec![None; sequences.len()],
            sequences,
            enqueued: now,
            first_batch: None,
            computed: Duration::ZERO,
            batch_ids: Vec::new(),
            stats: RunStats { real_tokens, ..RunStats::default() },
            reply,
        };
        queue.jobs.insert(id, job);
        drop(queue);
        self.shared.wakeup.notify_one();
        Ok(answer)
    }
}

impl Drop for Model {
    /// Stops the model thread and joins it, so the module and its tensors are freed before
    /// `main` returns. A thread left running frees them while the process exits, after libtorch's
    /// CUDA allocator is gone: the GPU check saw that abort the process ("invalid device pointer").
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.wakeup.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Refuses what the model cannot take before it reaches the queue.
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
/// request does not. Short sequences twice (the JIT optimises after profiling), the longest, then
/// a batch shaped like traffic (32 short rows) a few times, so the first requests do not pay for
/// profiling a served shape either; `cpu_dtype: auto` times its candidates after this.
fn warm_up(engine: &mut engine::Engine, manifest: &Manifest) -> Result<(), ModelError> {
    let id = (manifest.vocab_size / 2) as u32;
    let short = vec![id; 16.min(manifest.max_length)];
    let padder = engine.padder();
    for _ in 0..2 {
        engine.forward(&padder.pad(&[&short, &short]))?;
    }
    let long = vec![id; manifest.max_length];
    engine.forward(&padder.pad(&[&long]))?;
    let typical = vec![id; 48.min(manifest.max_length)];
    let batch = padder.pad(&vec![typical.as_slice(); 32]);
    for _ in 0..3 {
        engine.forward(&batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_last_handle_returns_only_after_the_model_thread_has_freed_the_module() {
        let model = Model::load(&ModelOptions {
            path: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/minilm-topics"),
            device: DeviceSpec::Cpu,
            use_fp16: false,
            cpu_dtype: CpuDtype::Fp32,
            limits: BatchLimits { max_sequences: 32.try_into().unwrap(), max_tokens: 8192.try_into().unwrap() },
            max_queue_delay: Duration::ZERO,
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        })
        .unwrap();
        model.infer_blocking(vec![vec![101, 2023, 102]]).unwrap();
        // The model thread holds `shared` until it has dropped the module (see `worker::serve`).
        let shared = Arc::downgrade(&model.shared);
        drop(model);
        assert!(shared.upgrade().is_none(), "drop returned while the model thread still held the module");
    }
}
