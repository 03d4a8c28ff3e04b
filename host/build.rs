//! Gives the binaries and tests a RUNPATH to the venv's torch/lib, so they run without
//! LD_LIBRARY_PATH.
fn main() {
    // Set by torch-sys (its `links = "tch"` metadata) for crates that depend on it directly.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch directory");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
