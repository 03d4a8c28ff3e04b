//! How many rows and padded tokens one forward pass holds, by device, where the config does not
//! say (`api.inference_batch_size`, `api.max_batch_tokens`).
//!
//! Policy: a setting written in the config always wins; an unset one takes its device's default.
//! - **CPU: 32 rows, 8192 tokens.** A CPU pass costs about its padded tokens, whatever their
//!   shape, so larger passes buy nothing and only make a request arriving mid-pass wait longer.
//!   These are the seed's values.
//! - **CUDA: 128 rows, 32768 tokens.** A GPU pass of 32 short rows is bound by kernel launches,
//!   not arithmetic: on an H100 and an H200, 128-row passes served 2.0-3.5x the sentences per
//!   second of 32-row ones (BENCHMARKS.md). 32768 tokens is 128 rows of 256, past every sentence
//!   of the fixture; an out-of-memory pass is split and retried (`batchbox_model::worker`).

use std::num::NonZeroUsize;

use batchbox_batcher::BatchLimits;
use tch::Device;

/// The pass shape as configured: `None` takes the device's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassShape {
    /// `api.inference_batch_size`: rows per pass.
    pub rows: Option<NonZeroUsize>,
    /// `api.max_batch_tokens`: padded tokens (rows × longest row) per pass.
    pub tokens: Option<NonZeroUsize>,
}

const fn limits(rows: usize, tokens: usize) -> BatchLimits {
    match (NonZeroUsize::new(rows), NonZeroUsize::new(tokens)) {
        (Some(max_sequences), Some(max_tokens)) => BatchLimits { max_sequences, max_tokens },
        _ => panic!("a pass holds at least one row and one token"),
    }
}

/// The CPU's default pass shape (see the module docs).
pub const CPU_DEFAULT: BatchLimits = limits(32, 8192);
/// A GPU's default pass shape (see the module docs).
pub const CUDA_DEFAULT: BatchLimits = limits(128, 32768);

impl PassShape {
    /// Both bounds set, as the config writes them.
    pub fn fixed(rows: usize, tokens: usize) -> Self {
        Self { rows: NonZeroUsize::new(rows), tokens: NonZeroUsize::new(tokens) }
    }

    /// The bounds a pass on `device` runs with: what is set, and the device's default for the rest.
    pub fn on(self, device: Device) -> BatchLimits {
        let default = match device {
            Device::Cuda(_) => CUDA_DEFAULT,
            _ => CPU_DEFAULT,
        };
        BatchLimits {
            max_sequences: self.rows.unwrap_or(default.max_sequences),
            max_tokens: self.tokens.unwrap_or(default.max_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_pass_shape_is_the_devices_default() {
        assert_eq!(PassShape::default().on(Device::Cpu), CPU_DEFAULT);
        assert_eq!(PassShape::default().on(Device::Cuda(1)), CUDA_DEFAULT);
        assert_eq!(CUDA_DEFAULT.max_sequences.get(), 128);
        assert_eq!(CPU_DEFAULT.max_sequences.get(), 32);
    }

    #[test]
    fn what_the_config_sets_wins_on_every_device() {
        let rows_only = PassShape { rows: NonZeroUsize::new(8), tokens: None };
        for device in [Device::Cpu, Device::Cuda(0)] {
            assert_eq!(PassShape::fixed(3, 40).on(device), limits(3, 40));
            let set = rows_only.on(device);
            assert_eq!(set.max_sequences.get(), 8);
            assert_eq!(set.max_tokens, PassShape::default().on(device).max_tokens);
        }
    }
}
