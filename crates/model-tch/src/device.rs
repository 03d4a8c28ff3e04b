//! Choosing the torch device, and making CUDA visible to tch.
//!
//! tch links libtorch with `--as-needed`, which drops `libtorch_cuda.so` because nothing refers
//! to it by name; without it CUDA looks absent. Loading it by hand before the first CUDA query
//! registers its kernels.

use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use tch::Device;

use batchbox_model::ModelError;

use crate::{DeviceSpec, LIBTORCH_LIB};

pub fn resolve(spec: DeviceSpec) -> Result<Device, ModelError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => match load_cuda() {
            Ok(()) if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            _ => Ok(Device::Cpu),
        },
        DeviceSpec::Cuda(index) => {
            let unavailable = |why: String| ModelError::CudaUnavailable { requested: spec.to_string(), why };
            load_cuda().map_err(unavailable)?;
            let count = tch::Cuda::device_count();
            if count == 0 {
                return Err(unavailable(
                    "libtorch_cuda loaded but no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)".into(),
                ));
            }
            if index as i64 >= count {
                return Err(unavailable(format!("only {count} CUDA device(s) are visible")));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// Loads libtorch_cuda once per process and keeps it loaded.
fn load_cuda() -> Result<(), String> {
    static CUDA: OnceLock<Result<Library, String>> = OnceLock::new();
    let loaded = CUDA.get_or_init(|| {
        // The bare name goes through LD_LIBRARY_PATH and RUNPATH (a binary carried to another
        // machine); the full path is this build's own torch.
        let candidates = ["libtorch_cuda.so".to_owned(), format!("{LIBTORCH_LIB}/libtorch_cuda.so")];
        let mut errors = Vec::new();
        for name in &candidates {
            // SAFETY: libtorch_cuda's initialisers only register CUDA kernels and hooks with the
            // libtorch already loaded in this process.
            match unsafe { Library::open(Some(name), RTLD_NOW | RTLD_GLOBAL) } {
                Ok(lib) => return Ok(lib),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(format!("cannot load libtorch_cuda.so: {}", errors.join("; ")))
    });
    loaded.as_ref().map(|_| ()).map_err(Clone::clone)
}
