#!/usr/bin/env bash
# `make gpu-check`: the CUDA path checked and measured on a GPU machine that has no compiler.
#
#   tools/gpu_check.sh bundle   here, with cargo: build target/gpu-bundle.tar.gz (stripped
#                               batchbox, loadgen and the CUDA test binary, the plugin, and the
#                               tokenizer the export needs offline)
#   tools/gpu_check.sh run      unpack the bundle and run every step; with no GPU visible (or
#                               --dry) a dry run that does everything but the CUDA parts, and says so
#
# On the lent GPU machine (python3 with torch 2.11 and transformers, no cargo), through the
# device tool: command `bash tools/gpu_check.sh run`, carry `target/gpu-bundle.tar.gz`.
#
# Steps (their short names in brackets): [export] synthetic DeBERTa-v3-large there (cuda-float16
# and cuda-float32); [cuda] the CUDA tests (tests/cuda.rs: eager PyTorch on the GPU vs batchbox,
# fp16 vs fp32 top labels, a real CUDA out-of-memory split, and the process exiting cleanly after
# them); [seed] the seed's way in Python (batches of 32 in input order, and one length-sorted
# batch, fp16); [serving] the serving benchmark (HTTP, the sentence-classifier plugin) at 1, 8
# and 64 clients, in 32-row passes and in the device's default shape, each server stopped with
# SIGTERM and required to exit 0; [original] the same model exported with --no-window-bias
# (DeBERTa's original attention bias) and served in the default shape, to measure the windowed one;
# [aoti] the model as an AOTInductor package compiled there (its compile time reported), served
# with gpu_backend: aoti in both shapes; [compile] torch.compile(mode="max-autotune") of the same
# checkpoint in Python, one sorted batch. The summary is printed and written, with every JSON
# line, under $OUT (default target/gpu-check). About 6 minutes on an H100 before [aoti] and
# [compile] (5 min 11 s measured without [seed]); those two are not measured yet: with
# DeBERTa-v3-large they may not fit one 10-minute call, so run them as a second call
# (GPU_CHECK_ONLY="export aoti compile") or with GPU_CHECK_SIZE=base. GPU_CHECK_ONLY="export cuda" runs only the steps
# named (a rerun of what failed; the later steps need export).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bundle=target/gpu-bundle.tar.gz

build_bundle() {
  set -e
  local dir=target/gpu-bundle
  rm -rf "$dir" && mkdir -p "$dir"
  # The same build as `make test`'s (all targets: dev-dependencies unify features), so nothing recompiles.
  cargo build --release --workspace --all-targets
  local cuda_test
  cuda_test=$(cargo test --release --workspace --test cuda --no-run --message-format=json \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "cuda"][0])')
  cp target/release/batchbox target/release/loadgen "$dir/"
  cp "$cuda_test" "$dir/cuda-tests"
  strip "$dir/batchbox" "$dir/loadgen" "$dir/cuda-tests"
  cp plugins/target/wasm32-wasip2/release/sentence_classifier.wasm "$dir/"
  .venv/bin/python -c 'import sys; sys.path.insert(0, "tools"); import export_model; print(export_model.minilm_tokenizer_file())' \
    | xargs -I{} cp {} "$dir/tokenizer.json"
  # The CUDA headers an AOTInductor package compiles against that torch's own wheels lack (the
  # runtime's are there): the GPU machine cannot reach a registry, so they travel in the bundle.
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$dir/wheels" "nvidia-cuda-crt==13.0.88.*" "nvidia-cuda-cccl==13.0.85.*"
  tar -czf "$bundle" -C target gpu-bundle
  echo "wrote $bundle ($(du -h "$bundle" | cut -f1)); carry it to the GPU machine and run: bash tools/gpu_check.sh run"
}

if [ "${1:-}" = bundle ]; then
  build_bundle
  exit
fi
[ "${1:-}" = run ] && shift
# A dry run is asked for, or the machine has no NVIDIA driver at all. A driver that torch cannot
# use is a failure, not a dry run: on the GPU machine a broken setup must not look like a pass.
dry=0
[ "${1:-}" = --dry ] && dry=1
command -v nvidia-smi > /dev/null || dry=1

out=${OUT:-target/gpu-check}
mkdir -p "$out"
out=$(realpath "$out")
results=$out/results.jsonl
summary=$out/summary.md
: > "$results"
started=$(date +%s)
failures=()
note() { echo "$*" | tee -a "$summary"; }
# step NAME SHORT COMMAND...: runs one step, timing it, unless GPU_CHECK_ONLY leaves it out; a
# failed step is recorded and the next one still runs. A step that sets `skipped=1` was skipped,
# and the summary says so.
step() {
  local name=$1 short=$2
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $short "* ]]; then
    note "- $name: not run (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"
    return
  fi
  local t0=$(date +%s)
  echo "== $name"
  skipped=0
  if "$@"; then
    note "- $name: $([ $skipped = 1 ] && echo SKIPPED || echo ok) ($(( $(date +%s) - t0 )) s)"
  else
    note "- $name: FAILED ($(( $(date +%s) - t0 )) s)"
    failures+=("$name")
  fi
}

