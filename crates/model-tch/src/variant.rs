//! The manifest's variant names, and the precision the config asks for on a device. Free
//! functions that `engine` (which loads a variant) and `precision` (which chooses one) both use.

use batchbox_model::{Format, Precision};
use tch::Device;

use crate::CpuDtype;

/// The manifest's name for the file that runs at `precision` on `device` in `format`:
/// `<device>-<dtype>` for TorchScript, `<device>-<dtype>-aoti` for an AOTInductor package.
pub(crate) fn name(precision: Precision, device: Device, format: Format) -> String {
    let device = if device.is_cuda() { "cuda" } else { "cpu" };
    let dtype = match precision {
        Precision::Fp32 => "float32",
        Precision::Fp16 => "float16",
        Precision::Bf16 => "bfloat16",
        Precision::Int8 => "int8",
    };
    match format {
        Format::TorchScript => format!("{device}-{dtype}"),
        Format::Aoti => format!("{device}-{dtype}-aoti"),
    }
}

/// The precision the config asks for, or `None` for `cpu_dtype: auto` on CPU (measured).
pub(crate) fn configured(device: Device, use_fp16: bool, cpu_dtype: CpuDtype) -> Option<Precision> {
    match (device.is_cuda(), use_fp16, cpu_dtype) {
        (true, true, _) => Some(Precision::Fp16),
        (true, false, _) | (false, _, CpuDtype::Fp32) => Some(Precision::Fp32),
        (false, _, CpuDtype::Bf16) => Some(Precision::Bf16),
        (false, _, CpuDtype::Int8) => Some(Precision::Int8),
        (false, _, CpuDtype::Auto) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_are_device_dtype_and_aoti_packages_say_so() {
        assert_eq!(name(Precision::Bf16, Device::Cpu, Format::TorchScript), "cpu-bfloat16");
        assert_eq!(name(Precision::Fp16, Device::Cuda(1), Format::Aoti), "cuda-float16-aoti");
    }
}
