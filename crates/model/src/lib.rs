//! The model handle: an exported model directory's manifest and tokenizer, the queue in front
//! of the model, and a dedicated thread that owns the [`Backend`] running the forward passes.
//!
//! Callers tokenize on their own threads ([`Model::tokenize`]) and submit token ids
//! ([`Model::infer_for`]) to the model's scheduler (see [`batchbox_batcher::scheduler`]), which
//! forms batches across all waiting calls; the model thread runs them (see `worker.rs`) and each
//! caller gets one output per sequence, in its own order.
//!
//! Nothing here links libtorch: a backend speaks token ids in and outputs out
//! (`batchbox-model-tch` is the torch one; tests bring their own).

mod backend;
pub mod cache;
pub mod checks;
pub mod manifest;
mod metrics;
mod precision;
mod queue;
pub mod tokenize;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use backend::{Backend, LoadedBackend, Pad, warm_up};
pub use manifest::{Activation, Format, Manifest, Task, Variant};
pub use precision::{Candidate, Precision, PrecisionChoice};
pub use tokenize::{Encoding, PairTruncation, TextTokenizer};

use batchbox_batcher::scheduler::{Rejected, Scheduler, SchedulerConfig, SharesTooLarge};
use batchbox_batcher::{BatchLimits, ChunkOrder};
use queue::{Queue, Reply};
use worker::Shared;

/// Everything loading or running a model can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// At load: `manifest.json` (or, for `cpu_dtype: auto`, `golden.json`) is missing, unreadable or
    /// not what this build supports.
    #[error("invalid model manifest {path}: {message}")]
    Manifest {
        /// The file that was read.
        path: PathBuf,
        /// What was wrong with it.
        message: String,
    },
    /// At load: `tokenizer.json` cannot be read, or cannot be set to truncate at the model's max length.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The `tokenizers` crate's error.
        message: String,
    },
    /// The `tokenizers` crate failed to encode a text; carries its error.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// At load: the backend cannot load the chosen variant's traced file on its device.
    #[error("cannot load the model's module {path}: {message}")]
    Load {
        /// The traced file.
        path: PathBuf,
        /// The backend's error.
        message: String,
    },
    /// At load: the config names `cuda` or `cuda:N`, but libtorch_cuda does not load or that
    /// device is not visible (`auto` falls back to CPU instead).
    #[error("CUDA was required (device: {requested}) but is not usable: {why}")]
    CudaUnavailable {
        /// The device as configured, e.g. `cuda:1`.
        requested: String,
        /// Why it cannot be used.
        why: String,
    },
    /// At load: the manifest has no traced file for the precision and device chosen; the message
    /// gives the export command that adds it.
    #[error(
        "{dir} has no {variant} variant (it has {available:?}); add it by re-exporting the model: \
         `.venv/bin/python tools/export_model.py <checkpoint PATH | default | synthetic> --out {dir} --variants {}`{}",
        with_variant(available, variant),
        if with_variant(available, variant).contains("cuda") { ", on a machine with CUDA" } else { "" }
    )]
    MissingVariant {
        /// The exported model directory.
        dir: PathBuf,
        /// The variant needed, `<device>-<dtype>` (e.g. `cpu-bfloat16`).
        variant: String,
        /// The variants the manifest lists.
        available: Vec<String>,
    },
    /// A sequence is empty, longer than the manifest's `max_length`, or holds an id outside its
    /// `vocab_size`; refused before it reaches the queue.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The scheduler refused the call at once: the queue or the tenant's share is full, or the
    /// call can never fit ([`Rejected`] says which).
    #[error("{0}")]
    Overloaded(Rejected),
    /// The tenants' queue shares add up to more than `max_queued_tokens` (at start, or given by
    /// [`Model::set_queue_shares`]).
    #[error(transparent)]
    Shares(#[from] SharesTooLarge),
    /// The call's sequences were still waiting at its deadline; carries how long it waited.
    #[error("waited {0:?} in the model's queue, past the request's deadline")]
    TimedOut(Duration),
    /// The module's logits are not `[rows, labels]` (or `[rows, tokens, labels]` for token
    /// classification); a caller of `infer` gets it inside [`ModelError::Forward`].
    #[error("model returned shape {got:?}, expected {expected:?}")]
    OutputShape {
        /// The shape the manifest's task and labels call for.
        expected: Vec<i64>,
        /// The shape the module returned.
        got: Vec<i64>,
    },
    /// A forward pass ran out of memory: a backend returns it so the worker splits the batch, and
    /// a caller gets it when its sequence fails even alone. Carries the backend's message.
    #[error("out of memory, even for this sequence alone: {0}")]
    OutOfMemory(String),
    /// A forward pass failed for another reason; carries the error's text (the worker re-wraps any
    /// other backend error as this). Every call with a row in that pass gets it.
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// The backend panicked during a forward pass; carries the panic message. A caller of
    /// `infer` gets it inside [`ModelError::Forward`].
    #[error("forward pass panicked: {0}")]
    Panicked(String),
    /// The model thread ended without answering: at start, `load` panicked before returning; later,
    /// the call's reply was dropped unsent.
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
    fn is_out_of_memory(&self) -> bool {
        matches!(self, Self::OutOfMemory(_))
    }
}