# Python with torch: the machine's python3 there, the venv here.
python=python3
[ -x .venv/bin/python ] && python=$root/.venv/bin/python
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "$python cannot import torch: the GPU check needs python3 with torch 2.11 and transformers" >&2
  exit 1
}
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ ! -f "$bundle" ]; then
  command -v cargo > /dev/null || { echo "no $bundle and no cargo to build it: carry it here" >&2; exit 1; }
  bash "$0" bundle || exit 1
fi
rm -rf target/gpu-bundle && tar -xzf "$bundle" -C target
bin=$root/target/gpu-bundle
gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')
if [ $dry = 0 ] && [ -z "$gpu" ]; then
  echo "nvidia-smi is here but torch sees no CUDA device:" >&2
  nvidia-smi >&2
  exit 1
fi

: > "$summary"
if [ $dry = 1 ]; then
  note "# gpu-check: DRY RUN on $(hostname) (no GPU visible): the CUDA parts are SKIPPED, not passed"
  size=${GPU_CHECK_SIZE:-base} variants=cpu-float32 device=cpu dtype=float32 serve_dtype=fp32 concurrencies="1" per_client=1 rounds=1
else
  note "# gpu-check on $gpu ($(hostname))"
  size=${GPU_CHECK_SIZE:-large} variants=cuda-float16,cuda-float32 device=cuda dtype=float16 serve_dtype=fp16 concurrencies="1 8 64" per_client=30 rounds=10
fi
note "torch $("$python" -c 'import torch; print(torch.__version__)'), $(nproc) CPU cores; model: synthetic DeBERTa-v3-$size; response cache off"
note ""
model=synthetic-deberta-v3-$size
models=$root/target/gpu-check-models

export_model() {
  "$python" tools/export_model.py synthetic --size "$size" --tokenizer "$bin/tokenizer.json" \
    --variants "$variants" --out "$models/$model" | tee "$out/export.log" | grep -v "^  check" || return 1
  grep "^  check" "$out/export.log" | sed 's/^  check /  - /' >> "$summary"
}

cuda_tests() {
  if [ $dry = 1 ]; then
    note "  SKIPPED (dry run): $("$bin/cuda-tests" --list --ignored 2>/dev/null | grep -c ': test$') CUDA tests:"
    "$bin/cuda-tests" --list --ignored 2>/dev/null | sed -n 's/: test$//p' | sed 's/^/  - /' | tee -a "$summary"
    skipped=1
    return 0
  fi
  BATCHBOX_CUDA_MODEL=$models/$model BATCHBOX_WORKSPACE=$root "$bin/cuda-tests" --ignored --test-threads=1 --nocapture \
    2>&1 | tee "$out/cuda-tests.log"
  local rc=${PIPESTATUS[0]}
  grep -E "^test |max \||agrees|splits|test result" "$out/cuda-tests.log" | sed 's/^/  /' >> "$summary"
  return "$rc"
}

seed_baseline() {
  "$python" tools/seed_baseline.py --device "$device" --dtype "$dtype" --rounds "$rounds" --warmup 2 \
    --setup input:32 --setup sorted:1000 synthetic --size "$size" --tokenizer "$bin/tokenizer.json" | tee -a "$results"
}

# bench_serving.sh MODEL CONCURRENCIES SETUP... on this device. Its configs, logs and plugin
# cache stay outside $OUT: the device tool brings back 8 files.
serve_bench() {
  DEVICE=$device MODELS_DIR=$models BIN_DIR=$bin PLUGIN=$bin/sentence_classifier.wasm OUT_DIR=$root/target/gpu-check-serving \
    REQUESTS_PER_CLIENT=$per_client DURATION=12 bash tools/bench_serving.sh "$@" | tee -a "$results"
  return "${PIPESTATUS[0]}"
}

serving() {
  # 32-row passes, and the shape the device picks when the config is silent (128 rows on CUDA).
  serve_bench "$model" "$concurrencies" "batchbox:$serve_dtype" "batchbox-default:$serve_dtype"
}

# The export windows DeBERTa's attention bias by default (tools/batchbox_export/variants/deberta.py).
# Is it faster here too? The original module, exported with --no-window-bias and served the same way.
original_serving() {
  if [ $dry = 1 ]; then
    note "  SKIPPED (dry run): the CPU's windowed bias is measured by make bench-cpu"
    skipped=1
    return 0
  fi
  "$python" tools/export_model.py synthetic --size "$size" --tokenizer "$bin/tokenizer.json" \
    --variants "cuda-$dtype" --no-window-bias --out "$models/$model-original" > "$out/export-original.log" 2>&1 || { tail "$out/export-original.log"; return 1; }
  serve_bench "$model-original" "$concurrencies" "batchbox-default:$serve_dtype"
}

