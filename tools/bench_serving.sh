#!/usr/bin/env bash
# Serving benchmark: the real server under the load generator, batchbox's batching against the
# seed's (one pass per sentence; batches of 32 in input order), at several client counts.
#
#   tools/bench_serving.sh MODEL DTYPE "CONCURRENCIES" SETUPS...
#   e.g. tools/bench_serving.sh minilm-topics fp32 "1 4 16 64" batchbox seed-fix seed-old
#
# Each run posts the 120-sentence fixture max(4, clients) times, so every client sends at least
# one request. Prints one JSON line per run (loadgen --json plus model, setup, dtype).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 dtype=$2 concurrencies=$3
shift 3
out=target/bench-serving
mkdir -p "$out"
for setup in "$@"; do
  case $setup in
    batchbox) api="inference_batch_size: 32, max_batch_tokens: 8192, batch_order: length-sorted, max_queue_delay_ms: 2" ;;
    seed-fix) api="inference_batch_size: 32, max_batch_tokens: 1000000, batch_order: input-order, max_queue_delay_ms: 0" ;;
    seed-old) api="inference_batch_size: 1, max_batch_tokens: 1000000, batch_order: input-order, max_queue_delay_ms: 0" ;;
    *) echo "unknown setup $setup" >&2; exit 2 ;;
  esac
  config=$out/$model-$dtype-$setup.yaml
  cat > "$config" <<YAML
models: [{ name: $model, path: ../../models/$model, device: cpu, cpu_dtype: $dtype }]
api: { use_fp16: true, max_queued_tokens: 10000000, $api }
server: { bind: "127.0.0.1:0", plugin_cache_dir: ../plugin-cache }
tenants:
  - name: sentence-classifier
    wasm: ../../plugins/target/wasm32-wasip2/release/sentence_classifier.wasm
    routes: [/api/v1/predict/sentences]
    limits: { wall_ms: 600000, max_concurrent: 1024 }
YAML
  ./target/release/batchbox --config "$config" serve > "$out/server.out" 2> "$out/server.log" &
  server=$!
  trap 'kill $server 2>/dev/null' EXIT
  until grep -q listening "$out/server.out" 2>/dev/null; do sleep 0.2; done
  address=$(sed -n 's/^listening on //p' "$out/server.out")
  until curl -sf "$address/ready" > /dev/null; do sleep 0.2; done
  for c in $concurrencies; do
    n=$(( c > 4 ? c : 4 ))
    ./target/release/loadgen --server "$address" --concurrency "$c" --requests "$n" --duration 3600 --json \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(model='$model', dtype='$dtype', setup='$setup'); print(json.dumps(r))"
  done
  kill $server; wait $server 2>/dev/null || true
  trap - EXIT
done
