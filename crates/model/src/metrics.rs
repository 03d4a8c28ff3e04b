//! One model's metrics: handles registered once with its `model` label (the name in the
//! config), then counted where each event happens: the queue (`Model::submit`, the sweep), the
//! model thread (each pass) and the response caches in front of it. Names and meanings are
//! `batchbox_metrics::names`.

use batchbox_metrics::names;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::ModelInfo;

/// What the model and its queue do.
pub(crate) struct ModelMetrics {
    pub batches: Counter,
    pub sequences: Counter,
    pub real_tokens: Counter,
    pub padded_tokens: Counter,
    pub batch_rows: Histogram,
    pub pass_seconds: Histogram,
    pub queued_sequences: Gauge,
    pub queued_tokens: Gauge,
    pub rejected: Counter,
    pub expired: Counter,
    pub abandoned: Counter,
    pub failed_sequences: Counter,
    pub oom_splits: Counter,
    pub cache: CacheMetrics,
}

/// What every response cache in front of one model does, together: the caches are per tenant,
/// and their series name only the model.
pub struct CacheMetrics {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) evictions: Counter,
    pub(crate) entries: Gauge,
    pub(crate) bytes: Gauge,
}

impl ModelMetrics {
    pub fn new(model: &str) -> Self {
        Self {
            batches: counter!(names::BATCHES, "model" => model.to_owned()),
            sequences: counter!(names::SEQUENCES, "model" => model.to_owned()),
            real_tokens: counter!(names::REAL_TOKENS, "model" => model.to_owned()),
            padded_tokens: counter!(names::PADDED_TOKENS, "model" => model.to_owned()),
            batch_rows: histogram!(names::BATCH_ROWS, "model" => model.to_owned()),
            pass_seconds: histogram!(names::PASS_SECONDS, "model" => model.to_owned()),
            queued_sequences: gauge!(names::QUEUED_SEQUENCES, "model" => model.to_owned()),
            queued_tokens: gauge!(names::QUEUED_TOKENS, "model" => model.to_owned()),
            rejected: counter!(names::REJECTED, "model" => model.to_owned()),
            expired: counter!(names::EXPIRED, "model" => model.to_owned()),
            abandoned: counter!(names::ABANDONED, "model" => model.to_owned()),
            failed_sequences: counter!(names::FAILED_SEQUENCES, "model" => model.to_owned()),
            oom_splits: counter!(names::OOM_SPLITS, "model" => model.to_owned()),
            cache: CacheMetrics::new(model),
        }
    }

    /// The queue's depth after a change: (sequences, tokens).
    pub fn queue_depth(&self, (sequences, tokens): (usize, usize)) {
        self.queued_sequences.set(sequences as f64);
        self.queued_tokens.set(tokens as f64);
    }
}

impl CacheMetrics {
    /// The caches in front of `model`.
    pub fn new(model: &str) -> Self {
        Self {
            hits: counter!(names::CACHE_HITS, "model" => model.to_owned()),
            misses: counter!(names::CACHE_MISSES, "model" => model.to_owned()),
            evictions: counter!(names::CACHE_EVICTIONS, "model" => model.to_owned()),
            entries: gauge!(names::CACHE_ENTRIES, "model" => model.to_owned()),
            bytes: gauge!(names::CACHE_BYTES, "model" => model.to_owned()),
        }
    }
}

/// Marks `model` loaded, with its version, device and precision (the info metric, always 1).
pub(crate) fn model_info(model: &str, info: &ModelInfo) {
    let precision = format!("{:?}", info.precision).to_lowercase();
    let (version, device) = (info.manifest.version.clone(), info.device.clone());
    gauge!(names::MODEL_INFO, "model" => model.to_owned(), "version" => version, "device" => device, "precision" => precision)
        .set(1.0);
}
