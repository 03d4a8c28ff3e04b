//! The libtorch backend for [`batchbox_model`]: TorchScript modules exported by
//! `tools/export_model.py`, on CPU or CUDA. The only crate that links libtorch.
//!
//! - `engine`: a loaded module, padding (page-locked on CUDA) and one forward pass;
//! - `aoti`: AOTInductor packages, the second format a variant may take, through a C++ shim;
//! - `variant`: the manifest's variant names and the precision the config asks for;
//! - `device`: `auto`/`cpu`/`cuda:N` resolved, with libtorch_cuda loaded at run time;
//! - `precision`: which exported variant runs, and `cpu_dtype: auto`'s measurement;
//! - `shape`: how many rows and tokens a pass holds on each device, where the config is silent.

mod aoti;
mod device;
mod engine;
mod precision;
mod shape;
mod variant;

/// Where the build found libtorch (see build.rs); also the binary's RUNPATH.
pub(crate) const LIBTORCH_LIB: &str = env!("BATCHBOX_LIBTORCH_LIB");

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use batchbox_model::{Format, Model, ModelError, QueueOptions};
use serde::Deserialize;

pub use shape::{CPU_DEFAULT, CUDA_DEFAULT, PassShape};

/// Everything needed to load a model on libtorch; usually built from the config file.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// The exported model directory.
    pub path: PathBuf,
    /// Where it runs.
    pub device: DeviceSpec,
    /// On CUDA: fp16 rather than fp32.
    pub use_fp16: bool,
    /// On CPU: which precision, or `auto` to measure.
    pub cpu_dtype: CpuDtype,
    /// On CPU: which format of the exported variants runs, or `auto` to measure.
    pub cpu_backend: FormatChoice,
    /// On CUDA: which format of the exported variants runs, or `auto` to measure.
    pub gpu_backend: FormatChoice,
    /// Rows and tokens per forward pass; unset ones take the device's default (`shape`).
    pub pass: PassShape,
    /// How the queue in front of it batches.
    pub queue: QueueOptions,
}

/// Loads the model on its own thread and warms it up; returns once it is ready to serve.
pub fn load(options: &ModelOptions) -> Result<Arc<Model>, ModelError> {
    let device = device::resolve(options.device)?;
    let (use_fp16, cpu_dtype) = (options.use_fp16, options.cpu_dtype);
    let formats = if device.is_cuda() { options.gpu_backend } else { options.cpu_backend };
    Model::start(&options.path, &options.queue, options.pass.on(device), move |dir, manifest| {
        precision::choose(dir, manifest, device, use_fp16, cpu_dtype, formats)
    })
}

/// libtorch reports allocation failures as plain errors; their text tells them apart.
fn torch_error(error: tch::TchError) -> ModelError {
    let message = error.to_string();
    let lower = message.to_lowercase();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") || lower.contains("not enough memory")
    {
        ModelError::OutOfMemory(message)
    } else {
        ModelError::Forward(message)
    }
}

/// Where the model runs. `auto` picks CUDA when a GPU is usable and falls back to CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceSpec {
    /// `auto`, the default: CUDA device 0 when libtorch_cuda loads and a GPU is visible, else CPU.
    #[default]
    Auto,
    /// `cpu`, even where a GPU is usable.
    Cpu,
    /// `cuda:N` (`cuda` is `cuda:0`): that device, or the model does not load.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}, expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Precision on CPU. No one precision is fastest everywhere (bf16 ran DeBERTa-v3 2x faster than
/// fp32 on one CPU and 0.83x on another), so `auto` measures at load (see `precision.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuDtype {
    /// The fastest of the exported fp32, bf16 and int8 variants that agrees with fp32 and is
    /// batch-invariant (`batchbox_model::checks`).
    #[default]
    Auto,
    /// The `cpu-float32` variant (`auto` needs it too: the others are checked against it).
    Fp32,
    /// The `cpu-bfloat16` variant.
    Bf16,
    /// int8 linear layers with activations scaled per row (the `cpu-int8` variant).
    Int8,
}

/// Which format of a model's exported variants runs (`models[].cpu_backend`, `gpu_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// Each exported format is measured at load with the others (see `precision.rs`), and the
    /// fastest that agrees with the reference and is batch-invariant runs: TorchScript where the
    /// export has nothing else.
    #[default]
    Auto,
    /// TorchScript traces (`.pt`).
    TorchScript,
    /// AOTInductor packages (`.pt2`, exported with `--variants <device>-<dtype>-aoti`).
    Aoti,
}

impl FormatChoice {
    /// The formats this choice lets run, TorchScript first.
    pub(crate) fn formats(self) -> &'static [Format] {
        match self {
            Self::Auto => &[Format::TorchScript, Format::Aoti],
            Self::TorchScript => &[Format::TorchScript],
            Self::Aoti => &[Format::Aoti],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_round_trip() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
