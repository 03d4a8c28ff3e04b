//! Records the venv's torch/lib, so CUDA support can be dlopen'ed from it (see `device.rs`).
fn main() {
    // Set by torch-sys (its `links = "tch"` metadata) for crates that depend on it directly.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch directory");
    println!("cargo:rustc-env=BATCHBOX_LIBTORCH_LIB={lib}");
}
