"""Does a config reload raise tail latency? (BENCHMARKS.md, "What a reload costs".)

    python3 tools/bench_reload.py [--seconds 30] [--clients 8] [--every 1.0]

Run from the repository root after `make build plugins`. One server, under `loadgen` with
one-sentence requests, runs phases of `--seconds` each: without reloads, and with a
`POST /admin/reload` every `--every` seconds. Each reload swaps between two configs, one with an
extra tenant and one without, so every reload adds or removes a tenant and loads and configures
every tenant's plugin again. The phases run in the order off, on, on, off (a drift over the run
weighs on both alike), and the p99s are set beside the mean forward pass of the same phases,
read from the server's /metrics: the claim is that reloading raises p99 by less than one pass.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

OUT = Path("target/bench-reload")
ADMIN_KEY = "bench-reload-admin-key"
CONFIG = """
models: [{{ name: minilm-topics, path: "{root}/models/minilm-topics", device: cpu, cpu_dtype: int8 }}]
api: {{ inference_batch_size: 32, use_fp16: true, max_batch_tokens: 8192 }}
server: {{ bind: "127.0.0.1:0", plugin_cache_dir: "{root}/target/plugin-cache", admin_keys: ["file:admin.keys"] }}
tenants:
  - {{ name: classifier, wasm: "{root}/plugins/target/wasm32-wasip2/release/sentence_classifier.wasm", routes: [/api/v1/predict/sentences] }}
  - {{ name: echo, wasm: "{root}/plugins/target/wasm32-wasip2/release/plugin_echo.wasm", routes: [/echo] }}
{extra}"""
EXTRA = """  - {{ name: extra, wasm: "{root}/plugins/target/wasm32-wasip2/release/sentence_classifier.wasm", routes: [/extra] }}
"""


def write_config(extra: bool) -> Path:
    root = Path.cwd()
    config = OUT / "config.yaml"
    config.write_text(CONFIG.format(root=root, extra=EXTRA.format(root=root) if extra else ""))
    return config


def request(address: str, method: str, path: str, headers=None):
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    started = time.perf_counter()
    connection.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body, time.perf_counter() - started


def pass_totals(address: str) -> tuple:
    """The model's forward passes so far: (count, seconds), from /metrics."""
    _, body, _ = request(address, "GET", "/metrics")
    values = {}
    for line in body.decode().splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"batchbox_model_pass_duration_seconds{suffix}{{"):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values["_count"], values["_sum"]


def phase(address: str, seconds: float, clients: int, reload_every) -> dict:
    """One loadgen run; with `reload_every`, a reload that often meanwhile."""
    before = pass_totals(address)
    loadgen = subprocess.Popen(
        [
            "target/release/loadgen",
            "--server", f"http://{address}",
            "--requests-file", str(OUT / "requests.jsonl"),
            "-c", str(clients),
            "-d", str(seconds),
            "--json",
        ],
        stdout=subprocess.PIPE,
    )
    reloads = []
    extra = False
    while reload_every and loadgen.poll() is None:
        time.sleep(reload_every)
        extra = not extra
        write_config(extra)
        status, body, took = request(address, "POST", "/admin/reload", {"authorization": f"Bearer {ADMIN_KEY}"})
        assert status == 200, body
        reloads.append(took)
    report = json.loads(loadgen.communicate()[0])
    after = pass_totals(address)
    passes = after[0] - before[0]
    return {
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "requests": report["requests"],
        "statuses": report["statuses"],
        "mean_pass_ms": 1e3 * (after[1] - before[1]) / passes,
        "reloads": len(reloads),
        "reload_median_ms": 1e3 * statistics.median(reloads) if reloads else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--every", type=float, default=1.0)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "admin.keys").write_text(ADMIN_KEY + "\n")
    sentences = json.loads(Path("tests/fixtures/test_120_sentences.json").read_text())["sentences"]
    (OUT / "requests.jsonl").write_text("\n".join(json.dumps({"sentences": [s]}) for s in sentences))
    config = write_config(False)
    log = open(OUT / "server.log", "w")
    server = subprocess.Popen(
        ["target/release/batchbox", "--config", str(config), "serve"], stdout=subprocess.PIPE, stderr=log
    )
    try:
        address = server.stdout.readline().decode().strip().removeprefix("listening on http://")
        deadline = time.monotonic() + 120
        while request(address, "GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        # Warm up: the model's cost model and every plugin's compiled code.
        phase(address, 5, args.clients, None)
        results = [(on, phase(address, args.seconds, args.clients, args.every if on else None)) for on in (False, True, True, False)]
    finally:
        server.terminate()
        server.wait()
    print(f"{args.clients} clients, one sentence per request, {args.seconds:.0f} s per phase, reload every {args.every} s")
    print("| phase | reloads | requests | p50 ms | p99 ms | mean pass ms | reload median ms | statuses |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (on, r) in enumerate(results, 1):
        took = f"{r['reload_median_ms']:.1f}" if r["reload_median_ms"] else "–"
        print(f"| {i}, reloads {'on' if on else 'off'} | {r['reloads']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_pass_ms']:.2f} | {took} | {r['statuses']} |")
    p99 = lambda state: statistics.mean(r["p99_ms"] for on, r in results if on == state)
    mean_pass = statistics.mean(r["mean_pass_ms"] for _, r in results)
    rise = p99(True) - p99(False)
    print(f"p99 with reloads {p99(True):.1f} ms, without {p99(False):.1f} ms: {rise:+.1f} ms; one pass {mean_pass:.2f} ms on average")
    print("within one pass" if rise <= mean_pass else "MORE than one pass")


if __name__ == "__main__":
    main()
