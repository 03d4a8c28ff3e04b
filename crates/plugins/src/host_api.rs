//! The host side of `wit/batchbox.wit`: what plugins may ask of the host, within the tenant's
//! per-request quotas.

use std::time::Instant;

use crate::PluginModel;
use crate::bindings::batchbox::plugin::{host, types};
use crate::state::HostState;
use batchbox_batcher::scheduler::Rejected;
use batchbox_metrics::names;
use batchbox_model::{Activation, Encoding, ModelError, PairTruncation, Task};
use batchbox_tenants::TenantLimits;
use tracing::Instrument;

/// What one request's host calls have asked for so far.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    texts: usize,
    text_bytes: usize,
    sequences: usize,
    tokens: usize,
    /// Bytes written through `log`.
    logged: usize,
}

impl Usage {
    /// Books a `tokenize` call, or refuses it (booking nothing) if it would pass a quota.
    fn charge_texts(&mut self, quotas: &TenantLimits, texts: &[String]) -> Result<(), types::Error> {
        self.charge_text_bytes(quotas, texts.len(), texts.iter().map(String::len).sum())
    }

    /// Books `texts` texts of `bytes` bytes in all (a pair is one text of both members' bytes: it
    /// becomes one sequence), or refuses them.
    fn charge_text_bytes(&mut self, quotas: &TenantLimits, texts: usize, bytes: usize) -> Result<(), types::Error> {
        over("max_sequences", "texts tokenized", self.texts, texts, quotas.max_sequences)?;
        over("max_text_bytes", "bytes of text tokenized", self.text_bytes, bytes, quotas.max_text_bytes)?;
        self.texts += texts;
        self.text_bytes += bytes;
        Ok(())
    }

    /// Books an `infer` call, or refuses it (booking nothing) if it would pass a quota.
    fn charge_sequences(&mut self, quotas: &TenantLimits, sequences: &[Vec<u32>]) -> Result<(), types::Error> {
        let tokens = sequences.iter().map(Vec::len).sum::<usize>();
        over("max_sequences", "sequences sent to the model", self.sequences, sequences.len(), quotas.max_sequences)?;
        over("max_tokens", "tokens sent to the model", self.tokens, tokens, quotas.max_tokens)?;
        self.sequences += sequences.len();
        self.tokens += tokens;
        Ok(())
    }
}

fn over(quota: &str, what: &str, used: usize, asked: usize, limit: usize) -> Result<(), types::Error> {
    if used.saturating_add(asked) <= limit {
        return Ok(());
    }
    Err(types::Error::QuotaExceeded(types::QuotaError {
        quota: quota.to_owned(),
        message: format!(
            "quota {quota}: this request may send at most {limit} {what}; it asked for {asked} after {used}"
        ),
    }))
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn model(&mut self) -> wasmtime::Result<types::ModelInfo> {
        let manifest = self.model.manifest();
        Ok(types::ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            task: match manifest.task {
                Task::SequenceClassification => types::Task::SequenceClassification,
                Task::TokenClassification => types::Task::TokenClassification,
            },
            labels: manifest.labels.clone(),
            max_length: manifest.max_length as u32,
        })
    }

    fn model_scoring(&mut self) -> wasmtime::Result<types::Scoring> {
        let manifest = self.model.manifest();
        Ok(types::Scoring {
            activation: match manifest.activation() {
                Activation::Softmax => types::Activation::Softmax,
                Activation::Sigmoid => types::Activation::Sigmoid,
                Activation::None => types::Activation::None,
            },
            multi_label: manifest.multi_label(),
        })
    }

    async fn tokenize(&mut self, texts: Vec<String>) -> wasmtime::Result<Result<Vec<types::Encoding>, types::Error>> {
        Ok(self.tokenized(texts).await?.map(|encodings| {
            encodings
                .into_iter()
                .map(|e| types::Encoding {
                    ids: e.ids,
                    word_ids: e.word_ids,
                    offsets: e.offsets.into_iter().map(|(a, b)| (a as u32, b as u32)).collect(),
                    truncated: e.truncated,
                })
                .collect()
        }))
    }

    async fn infer(&mut self, sequences: Vec<Vec<u32>>) -> wasmtime::Result<Result<types::Inference, types::Error>> {
        self.inferred(sequences).await
    }

    async fn infer_texts(
        &mut self,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<types::TextInference, types::Error>> {
        let started = Instant::now();
        let encodings = match self.tokenized(texts).await? {
            Ok(encodings) => encodings,
            Err(refused) => return Ok(Err(refused)),
        };
        self.encodings_inferred(encodings, started).await
    }

    async fn infer_pairs(
        &mut self,
        pairs: Vec<(String, String)>,
        truncation: types::Truncation,
    ) -> wasmtime::Result<Result<types::TextInference, types::Error>> {
        let started = Instant::now();
        let bytes = pairs.iter().map(|(a, b)| a.len() + b.len()).sum();
        if let Err(refused) = self.usage.charge_text_bytes(&self.quotas, pairs.len(), bytes) {
            return Ok(Err(self.refused(refused)));
        }
        let truncation = match truncation {
            types::Truncation::LongestFirst => PairTruncation::LongestFirst,
            types::Truncation::OnlyFirst => PairTruncation::OnlyFirst,
            types::Truncation::OnlySecond => PairTruncation::OnlySecond,
        };
        let span = tracing::debug_span!("tokenize", pairs = pairs.len());
        match self.encoded(span, move |model| model.tokenize_pairs(&pairs, truncation)).await? {
            Ok(encodings) => self.encodings_inferred(encodings, started).await,
            Err(refused) => Ok(Err(refused)),
        }
    }

    fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        // Like stdout and stderr: at most OUTPUT_CAPACITY bytes per request reach the log.
        let room = crate::sandbox::OUTPUT_CAPACITY.saturating_sub(self.usage.logged);
        if room == 0 {
            return Ok(());
        }
        let mut end = message.len().min(room);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        self.usage.logged += message.len().max(1);
        let (tenant, request_id) = (&*self.tenant, self.request_id);
        match level {
            types::Level::Trace => tracing::trace!(tenant, request_id, "{message}"),
            types::Level::Debug => tracing::debug!(tenant, request_id, "{message}"),
            types::Level::Info => tracing::info!(tenant, request_id, "{message}"),
            types::Level::Warn => tracing::warn!(tenant, request_id, "{message}"),
            types::Level::Error => tracing::error!(tenant, request_id, "{message}"),
        }
        Ok(())
    }
}

