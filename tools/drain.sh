#!/usr/bin/env bash
# Drain (`make drain`): SIGTERM to the real server, on the default model and config, while many
# clients send requests; then what became of the requests and how the server exited.
#
#   tools/drain.sh [CLIENTS]                  default 64
#
# loadgen --sigterm-after sends the signal once CLIENTS*2 requests are answered (every client is
# then waiting for an answer) and keeps sending until connections are refused; each request goes
# on a connection of its own, so its fate shows on the socket (see loadgen's docs and
# tests/drain.rs: answered, refused, reset (never accepted) or dropped).
# Environment: SENTENCES per request (default 4, from tests/fixtures/test_120_sentences.json),
# CONFIG (shared_config.yaml), OUT_DIR (target/drain), BIN_DIR (target/release).
#
# Prints one JSON line: loadgen's report, with the server's exit code added to its "drain".
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/start_server.sh
clients=${1:-64}
out=${OUT_DIR:-target/drain}
bin_dir=${BIN_DIR:-target/release}
mkdir -p "$out"
requests_file=$out/requests.jsonl
.venv/bin/python -c '
import json, sys
sentences = json.load(open("tests/fixtures/test_120_sentences.json"))["sentences"]
n = int(sys.argv[1])
for i in range(0, len(sentences), n):
    print(json.dumps({"sentences": sentences[i:i + n]}))' "${SENTENCES:-4}" > "$requests_file"

start_server "$out/server" "${CONFIG:-shared_config.yaml}"
"$bin_dir/loadgen" --server "$address" --requests-file "$requests_file" --concurrency "$clients" \
  --requests 1000000 --duration 3600 --pid $server --sigterm-after $((clients * 2)) --json > "$out/loadgen.json"
code=0
wait $server || code=$?
trap - EXIT
.venv/bin/python -c '
import json, sys
report = json.load(open(sys.argv[1]))
report["drain"]["exit_code"] = int(sys.argv[2])
print(json.dumps(report))' "$out/loadgen.json" "$code"
