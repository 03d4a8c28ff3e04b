//! AOTInductor packages (`.pt2`, written by `tools/batchbox_export/variants/aoti.py`): the second
//! format a model's variants may take, run through libtorch's `AOTIModelPackageLoader` by a small
//! C++ shim (`csrc/aoti_shim.cpp`), as tch binds no AOTInductor API.
//!
//! The shim loads, runs and reports errors; the rest is here. Every C++ exception comes back as
//! an error message and never unwinds into Rust. A package's own code catches what its kernels
//! throw and reports only that its run failed (the cause goes to stderr), so on CUDA a failed run
//! is taken for an out-of-memory: the worker splits the pass and retries, and a row that fails
//! alone still gets the error (see `engine.rs`). A package is
//! compiled for one device and one torch build: one for another device is refused before it is
//! loaded, and one that libtorch cannot load (another torch, a corrupt file) is refused with the
//! command that rebuilds it.
//!
//! The package's code is a shared object that needs `libtorch.so` loaded, which tch's
//! `--as-needed` link leaves out, so it is loaded here first (as `device.rs` does for CUDA).

use std::ffi::{CStr, CString, c_char, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::LIBTORCH_LIB;

unsafe extern "C" {
    fn batchbox_aoti_metadata(path: *const c_char, key: *const c_char, error: *mut *mut c_char) -> *mut c_char;
    fn batchbox_aoti_load(path: *const c_char, device_index: i32, error: *mut *mut c_char) -> *mut c_void;
    fn batchbox_aoti_run(
        loader: *mut c_void,
        inputs: *const *const C_tensor,
        count: usize,
        output: *mut *mut C_tensor,
        error: *mut *mut c_char,
    ) -> bool;
    fn batchbox_aoti_free(loader: *mut c_void);
    fn batchbox_aoti_free_string(text: *mut c_char);
}

/// Takes a string the shim allocated (a value or an error message) and frees it.
fn take(text: *mut c_char) -> String {
    if text.is_null() {
        return "the AOTInductor shim gave no message".into();
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc, freed once, here.
    let owned = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
    unsafe { batchbox_aoti_free_string(text) };
    owned
}

/// Loads libtorch.so once per process, globally, for the packages' code (see the module docs).
fn load_libtorch() -> Result<(), String> {
    static LIBTORCH: OnceLock<Result<Library, String>> = OnceLock::new();
    let loaded = LIBTORCH.get_or_init(|| {
        let mut errors = Vec::new();
        for name in ["libtorch.so".to_owned(), format!("{LIBTORCH_LIB}/libtorch.so")] {
            // SAFETY: libtorch.so only forwards to the libtorch_cpu already loaded in this process.
            match unsafe { Library::open(Some(&name), RTLD_NOW | RTLD_GLOBAL) } {
                Ok(lib) => return Ok(lib),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(format!("cannot load libtorch.so for AOTInductor packages: {}", errors.join("; ")))
    });
    loaded.as_ref().map(|_| ()).map_err(Clone::clone)
}

/// A loaded AOTInductor package. Used on the model thread only (it is not `Send`).
pub(crate) struct Package {
    loader: NonNull<c_void>,
}

impl Package {
    /// The device a package was compiled for, from its metadata: "cpu" or "cuda".
    pub fn compiled_for(path: &Path) -> Result<String, String> {
        let path = c_path(path)?;
        let key = CString::new("AOTI_DEVICE_KEY").expect("no NUL");
        let mut error = std::ptr::null_mut();
        // SAFETY: both strings outlive the call; the value and the error are ours to free.
        let value = unsafe { batchbox_aoti_metadata(path.as_ptr(), key.as_ptr(), &mut error) };
        if value.is_null() { Err(take(error)) } else { Ok(take(value)) }
    }

    /// Loads the package at `path` to run on `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self, String> {
        load_libtorch()?;
        let compiled_for = Self::compiled_for(path)?;
        let wanted = if device.is_cuda() { "cuda" } else { "cpu" };
        if compiled_for.is_empty() {
            return Err("it is not an AOTInductor package: its metadata names no device".into());
        }
        if compiled_for != wanted {
            return Err(format!("the package was compiled for {compiled_for:?}, not for {wanted}"));
        }
        let index = match device {
            Device::Cuda(index) => i32::try_from(index).map_err(|_| format!("CUDA device {index} is out of range"))?,
            _ => -1,
        };
        let path = c_path(path)?;
        let mut error = std::ptr::null_mut();
        // SAFETY: the path outlives the call; the loader is freed once, in Drop.
        let loader = unsafe { batchbox_aoti_load(path.as_ptr(), index, &mut error) };
        NonNull::new(loader).map(|loader| Self { loader }).ok_or_else(|| take(error))
    }

    /// Runs the package on `inputs`; its one output.
    pub fn run(&mut self, inputs: &[&Tensor]) -> Result<Tensor, String> {
        let pointers: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
        let (mut output, mut error) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the input tensors outlive the call (the shim copies their handles); on success
        // `output` is a new at::Tensor* that the returned Tensor owns and frees.
        let ok = unsafe {
            batchbox_aoti_run(self.loader.as_ptr(), pointers.as_ptr(), pointers.len(), &mut output, &mut error)
        };
        if ok && !output.is_null() { Ok(unsafe { Tensor::from_ptr(output) }) } else { Err(take(error)) }
    }
}

impl Drop for Package {
    fn drop(&mut self) {
        // SAFETY: made by batchbox_aoti_load, freed once.
        unsafe { batchbox_aoti_free(self.loader.as_ptr()) }
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| format!("{} holds a NUL byte", path.display()))
}
