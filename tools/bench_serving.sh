#!/usr/bin/env bash
# Serving benchmark: the real server under the load generator, batchbox's batching against the
# seed's (one pass per sentence; batches of 32 in input order), at several client counts and
# precisions. The response cache is off in every setup: each request is computed.
#
#   tools/bench_serving.sh MODEL "CONCURRENCIES" SETUP[:DTYPE]...
#   e.g. tools/bench_serving.sh minilm-topics "1 4 16 64" batchbox seed-fix seed-old
#        tools/bench_serving.sh deberta-v3-base "1" batchbox:fp32 batchbox:bf16 batchbox:int8 batchbox:auto
#
# Setups: batchbox (length-sorted batches of up to 32 and 8,192 padded tokens), batchbox-b128
# (fewer, larger passes: up to 128 rows and 32,768 tokens), seed-fix (batches of 32 in input
# order), seed-old (one pass per sentence). DTYPE: on CPU a cpu_dtype (fp32, bf16, int8, auto;
# default fp32), on CUDA fp16 (default) or fp32.
#
# Environment: DEVICE (cpu or cuda; default cpu), MODELS_DIR (default models), BIN_DIR (where
# batchbox and loadgen are; default target/release), PLUGIN (the sentence-classifier .wasm),
# REQUESTS_PER_CLIENT (default 1; at least 4 requests in all), DURATION (seconds per run, default
# 3600), OUT_DIR (default target/bench-serving), ALONE (default 0: how many fixture sentences to
# send alone as well, to measure how far each moves from its row in the 120-sentence answer;
# tools/alone_vs_batch.py), BACKEND (torchscript, aoti or auto: the config's cpu_backend and
# gpu_backend; unset, the config leaves them to their default, auto).
#
# Prints one JSON line per run: loadgen --json, plus model, setup, dtype, device, the precision
# the server ran (with what `auto` measured), the file holding its answer to the fixture and, with
# ALONE, `alone_vs_batch`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/start_server.sh
model=$1 concurrencies=$2
shift 2
device=${DEVICE:-cpu}
models_dir=$(realpath "${MODELS_DIR:-models}")
bin_dir=$(realpath "${BIN_DIR:-target/release}")
plugin=$(realpath "${PLUGIN:-plugins/target/wasm32-wasip2/release/sentence_classifier.wasm}")
per_client=${REQUESTS_PER_CLIENT:-1}
out=${OUT_DIR:-target/bench-serving}
mkdir -p "$out"
out=$(realpath "$out")
# GET a URL, or POST a JSON file to it, and print the answer; fails on an HTTP error. python3
# rather than curl, which a GPU machine may lack.
fetch() {
  python3 -c 'import sys, urllib.request as http
body = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
request = http.Request(sys.argv[1], data=body, headers={"content-type": "application/json"})
sys.stdout.write(http.urlopen(request, timeout=600).read().decode())' "$@"
}
for spec in "$@"; do
  setup=${spec%%:*}
  dtype=${spec#*:}
  [ "$dtype" = "$spec" ] && dtype=$([ "$device" = cuda ] && echo fp16 || echo fp32)
  case $setup in
    batchbox) api="inference_batch_size: 32, max_batch_tokens: 8192, batch_order: length-sorted, max_queue_delay_ms: 2" ;;
    batchbox-b128) api="inference_batch_size: 128, max_batch_tokens: 32768, batch_order: length-sorted, max_queue_delay_ms: 2" ;;
    # The pass shape left to the device (32 rows on CPU, 128 on CUDA), as the shipped config does.
    batchbox-default) api="batch_order: length-sorted, max_queue_delay_ms: 2" ;;
    seed-fix) api="inference_batch_size: 32, max_batch_tokens: 1000000, batch_order: input-order, max_queue_delay_ms: 0" ;;
    seed-old) api="inference_batch_size: 1, max_batch_tokens: 1000000, batch_order: input-order, max_queue_delay_ms: 0" ;;
    *) echo "unknown setup $setup" >&2; exit 2 ;;
  esac
  case $device-$dtype in
    cuda-fp16) precision="cpu_dtype: fp32" use_fp16=true ;;
    cuda-fp32) precision="cpu_dtype: fp32" use_fp16=false ;;
    cpu-fp32|cpu-bf16|cpu-int8|cpu-auto) precision="cpu_dtype: $dtype" use_fp16=true ;;
    *) echo "unknown dtype $dtype for $device" >&2; exit 2 ;;
  esac
  backend=${BACKEND:+, cpu_backend: $BACKEND, gpu_backend: $BACKEND}
  config=$out/$model-$setup-$device-$dtype${BACKEND:+-$BACKEND}.yaml
  cat > "$config" <<YAML
models: [{ name: $model, path: $models_dir/$model, device: $device, $precision$backend }]
api: { use_fp16: $use_fp16, max_queued_tokens: 10000000, $api }
server: { bind: "127.0.0.1:0", plugin_cache_dir: $out/plugin-cache }
tenants:
  - name: sentence-classifier
    wasm: $plugin
    routes: [/api/v1/predict/sentences]
    limits: { wall_ms: 600000, max_concurrent: 1024 }
YAML
  start_server "$out/server" "$config"
  fetch "$address/v1/models" > "$out/models.json"
  # One answer to the fixture, kept for comparisons between setups (top-label agreement).
  fetch "$address/api/v1/predict/sentences" tests/fixtures/test_120_sentences.json > "$out/$model-$setup-$device-$dtype${BACKEND:+-$BACKEND}.response.json"
  echo null > "$out/alone.json"
  if [ "${ALONE:-0}" -gt 0 ]; then
    python3 tools/alone_vs_batch.py "$address" "$out/$model-$setup-$device-$dtype${BACKEND:+-$BACKEND}.response.json" --sentences "$ALONE" > "$out/alone.json"
  fi
  for c in $concurrencies; do
    n=$(( c * per_client > 4 ? c * per_client : 4 ))
    "$bin_dir/loadgen" --server "$address" --concurrency "$c" --requests "$n" --duration "${DURATION:-3600}" --json \
      | python3 -c "
import json, sys
run = json.load(sys.stdin)
served = json.load(open('$out/models.json'))['models'][0]
run.update(model='$model', setup='$setup', dtype='$dtype', device='$device', precision=served['precision'], format=served.get('format'),
           precision_choice=served['precision_choice'], passes=served.get('pass'), response='$out/$model-$setup-$device-$dtype${BACKEND:+-$BACKEND}.response.json',
           alone_vs_batch=json.load(open('$out/alone.json')))
print(json.dumps(run))"
  done
  stop_server "$out/server"
done