/// One sequence's logits: `[labels]`, or `[tokens, labels]` for token classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The logits as f32, row-major in `shape`.
    pub data: Vec<f32>,
    /// `[labels]`, or `[tokens, labels]` with the sequence's own token count.
    pub shape: Vec<usize>,
}

/// How the queue in front of a model batches and bounds its work; built from the config's `api`
/// section (and the tenants' shares) by the binary.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// The model's name in the config: the `model` label of its metrics.
    pub name: String,
    /// How long a batch that is not full may wait for more work.
    pub max_queue_delay: Duration,
    /// Tokens that may wait for the model; more is refused at once (`Overloaded`).
    pub max_queued_tokens: usize,
    /// Each tenant's share of `max_queued_tokens` (see [`batchbox_batcher::scheduler`]); a tenant
    /// not named gets only room no share reserves.
    pub queue_shares: Vec<(String, usize)>,
    /// A target for one forward pass: batches predicted to take longer are shrunk. `None`: no target.
    pub max_batch_time: Option<Duration>,
    /// `InputOrder` reproduces the seed's batching; only benchmarks want it.
    pub chunk_order: ChunkOrder,
}

/// What a loaded model is, for logs and responses.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The exported model's `manifest.json`.
    pub manifest: Manifest,
    /// Where the backend runs, as it reports it (e.g. "cpu", "cuda(0)").
    pub device: String,
    /// The precision the weights run at.
    pub precision: Precision,
    /// How the precision was chosen, with what `cpu_dtype: auto` measured.
    pub precision_choice: PrecisionChoice,
    /// The format of the variant that runs: TorchScript or an AOTInductor package.
    pub format: Format,
    /// The rows and padded tokens one forward pass may hold.
    pub limits: BatchLimits,
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
    /// One output per submitted sequence, in submission order.
    pub outputs: Vec<Output>,
    /// From submission to the first forward pass that held one of its sequences.
    pub queued: Duration,
    /// Time of the forward passes its sequences were part of.
    pub computed: Duration,
    /// The forward passes (numbered per model) that computed it, shared with other calls.
    pub batch_ids: Vec<u64>,
    /// Passes and tokens this call cost.
    pub stats: RunStats,
}

impl Inference {
    /// The answer to a call the model had nothing to compute for.
    pub fn nothing_computed() -> Self {
        Self {
            outputs: Vec::new(),
            queued: Duration::ZERO,
            computed: Duration::ZERO,
            batch_ids: Vec::new(),
            stats: RunStats::default(),
        }
    }
}

