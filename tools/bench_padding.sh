#!/usr/bin/env bash
# Padding under many small requests: the real server on the default model and config, CLIENTS
# clients (64) each sending one fixture sentence at a time (`make soak`'s workload) for SECONDS
# (60); loadgen reads /v1/models' counters before and after, so each run reports real/padded
# tokens, passes and sentences/s over its own window.
#
#   tools/bench_padding.sh LABEL=BIN_DIR [LABEL=BIN_DIR...]
#   e.g. tools/bench_padding.sh before=/tmp/before after=target/release
#
# Builds are measured in turn, the whole list ROUNDS times (2), so that two builds compare in one
# run on a shared machine. `cpu_dtype` is pinned to DTYPE (fp32): `auto` might choose differently
# for each server. Prints one JSON line per run (loadgen's report with the label and round) and a
# Markdown table of medians; keeps the logs in target/bench-padding/.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/start_server.sh
[ $# -gt 0 ] || { echo "usage: tools/bench_padding.sh LABEL=BIN_DIR [LABEL=BIN_DIR...]" >&2; exit 2; }
out=target/bench-padding
mkdir -p "$out"
requests_file=$out/one-sentence-requests.jsonl
.venv/bin/python -c '
import json
for s in json.load(open("tests/fixtures/test_120_sentences.json"))["sentences"]:
    print(json.dumps({"sentences": [s]}))' > "$requests_file"
config=$out/config.yaml
sed -e "s|cpu_dtype: auto|cpu_dtype: ${DTYPE:-fp32}|" -e "s|path: models/|path: $PWD/models/|" \
    -e "s|wasm: plugins/|wasm: $PWD/plugins/|" -e "s|plugin_cache_dir: target/|plugin_cache_dir: $PWD/target/|" \
    shared_config.yaml > "$config"
results=$out/results.jsonl
: > "$results"
for round in $(seq "${ROUNDS:-2}"); do
  for build in "$@"; do
    label=${build%%=*}
    BIN_DIR=${build#*=} start_server "$out/$label-$round" "$config"
    # A few seconds unmeasured first: the cost model learns the pass times.
    "${build#*=}/loadgen" --server "$address" --requests-file "$requests_file" --concurrency "${CLIENTS:-64}" \
      --duration 5 --json > /dev/null
    "${build#*=}/loadgen" --server "$address" --requests-file "$requests_file" --concurrency "${CLIENTS:-64}" \
      --duration "${SECONDS_PER_RUN:-60}" --json |
      .venv/bin/python -c 'import json, sys; r = json.load(sys.stdin); r.update(label=sys.argv[1], round=int(sys.argv[2])); print(json.dumps(r))' \
        "$label" "$round" | tee -a "$results"
    stop_server "$out/$label-$round"
  done
done
.venv/bin/python - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print("\n| build | real/padded tokens | passes/s | rows per pass | sentences/s | p50 ms | p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label in dict.fromkeys(r["label"] for r in runs):
    mine = [r for r in runs if r["label"] == label]
    med = lambda f: statistics.median(f(r) for r in mine)
    print(f"| {label} | {med(lambda r: r['server']['real_over_padded']):.3f} | {med(lambda r: r['server']['batches'] / r['seconds']):.1f} "
          f"| {med(lambda r: r['sentences'] / r['server']['batches']):.1f} | {med(lambda r: r['sentences_per_s']):.1f} "
          f"| {med(lambda r: r['latency_ms']['p50']):.1f} | {med(lambda r: r['latency_ms']['p99']):.1f} |")
PY
