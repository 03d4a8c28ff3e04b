//! `GET /v1/models`: every model of the running config, how it runs and why (precision and what
//! `cpu_dtype: auto` measured, the rows and tokens of a pass), and, with metrics on, its
//! counters, read from the recorder.

use serde_json::json;

use batchbox_metrics::{Scrape, names};

use crate::{App, Loaded};

impl App {
    /// Every model: what it is and how it runs, and (with metrics on) its counters and its
    /// caches', read from the same recorder `/metrics` renders.
    pub(crate) fn models(&self, loaded: &Loaded) -> serde_json::Value {
        let scrape = self.metrics.as_ref().map(|m| Scrape::parse(&m.render()));
        let models: Vec<serde_json::Value> = loaded
            .models
            .iter()
            .map(|(name, model)| {
                let info = model.info();
                let m = &info.manifest;
                let mut described = json!({
                    "name": name,
                    "model": m.name,
                    "version": m.version,
                    "task": m.task,
                    "labels": m.labels,
                    "problem_type": m.problem_type,
                    "activation": m.activation(),
                    "max_length": m.max_length,
                    "device": info.device,
                    "precision": info.precision,
                    "format": info.format,
                    "precision_choice": info.precision_choice,
                    // The config's pass shape, or the device's default where it is silent.
                    "pass": {
                        "max_sequences": info.limits.max_sequences,
                        "max_tokens": info.limits.max_tokens,
                    },
                });
                if let Some(scrape) = &scrape {
                    let value = |metric| scrape.value(metric, &[("model", name)]) as u64;
                    let (queued_sequences, queued_tokens) = model.queue_depth();
                    described["stats"] = json!({
                        "batches": value(names::BATCHES),
                        "sequences": value(names::SEQUENCES),
                        "real_tokens": value(names::REAL_TOKENS),
                        "padded_tokens": value(names::PADDED_TOKENS),
                        "rejected": value(names::REJECTED),
                        "expired": value(names::EXPIRED),
                        "abandoned": value(names::ABANDONED),
                        "failed_sequences": value(names::FAILED_SEQUENCES),
                        "oom_splits": value(names::OOM_SPLITS),
                        "queued_sequences": queued_sequences,
                        "queued_tokens": queued_tokens,
                    });
                    // Every tenant cache in front of this model, together (tenants are not named here).
                    described["cache"] = json!({
                        "hits": value(names::CACHE_HITS),
                        "misses": value(names::CACHE_MISSES),
                        "evictions": value(names::CACHE_EVICTIONS),
                        "entries": value(names::CACHE_ENTRIES),
                        "bytes": value(names::CACHE_BYTES),
                    });
                }
                described
            })
            .collect();
        json!({ "models": models })
    }
}
