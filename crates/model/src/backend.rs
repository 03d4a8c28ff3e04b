//! The seam between the model's queue and what runs forward passes.
//!
//! A backend takes token ids and gives outputs: it pads a batch the way its device wants it (the
//! [`Pad`] half, which may run on another thread) and runs it (the [`Backend`] half, only ever on
//! the model thread). `batchbox-model-tch` implements it on libtorch; tests implement it with
//! plain vectors to inject faults.

use crate::{Candidate, Format, Manifest, ModelError, Output, Precision, PrecisionChoice};

/// Builds a forward pass's inputs from its rows. `Copy` and `Send`, so the thread that prepares
/// the next batch while one runs (see [`Backend::prepare_ahead`]) has its own.
pub trait Pad: Copy + Send + 'static {
    /// A padded batch, ready for [`Backend::forward`].
    type Batch: Send + 'static;
    /// Pads `rows` into one batch.
    fn pad(&self, rows: &[&[u32]]) -> Self::Batch;
}

/// Runs forward passes, one at a time, on the model thread. Not `Send`: a backend is made on the
/// model thread (the `load` of [`crate::Model::start`]) and never leaves it.
pub trait Backend: 'static {
    /// How this backend's batches are built.
    type Padder: Pad;
    /// A padder for this backend's batches.
    fn padder(&self) -> Self::Padder;
    /// Whether the next batch is worth choosing and padding while the current one runs: on CUDA,
    /// where a pass takes milliseconds and a pinned copy can overlap it. Off by default: on CPU a
    /// pass takes far longer than padding, and a batch chosen only when the model is free lets a
    /// request that arrives mid-pass wait for that pass alone.
    fn prepare_ahead(&self) -> bool {
        false
    }
    /// One output per row of `batch`, in order; `ModelError::OutOfMemory` if the pass did not
    /// fit (the worker then splits it).
    fn forward(&mut self, batch: &<Self::Padder as Pad>::Batch) -> Result<Vec<Output>, ModelError>;
}

/// A backend once loaded, and what to say about it in `/v1/models` and the log.
pub struct LoadedBackend<B> {
    /// The backend, warmed up.
    pub backend: B,
    /// Where it runs, e.g. "cpu" or "cuda(0)".
    pub device: String,
    /// The precision it runs at.
    pub precision: Precision,
    /// The format of the variant that runs.
    pub format: Format,
    /// How that precision was chosen.
    pub precision_choice: PrecisionChoice,
}

impl<B> LoadedBackend<B> {
    /// A backend that runs at the precision the config named, with what was measured of it.
    pub fn configured(backend: B, device: impl Into<String>, measured: Candidate) -> Self {
        let (precision, format) = (measured.precision, measured.format);
        let precision_choice = PrecisionChoice { mode: "configured", candidates: vec![measured], batch: None };
        Self { backend, device: device.into(), precision, format, precision_choice }
    }
}

/// A first pass pays for lazy initialisation (kernels, allocator, JIT profiling), so the first
/// request does not. Short sequences twice (the JIT optimises after profiling), the longest, then
/// a batch shaped like traffic (32 short rows) a few times, so the first requests do not pay for
/// profiling a served shape either; `cpu_dtype: auto` times its candidates after this.
pub fn warm_up<B: Backend>(backend: &mut B, manifest: &Manifest) -> Result<(), ModelError> {
    let id = (manifest.vocab_size / 2) as u32;
    let short = vec![id; 16.min(manifest.max_length)];
    let padder = backend.padder();
    for _ in 0..2 {
        backend.forward(&padder.pad(&[&short, &short]))?;
    }
    let long = vec![id; manifest.max_length];
    backend.forward(&padder.pad(&[&long]))?;
    let typical = vec![id; 48.min(manifest.max_length)];
    let batch = padder.pad(&vec![typical.as_slice(); 32]);
    for _ in 0..3 {
        backend.forward(&batch)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Pad;

    /// Padding for test backends: the rows as they are.
    #[derive(Clone, Copy)]
    pub struct Rows;

    impl Pad for Rows {
        type Batch = Vec<Vec<u32>>;
        fn pad(&self, rows: &[&[u32]]) -> Self::Batch {
            rows.iter().map(|row| row.to_vec()).collect()
        }
    }
}
