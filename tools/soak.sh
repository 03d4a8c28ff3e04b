#!/usr/bin/env bash
# Soak (`make soak`): the real server, on the default model and config, under many small
# requests at many clients, with its memory sampled from /proc every few thousand requests; then
# a plot of resident memory against requests answered.
#
#   tools/soak.sh LABEL [SERVER_ENV...]
#   e.g. tools/soak.sh as-shipped
#        tools/soak.sh arena-max-2 MALLOC_ARENA_MAX=2
#
# SERVER_ENV are NAME=VALUE pairs for the server's environment (an allocator setting, say).
# Environment: REQUESTS (default 50000), CLIENTS (64), SAMPLE_EVERY (1000), DTYPE (int8), OUT_DIR
# (target/soak), BIN_DIR (target/release).
#
# The config is shared_config.yaml with one change: `cpu_dtype` is DTYPE rather than `auto`.
# `auto` times each precision at startup, so on a busy machine two runs may choose differently,
# and each precision runs other kernels with other memory; runs compare only at one precision
# (int8 is what `auto` chooses on the 2-core development machine).
#
# Each request is one sentence of tests/fixtures/test_120_sentences.json, in turn (120 bodies of
# 6 to 50 words). Writes OUT_DIR/LABEL.csv (loadgen --samples: requests, seconds, VmRSS, RssAnon,
# RssFile, threads), OUT_DIR/LABEL.json (loadgen's report) and OUT_DIR/LABEL.log (the server's
# log), and plots every CSV in OUT_DIR to OUT_DIR/soak-rss.png (tools/plot_soak.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/start_server.sh
label=${1:?usage: tools/soak.sh LABEL [NAME=VALUE...]}
shift
out=${OUT_DIR:-target/soak}
bin_dir=${BIN_DIR:-target/release}
mkdir -p "$out"
requests_file=$out/one-sentence-requests.jsonl
.venv/bin/python -c '
import json, sys
for s in json.load(open("tests/fixtures/test_120_sentences.json"))["sentences"]:
    print(json.dumps({"sentences": [s]}))' > "$requests_file"

config=$out/$label.yaml
sed -e "s|cpu_dtype: auto|cpu_dtype: ${DTYPE:-int8}|" -e "s|path: models/|path: $PWD/models/|" \
    -e "s|wasm: plugins/|wasm: $PWD/plugins/|" -e "s|plugin_cache_dir: target/|plugin_cache_dir: $PWD/target/|" \
    shared_config.yaml > "$config"
grep -q "cpu_dtype: ${DTYPE:-int8}" "$config" || { echo "shared_config.yaml has no 'cpu_dtype: auto' to pin" >&2; exit 1; }

start_server "$out/$label" "$config" "$@"
"$bin_dir/loadgen" --server "$address" --requests-file "$requests_file" --concurrency "${CLIENTS:-64}" \
  --requests "${REQUESTS:-50000}" --duration 86400 --pid $server --samples "$out/$label.csv" \
  --sample-every "${SAMPLE_EVERY:-1000}" --json | tee "$out/$label.json"
kill $server
wait $server || true
trap - EXIT
.venv/bin/python tools/plot_soak.py "$out/soak-rss.png" "$out"/*.csv
