# Sourced by tools/soak.sh, tools/drain.sh and tools/bench_serving.sh: start_server PREFIX CONFIG [NAME=VALUE...] runs
# `batchbox serve` on a free loopback port with CONFIG and the given environment, its stdout in
# PREFIX.out and its log in PREFIX.log, and returns once it is ready, with its pid in $server and
# its base URL in $address. The server is killed if the calling script exits early.
start_server() {
  local prefix=$1 config=$2
  shift 2
  env "$@" "${BIN_DIR:-target/release}/batchbox" --config "$config" serve --bind 127.0.0.1:0 > "$prefix.out" 2> "$prefix.log" &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  until grep -q listening "$prefix.out" 2>/dev/null; do
    kill -0 $server 2>/dev/null || { cat "$prefix.log" >&2; exit 1; }
    sleep 0.2
  done
  address=$(sed -n 's/^listening on //p' "$prefix.out")
  # python3 rather than curl, which a machine may lack.
  until python3 -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1])' "$address/ready" 2> /dev/null; do
    kill -0 $server 2>/dev/null || { cat "$prefix.log" >&2; exit 1; }
    sleep 0.5
  done
}

# stop_server PREFIX: SIGTERM the server started above, wait for it, and fail (printing the end of
# its log) unless it exits 0: a server that crashes on its way out must not pass a benchmark.
stop_server() {
  local rc=0
  kill -TERM $server
  wait $server || rc=$?
  trap - EXIT
  if [ $rc != 0 ]; then
    echo "batchbox exited $rc after SIGTERM; the end of $1.log:" >&2
    tail -n 20 "$1.log" >&2
    return 1
  fi
}