impl HostState {
    /// `infer`'s work on what `tokenize` (or its pair form) made, begun at `started`: the
    /// `infer-texts` and `infer-pairs` answer.
    async fn encodings_inferred(
        &mut self,
        encodings: Vec<Encoding>,
        started: Instant,
    ) -> wasmtime::Result<Result<types::TextInference, types::Error>> {
        let tokenize_us = started.elapsed().as_micros() as u64;
        let tokens = encodings.iter().map(|e| e.ids.len() as u32).collect();
        let truncated = (0..).zip(&encodings).filter(|(_, e)| e.truncated).map(|(i, _)| i).collect();
        let sequences: Vec<Vec<u32>> = encodings.into_iter().map(|e| e.ids).collect();
        let inference = if sequences.is_empty() {
            // Nothing to compute: no model call, no model time.
            Ok(types::Inference { outputs: vec![], queue_us: 0, compute_us: 0, forward_passes: 0, batch_ids: vec![] })
        } else {
            self.inferred(sequences).await?
        };
        Ok(inference.map(|inference| types::TextInference { inference, tokens, truncated, tokenize_us }))
    }

    /// `tokenize`'s work, charged to the request's quotas.
    async fn tokenized(&mut self, texts: Vec<String>) -> wasmtime::Result<Result<Vec<Encoding>, types::Error>> {
        if let Err(refused) = self.usage.charge_texts(&self.quotas, &texts) {
            return Ok(Err(self.refused(refused)));
        }
        let span = tracing::debug_span!("tokenize", texts = texts.len());
        self.encoded(span, move |model| model.tokenize(&texts)).await
    }

    /// Runs `encode` (a `tokenize` of the model) off the async workers, since a large batch takes
    /// milliseconds of CPU, and counts its time as the host's and as tokenizing.
    async fn encoded<F>(
        &mut self,
        span: tracing::Span,
        encode: F,
    ) -> wasmtime::Result<Result<Vec<Encoding>, types::Error>>
    where
        F: FnOnce(&dyn PluginModel) -> Result<Vec<Encoding>, ModelError> + Send + 'static,
    {
        let started = Instant::now();
        let model = self.model.clone();
        let encoded = tokio::task::spawn_blocking(move || encode(&*model)).instrument(span).await?;
        let took = started.elapsed();
        self.times.host += took;
        self.times.tokenize += took;
        Ok(encoded.map_err(to_wit_error))
    }

    /// `infer`'s work, charged to the request's quotas.
    async fn inferred(&mut self, sequences: Vec<Vec<u32>>) -> wasmtime::Result<Result<types::Inference, types::Error>> {
        if let Err(refused) = self.usage.charge_sequences(&self.quotas, &sequences) {
            return Ok(Err(self.refused(refused)));
        }
        let started = Instant::now();
        let span = tracing::debug_span!("infer", sequences = sequences.len());
        let result = self.model.infer(&self.tenant, sequences, self.deadline).instrument(span).await;
        self.times.host += started.elapsed();
        if let Ok(inference) = &result {
            self.times.queue += inference.queued;
            self.times.compute += inference.computed;
        }
        Ok(result.map_err(to_wit_error).map(|inference| types::Inference {
            outputs: inference
                .outputs
                .into_iter()
                .map(|o| types::Tensor { data: o.data, shape: o.shape.into_iter().map(|d| d as u32).collect() })
                .collect(),
            queue_us: inference.queued.as_micros() as u64,
            compute_us: inference.computed.as_micros() as u64,
            forward_passes: inference.stats.forward_passes as u32,
            batch_ids: inference.batch_ids,
        }))
    }

