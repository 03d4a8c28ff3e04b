//! Records the venv's torch/lib, so CUDA support can be dlopen'ed from it (see `device.rs`), and
//! builds the AOTInductor shim (`csrc/aoti_shim.cpp`, see `aoti.rs`) against that libtorch's headers.
use std::path::PathBuf;

fn main() {
    // Set by torch-sys (its `links = "tch"` metadata) for crates that depend on it directly.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch directory");
    println!("cargo:rustc-env=BATCHBOX_LIBTORCH_LIB={lib}");

    let include = PathBuf::from(&lib).join("../include");
    println!("cargo:rerun-if-changed=csrc/aoti_shim.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/aoti_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The torch wheels are built with the C++11 ABI; a mismatch fails at link time.
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers warn about themselves.
        .warnings(false)
        .compile("batchbox_aoti_shim");
}
