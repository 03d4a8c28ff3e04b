// The C side of `src/aoti.rs`: AOTInductor packages (.pt2) through libtorch's
// AOTIModelPackageLoader, which tch does not bind. It only loads, runs and reports errors; every
// policy (which package, which device, what a failure means) is Rust's.
//
// Every C++ exception is caught and returned as a message, so a CUDA out-of-memory reaches the
// worker's split and retry as an error and never unwinds into Rust (undefined) or reaches
// std::terminate.
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

// malloc and memcpy only: it runs inside catch handlers, where a second exception (a
// std::bad_alloc from a std::string) would unwind into Rust.
char* copy_message(const char* message) noexcept {
  size_t size = std::strlen(message) + 1;
  char* out = static_cast<char*>(std::malloc(size));
  if (out != nullptr) {
    std::memcpy(out, message, size);
  }
  return out;
}

template <typename F>
bool guarded(char** error, F&& body) noexcept {
  try {
    body();
    return true;
  } catch (const c10::Error& e) {
    *error = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message("unknown C++ exception");
  }
  return false;
}

}  // namespace

extern "C" {

// The package's metadata value for `key` (e.g. "AOTI_DEVICE_KEY": "cpu" or "cuda"), or null with
// *error set. The caller frees the value with batchbox_aoti_free_string.
char* batchbox_aoti_metadata(const char* path, const char* key, char** error) noexcept {
  char* value = nullptr;
  guarded(error, [&] {
    auto metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    auto found = metadata.find(key);
    value = copy_message(found == metadata.end() ? "" : found->second.c_str());
  });
  return value;
}

// Loads the package at `path` for `device_index` (-1: CPU), or null with *error set.
void* batchbox_aoti_load(const char* path, int device_index, char** error) noexcept {
  torch::inductor::AOTIModelPackageLoader* loader = nullptr;
  guarded(error, [&] {
    loader = new torch::inductor::AOTIModelPackageLoader(path, "model", false, 1,
                                                         static_cast<c10::DeviceIndex>(device_index));
  });
  return loader;
}

// Runs the package on `count` input tensors (tch's `at::Tensor*`). On success *output is a new
// `at::Tensor*`, the single output, which the caller owns (tch's Tensor::from_ptr).
bool batchbox_aoti_run(void* loader, const at::Tensor* const* inputs, size_t count, at::Tensor** output,
                       char** error) noexcept {
  return guarded(error, [&] {
    std::vector<at::Tensor> args;
    args.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      args.push_back(*inputs[i]);
    }
    auto outputs = static_cast<torch::inductor::AOTIModelPackageLoader*>(loader)->run(args);
    if (outputs.size() != 1) {
      throw std::runtime_error("the package returned " + std::to_string(outputs.size()) +
                               " outputs; batchbox expects one, the logits");
    }
    *output = new at::Tensor(std::move(outputs[0]));
  });
}

void batchbox_aoti_free(void* loader) noexcept {
  delete static_cast<torch::inductor::AOTIModelPackageLoader*>(loader);
}

void batchbox_aoti_free_string(char* text) noexcept {
  std::free(text);
}

}  // extern "C"