# An AOTInductor package compiles with the host's g++ against CUDA's headers and links libcuda
# (issue 23); no nvcc. CUDA_HOME is made of the torch wheels' nvidia/cu13 and the bundle's header
# wheels, and a directory holding libcuda.so goes on LIBRARY_PATH.
cuda_toolchain() {
  command -v g++ > /dev/null || { echo "no g++ on this machine: AOTInductor compiles its package with it" >&2; return 1; }
  local cu13 home=$root/target/cuda-home wheels=$root/target/cuda-wheels
  cu13=$("$python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))') || return 1
  ls "$bin"/wheels/*.whl > /dev/null 2>&1 || { echo "the bundle has no CUDA header wheels: it predates the AOTI step; rebuild it (make gpu-bundle)" >&2; return 1; }
  rm -rf "$home" "$wheels" && mkdir -p "$home/include" "$home/lib64" "$wheels"
  for wheel in "$bin"/wheels/*.whl; do "$python" -m zipfile -e "$wheel" "$wheels"; done
  cp -rs "$cu13/include/." "$home/include/"
  cp -rn "$wheels/nvidia/cu13/include/." "$home/include/"
  # CUDA 13 keeps cub, thrust and libcu++ under include/cccl; a compiler told only include/ finds them too.
  for dir in "$home"/include/cccl/*; do [ -d "$dir" ] && { [ -e "$home/include/${dir##*/}" ] || ln -s "$dir" "$home/include/"; }; done
  ln -s "$cu13"/lib/* "$home/lib64/"
  ln -sf "$cu13/lib/libcudart.so.13" "$home/lib64/libcudart.so"
  local libcuda
  libcuda=$({ ldconfig -p 2> /dev/null || /sbin/ldconfig -p; } | awk '$1 == "libcuda.so.1" { print $NF; exit }')
  [ -n "$libcuda" ] || { echo "no libcuda.so.1 in ldconfig's cache: the driver is missing" >&2; return 1; }
  ln -sf "$libcuda" "$home/lib64/libcuda.so"
  [ -f "$home/include/crt/host_defines.h" ] || { echo "no crt/host_defines.h under $home: the header wheels did not unpack" >&2; return 1; }
  export CUDA_HOME=$home LIBRARY_PATH=$home/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
}

# The same model as an AOTInductor package (compiled here; its compile time is reported), served
# with `gpu_backend: aoti` in 32-row passes and the device's default shape.
aoti_serving() {
  local variant=cuda-$dtype-aoti
  if [ $dry = 1 ]; then
    variant=cpu-float32-aoti
  else
    cuda_toolchain || return 1
  fi
  "$python" tools/export_model.py synthetic --size "$size" --tokenizer "$bin/tokenizer.json" \
    --variants "$variant" --out "$models/$model-aoti" > "$out/export-aoti.log" 2>&1 || { tail -20 "$out/export-aoti.log"; return 1; }
  grep "compiled by AOTInductor\|^  check $variant length *512" "$out/export-aoti.log" | sed 's/^  check /  - /' | tee -a "$summary"
  BACKEND=aoti serve_bench "$model-aoti" "$concurrencies" "batchbox:$serve_dtype" "batchbox-default:$serve_dtype"
}

# What a user can write in twenty lines: torch.compile of the same checkpoint, one sorted batch.
compiled_python() {
  local mode=max-autotune
  # On a CPU (a dry run) the point is that the step runs: the default mode compiles in a minute.
  [ $dry = 1 ] && mode=default
  "$python" tools/seed_baseline.py --device "$device" --dtype "$dtype" --rounds "$rounds" --warmup 2 --compile "$mode" \
    --setup sorted:1000 synthetic --size "$size" --tokenizer "$bin/tokenizer.json" | tee -a "$results"
}

step "export DeBERTa-v3-$size ($variants)" export export_model
step "CUDA tests" cuda cuda_tests
step "seed's way in Python ($dtype on $device)" seed seed_baseline
step "serving benchmark ($device, $serve_dtype, clients: $concurrencies)" serving serving
step "original attention bias (--no-window-bias), served ($device, $serve_dtype)" original original_serving
step "AOTInductor package, compiled here and served ($device, $serve_dtype)" aoti aoti_serving
step "torch.compile in Python ($dtype on $device)" compile compiled_python
note ""
"$python" tools/bench_table.py "$results" >> "$summary"
note ""
note "total $(( $(date +%s) - started )) s; failed steps: ${#failures[@]}${failures[*]:+ (${failures[*]})}"
echo
cat "$summary"
[ ${#failures[@]} = 0 ]