    /// A quota's refusal of a host call, counted.
    fn refused(&self, refusal: types::Error) -> types::Error {
        if let types::Error::QuotaExceeded(e) = &refusal {
            let (tenant, quota) = (self.tenant.to_string(), e.quota.clone());
            metrics::counter!(names::QUOTA_REJECTIONS, "tenant" => tenant, "quota" => quota).increment(1);
        }
        refusal
    }
}

/// What a plugin is told of the model's error. Every variant is listed, so that a new one has to be
/// placed here: only what the request itself caused, or waiting may cure, is more than `internal`.
fn to_wit_error(error: ModelError) -> types::Error {
    match error {
        ModelError::InvalidInput(message) => types::Error::InvalidInput(message),
        // Waiting cannot help a request that can never fit in its tenant's room: 413, not 503.
        ModelError::Overloaded(rejected @ Rejected::NeverFits { .. }) => types::Error::TooLarge(rejected.to_string()),
        e @ ModelError::Overloaded(Rejected::Overloaded { .. } | Rejected::OverShare { .. }) => {
            types::Error::Overloaded(e.to_string())
        }
        // A request id queued twice is the host's bug, not a full queue.
        e @ ModelError::Overloaded(Rejected::Duplicate(_)) => types::Error::Internal(e.to_string()),
        e @ ModelError::TimedOut(_) => types::Error::TimedOut(e.to_string()),
        // The model's or the host's own failures: nothing the plugin could change by asking again.
        e @ (ModelError::Manifest { .. }
        | ModelError::Tokenizer { .. }
        | ModelError::Tokenize(_)
        | ModelError::Load { .. }
        | ModelError::CudaUnavailable { .. }
        | ModelError::MissingVariant { .. }
        | ModelError::Shares(_)
        | ModelError::OutputShape { .. }
        | ModelError::OutOfMemory(_)
        | ModelError::Forward(_)
        | ModelError::Panicked(_)
        | ModelError::Stopped) => types::Error::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use batchbox_batcher::scheduler::{Rejected, SharesTooLarge};
    use batchbox_model::ModelError;

    use super::{to_wit_error, types};

    /// The kind of WIT error, without its message.
    fn kind(error: &types::Error) -> &'static str {
        match error {
            types::Error::InvalidInput(_) => "invalid-input",
            types::Error::TooLarge(_) => "too-large",
            types::Error::Overloaded(_) => "overloaded",
            types::Error::TimedOut(_) => "timed-out",
            types::Error::QuotaExceeded(_) => "quota-exceeded",
            types::Error::Internal(_) => "internal",
        }
    }

    #[test]
    fn only_what_the_request_caused_or_waiting_cures_reaches_a_plugin_as_more_than_internal() {
        let text = || "x".to_owned();
        let path = PathBuf::from;
        let tenant = || "t".to_owned();
        let table = [
            (ModelError::InvalidInput(text()), "invalid-input"),
            (ModelError::Overloaded(Rejected::NeverFits { tenant: tenant(), requested: 9, room: 8 }), "too-large"),
            (ModelError::Overloaded(Rejected::Overloaded { queued: 1, requested: 9, limit: 8 }), "overloaded"),
            (
                ModelError::Overloaded(Rejected::OverShare { tenant: tenant(), queued: 1, requested: 9, share: 8 }),
                "overloaded",
            ),
            (ModelError::TimedOut(Duration::from_secs(1)), "timed-out"),
            (ModelError::Overloaded(Rejected::Duplicate(7)), "internal"),
            (ModelError::Manifest { path: path("m"), message: text() }, "internal"),
            (ModelError::Tokenizer { path: path("t"), message: text() }, "internal"),
            (ModelError::Tokenize(text()), "internal"),
            (ModelError::Load { path: path("l"), message: text() }, "internal"),
            (ModelError::CudaUnavailable { requested: text(), why: text() }, "internal"),
            (ModelError::MissingVariant { dir: path("d"), variant: text(), available: vec![] }, "internal"),
            (ModelError::Shares(SharesTooLarge { total: 9, limit: 8 }), "internal"),
            (ModelError::OutputShape { expected: vec![1], got: vec![2] }, "internal"),
            (ModelError::OutOfMemory(text()), "internal"),
            (ModelError::Forward(text()), "internal"),
            (ModelError::Panicked(text()), "internal"),
            (ModelError::Stopped, "internal"),
        ];
        for (error, expected) in table {
            let said = error.to_string();
            let mapped = to_wit_error(error);
            assert_eq!(kind(&mapped), expected, "{said}");
        }
    }
}
