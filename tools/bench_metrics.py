"""What metrics cost per request: two servers on the same config, one with `server.metrics: false`,
take turns request by request, and the medians are compared (BENCHMARKS.md, "Operations").

    python3 tools/bench_metrics.py [--rounds N]

Run from the repository root after `make build plugins`. Which server starts first matters on a
small machine (two servers both "with metrics" differed by 0.25 ms on the 1-sentence request), so
the comparison runs twice, each setup started first once, and the two differences are averaged.
Two requests, on kept-alive connections:
an empty body (the sentence classifier refuses it: the host's and the plugin's fixed path, where a
few microseconds show) and one sentence (the model included). Both servers log their access
lines (JSON, to target/bench-metrics/) as they would in production.
"""

import argparse
import http.client
import random
import statistics
import subprocess
import time
from pathlib import Path

OUT = Path("target/bench-metrics")
CONFIG = """
models: [{{ name: minilm-topics, path: "{root}/models/minilm-topics", device: cpu, cpu_dtype: int8 }}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{root}/target/plugin-cache", metrics: {metrics} }}
tenants:
  - {{ name: classifier, wasm: "{root}/plugins/target/wasm32-wasip2/release/sentence_classifier.wasm", routes: [/api/v1/predict/sentences] }}
"""
REQUESTS = {"refused (empty body)": b"", "1 sentence": b'["The striker scored twice in the second half."]'}


def start(name: str, metrics: bool):
    config = OUT / f"{name}.yaml"
    config.write_text(CONFIG.format(root=Path.cwd(), metrics=str(metrics).lower()))
    log = open(OUT / f"{name}.log", "w")
    server = subprocess.Popen(
        ["target/release/batchbox", "--config", str(config), "serve"], stdout=subprocess.PIPE, stderr=log
    )
    host, port = server.stdout.readline().decode().strip().removeprefix("listening on http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    deadline = time.monotonic() + 120
    while post(connection, "GET", "/ready", None)[0] != 200:
        assert time.monotonic() < deadline, f"{name} did not become ready"
        time.sleep(0.2)
    return server, connection


def post(connection, method, path, body):
    started = time.perf_counter()
    connection.request(method, path, body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status, time.perf_counter() - started


def measure(order: list, rounds: int) -> dict:
    """Starts the servers in `order`, has them take turns, and returns each median, in ms."""
    servers = {setup: start(setup.replace(" ", "-"), setup == "metrics on") for setup in order}
    times = {(setup, request): [] for setup in servers for request in REQUESTS}
    for round in range(rounds + 20):  # the first 20 warm up
        turns = list(servers)
        random.shuffle(turns)
        for request, body in REQUESTS.items():
            for setup in turns:
                status, seconds = post(servers[setup][1], "POST", "/api/v1/predict/sentences", body)
                assert status in (200, 400), (setup, request, status)
                if round >= 20:
                    times[(setup, request)].append(seconds)
    for server, _ in servers.values():
        server.terminate()
        server.wait()
    return {key: statistics.median(samples) * 1e3 for key, samples in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    OUT.mkdir(parents=True, exist_ok=True)
    runs = [measure(["metrics on", "metrics off"], rounds), measure(["metrics off", "metrics on"], rounds)]
    print(f"{rounds} rounds per run, the two servers in random order each round\n")
    print("| request | on, p50 (on started first) | off, p50 | on − off | on, p50 (off started first) | off, p50 | on − off | mean on − off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for request in REQUESTS:
        cells, differences = [], []
        for run in runs:
            on, off = run[("metrics on", request)], run[("metrics off", request)]
            differences.append((on - off) * 1e3)
            cells += [f"{on:.3f} ms", f"{off:.3f} ms", f"{differences[-1]:+.1f} µs"]
        print(f"| {request} | {' | '.join(cells)} | {statistics.mean(differences):+.1f} µs |")


if __name__ == "__main__":
    main()