/// Each tenant's share of a model's queue, in tokens, by tenant name.
pub type QueueShares = Vec<(String, usize)>;

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
    /// Starts the model exported in `dir`: reads its manifest and tokenizer here, then runs
    /// `load` on the model's own thread, which keeps the backend it returns and serves the queue
    /// with it, in passes of at most `limits`. Returns once the backend is loaded and warmed up,
    /// ready to serve.
    pub fn start<B, F>(
        dir: &Path,
        options: &QueueOptions,
        limits: BatchLimits,
        load: F,
    ) -> Result<Arc<Model>, ModelError>
    where
        B: Backend,
        F: FnOnce(&Path, &Manifest) -> Result<LoadedBackend<B>, ModelError> + Send + 'static,
    {
        let manifest = Manifest::load(dir)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), manifest.max_length, manifest.pairs)?;
        let scheduler = Scheduler::with_shares(
            SchedulerConfig {
                limits,
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
            queue: Mutex::new(Queue::new(scheduler)),
            wakeup: Condvar::new(),
            metrics: metrics::ModelMetrics::new(&options.name),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (path, thread_manifest, thread_shared) = (dir.to_owned(), manifest.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            // Named for its model, so `top -H` (and the reload test) can tell models' threads
            // apart; threads libtorch starts from it inherit the name. Linux keeps 15 bytes of
            // it: models whose names start alike share what shows.
            .name(format!("model-{}", options.name))
            .spawn(move || match load(&path, &thread_manifest) {
                Ok(LoadedBackend { backend, device, precision, format, precision_choice }) => {
                    let _ = ready_tx.send(Ok((device, precision, format, precision_choice)));
                    worker::serve(backend, thread_shared);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .expect("spawning the model thread");
        let (device, precision, format, precision_choice) = ready_rx.recv().map_err(|_| ModelError::Stopped)??;
        let info = ModelInfo { manifest, device, precision, precision_choice, format, limits };
        metrics::model_info(&options.name, &info);
        Ok(Arc::new(Model { info, tokenizer, shared, thread: Some(thread) }))
    }

    /// What was loaded, where, and at which precision.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Tokenizes on the calling thread (in parallel across texts), truncating to the max length.
    pub fn tokenize<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Encoding>, ModelError> {
        self.tokenizer.encode_batch(texts)
    }

    /// Tokenizes sentence pairs as the model's tokenizer joins them (`[CLS] a [SEP] b [SEP]` or
    /// the like), truncating by `truncation` to the max length; for a model with token types,
    /// the second member's ids carry type 1 (see [`Manifest::token_types`]). `InvalidInput` for
    /// a model that takes no pairs, or a pair that cannot be cut to fit as asked.
    pub fn tokenize_pairs<S: AsRef<str> + Sync>(
        &self,
        pairs: &[(S, S)],
        truncation: PairTruncation,
    ) -> Result<Vec<Encoding>, ModelError> {
        let manifest = &self.info.manifest;
        if !manifest.pairs {
            return Err(ModelError::InvalidInput(format!(
                "model {} takes single texts, not sentence pairs ({})",
                manifest.name,
                match manifest.task {
                    Task::TokenClassification => "a token classifier",
                    Task::SequenceClassification => "exported before pairs were recorded: re-export it to serve pairs",
                }
            )));
        }
        let types = manifest.token_types.then_some(manifest.vocab_size as u32);
        self.tokenizer.encode_pairs(pairs, truncation, types)
    }

    /// Runs token id sequences through the model for `tenant`; one output per sequence, in input
    /// order. Fails at once with `Overloaded` when the queue is full, and with `TimedOut` if the
    /// sequences are still waiting at `deadline`. Dropping the future withdraws what still waits.
    pub async fn infer_for(
        &self,
        tenant: &str,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Result<Inference, ModelError> {
        self.submit(tenant, sequences, deadline)?.await.map_err(|_| ModelError::Stopped)?
    }

    /// [`Model::infer_for`] the default tenant, without a deadline.
    pub async fn infer(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        self.infer_for(DEFAULT_TENANT, sequences, None).await
    }

    /// [`Model::infer`] for callers outside an async runtime (tests, benchmarks).
    pub fn infer_blocking(&self, sequences: Vec<Vec<u32>>) -> Result<Inference, ModelError> {
        self.submit(DEFAULT_TENANT, sequences, None)?.blocking_recv().map_err(|_| ModelError::Stopped)?
    }

    /// What a cached output is keyed by besides its token ids: the weights and tokenizer
    /// (version), the precision they run at and the format that runs them.
    pub fn cache_version(&self) -> String {
        format!("{}/{:?}/{:?}", self.info.manifest.version, self.info.precision, self.info.format)
    }

    /// Gives the model's tenants new shares of its queue (a config reload); what waits stays.
    pub fn set_queue_shares(&self, shares: &[(String, usize)]) -> Result<(), ModelError> {
        Ok(self.shared.lock().set_shares(shares)?)
    }

    /// Queue depth right now: (sequences, tokens).
    pub fn queue_depth(&self) -> (usize, usize) {
        self.shared.lock().depth()
    }

    fn submit(&self, tenant: &str, sequences: Vec<Vec<u32>>, deadline: Option<Instant>) -> Result<Reply, ModelError> {
        validate(&sequences, &self.info.manifest)?;
        let reply = {
            let mut queue = self.shared.lock();
            let submitted = queue.submit(tenant, sequences, deadline, Instant::now());
            self.shared.metrics.queue_depth(queue.depth());
            submitted
        }
        .map_err(|rejected| {
            self.shared.metrics.rejected.increment(1);
            ModelError::Overloaded(rejected)
        })?;
        self.shared.wakeup.notify_one();
        Ok(reply)
    }
}

impl Drop for Model {
    /// Stops the model thread and joins it, so the module and its tensors are freed before
    /// `main` returns. A thread left running frees them while the process exits, after libtorch's
    /// CUDA allocator is gone: the GPU check saw that abort the process ("invalid device pointer").
    fn drop(&mut self) {
        self.shared.lock().stop();
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
        if let Some(id) = sequence.iter().find(|&&id| id as usize >= manifest.id_limit()) {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} has token id {id}, outside the vocabulary of {}{}",
                manifest.vocab_size,
                if manifest.token_types { " (twice that with a token type of 1)" } else { "" }
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A backend that answers one zero per row and records when it is dropped.
    struct Recorded(Arc<AtomicBool>);

    impl Drop for Recorded {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Backend for Recorded {
        type Padder = backend::tests::Rows;
        fn padder(&self) -> Self::Padder {
            backend::tests::Rows
        }
        fn forward(&mut self, batch: &Vec<Vec<u32>>) -> Result<Vec<Output>, ModelError> {
            Ok(batch.iter().map(|_| Output { data: vec![0.0], shape: vec![1] }).collect())
        }
    }

    /// A model directory with what `Model::start` reads itself (manifest, tokenizer) and no
    /// weights: the backend is the test's.
    fn model_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("batchbox-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = r#"{"format_version": 1, "name": "fake", "task": "sequence-classification", "labels": ["a"],
            "max_length": 16, "inputs": ["input_ids", "attention_mask"], "variants": {}, "pad_token_id": 0,
            "vocab_size": 4000, "version": "fake-0", "sha256": "0"}"#;
        let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1}, "unk_token": "[UNK]"}}"#;
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
        dir
    }

    #[test]
    fn dropping_the_last_handle_returns_only_after_the_model_thread_has_dropped_the_backend() {
        let dir = model_dir();
        let options = QueueOptions {
            name: "drop-test".into(),
            max_queue_delay: Duration::ZERO,
            max_queued_tokens: 1 << 20,
            queue_shares: Vec::new(),
            max_batch_time: None,
            chunk_order: ChunkOrder::LengthSorted,
        };
        let dropped = Arc::new(AtomicBool::new(false));
        let backend = Recorded(dropped.clone());
        let limits = BatchLimits { max_sequences: 32.try_into().unwrap(), max_tokens: 8192.try_into().unwrap() };
        let model = Model::start(&dir, &options, limits, move |_, _| {
            Ok(LoadedBackend::configured(backend, "test", Candidate::new(Precision::Fp32, None, None, None)))
        })
        .unwrap();
        model.infer_blocking(vec![vec![101, 2023, 102]]).unwrap();
        drop(model);
        // A thread left running would free a torch module while the process exits, after
        // libtorch's CUDA allocator is gone: the GPU check saw that abort the process.
        assert!(dropped.load(Ordering::SeqCst), "drop returned before the model thread dropped the backend");
    }
}
