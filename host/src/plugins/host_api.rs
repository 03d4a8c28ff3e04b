//! The host side of `wit/batchbox.wit`: what plugins may ask of the host.

use std::time::Instant;

use super::RequestState;
use super::bindings::batchbox::plugin::{host, types};
use crate::model::{ModelError, Task};

impl types::Host for RequestState {}

impl host::Host for RequestState {
    fn model(&mut self) -> wasmtime::Result<types::ModelInfo> {
        let manifest = &self.model.info().manifest;
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

    async fn tokenize(&mut self, texts: Vec<String>) -> wasmtime::Result<Result<Vec<types::Encoding>, types::Error>> {
        let started = Instant::now();
        let model = self.model.clone();
        // Tokenizing a large batch takes milliseconds of CPU: keep it off the async workers.
        let encoded = tokio::task::spawn_blocking(move || model.tokenize(&texts)).await?;
        self.host_time += started.elapsed();
        Ok(encoded.map_err(to_wit_error).map(|encodings| {
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
        let started = Instant::now();
        let result = self.model.infer_for(&self.plugin, sequences, Some(self.deadline)).await;
        self.host_time += started.elapsed();
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

    fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let (plugin, request_id) = (&*self.plugin, self.request_id);
        match level {
            types::Level::Trace => tracing::trace!(plugin, request_id, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, request_id, "{message}"),
            types::Level::Info => tracing::info!(plugin, request_id, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, request_id, "{message}"),
            types::Level::Error => tracing::error!(plugin, request_id, "{message}"),
        }
        Ok(())
    }
}

fn to_wit_error(error: ModelError) -> types::Error {
    match error {
        ModelError::InvalidInput(message) => types::Error::InvalidInput(message),
        e @ ModelError::Overloaded(_) => types::Error::Overloaded(e.to_string()),
        e @ ModelError::TimedOut(_) => types::Error::TimedOut(e.to_string()),
        other => types::Error::Internal(other.to_string()),
    }
}
