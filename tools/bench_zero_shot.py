#!/usr/bin/env python3
"""Zero-shot benchmark (issue 24): the 120-sentence fixture against 7 candidate labels (840 NLI
pairs) through the `zero-shot` plugin, beside the same 120 sentences classified through the
sentence-classifier plugin, on one real `batchbox serve` with one model, one client, one request
at a time, alternating, in one run. Reports the median end-to-end time of each, the forward
passes each request took (the zero-shot plugin's `x-batchbox-forward-passes`, the classifier's
`metadata.forward_passes`) and the pairs, as JSON and as a Markdown row.

    .venv/bin/python tools/bench_zero_shot.py [--model models/deberta-v3-base-fp32] [--rounds 5]

The model is any exported sequence classifier that takes pairs; with no label starting with
"entail", the last label stands for entailment, as transformers' pipeline reads it. The default
is DeBERTa-v3-base's shapes with random weights, exported in fp32 from the checkpoint that
`make bench-cpu` builds (`make models/deberta-v3-base-fp32/manifest.json`)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools/tests"))

from batchbox_server import RUST_PLUGINS, serve  # noqa: E402

SENTENCES = json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"]
LABELS = ["sports", "politics", "business", "technology", "science", "health", "entertainment"]


def timed_post(url: str, body: dict) -> tuple[float, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer, headers = json.loads(response.read()), dict(response.headers)
    return (time.perf_counter() - started) * 1000, answer, {k.lower(): v for k, v in headers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/deberta-v3-base-fp32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = [{"name": "nli", "path": str(args.model.resolve()), "cpu_dtype": "fp32"}]
    # 840 pairs on a CPU take longer than a tenant's default 30 s.
    limits = {"wall_ms": 600_000}
    tenants = [
        {"name": "classify", "wasm": str(RUST_PLUGINS / "sentence_classifier.wasm"), "routes": ["/classify"], "model": "nli",
         "limits": limits},
        {"name": "zero-shot", "wasm": str(RUST_PLUGINS / "zero_shot.wasm"), "routes": ["/zero-shot"], "model": "nli",
         "config": {"max_inputs": 120, "max_candidate_labels": 7}, "limits": limits},
    ]
    zero_shot_body = {"inputs": SENTENCES, "parameters": {"candidate_labels": LABELS}}
    times = {"classify": [], "zero-shot": []}
    passes = {"classify": [], "zero-shot": []}
    with tempfile.TemporaryDirectory() as folder, serve(Path(folder), models, tenants, ready_s=600) as base:
        for round_ in range(args.rounds + 1):  # the first round warms up
            ms, answer, _ = timed_post(f"{base}/classify", {"sentences": SENTENCES})
            if round_:
                times["classify"].append(ms)
                passes["classify"].append(answer["metadata"]["forward_passes"])
            ms, answer, headers = timed_post(f"{base}/zero-shot", zero_shot_body)
            assert len(answer) == len(SENTENCES) and all(len(row) == len(LABELS) for row in answer)
            if round_:
                times["zero-shot"].append(ms)
                passes["zero-shot"].append(int(headers["x-batchbox-forward-passes"]))
    result = {
        "model": args.model.name,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "rounds": args.rounds,
        "pairs": len(SENTENCES) * len(LABELS),
        **{f"{kind}_median_ms": round(statistics.median(t), 1) for kind, t in times.items()},
        **{f"{kind}_forward_passes": passes[kind] for kind in passes},
    }
    result["ratio"] = round(result["zero-shot_median_ms"] / result["classify_median_ms"], 2)
    print(json.dumps(result))
    print("| request | sequences | forward passes (each round) | median ms |")
    print("|---|---:|---|---:|")
    print(f"| classify, 120 sentences | 120 | {passes['classify']} | {result['classify_median_ms']} |")
    print(f"| zero-shot, 120 sentences x 7 labels | {result['pairs']} | {passes['zero-shot']} | {result['zero-shot_median_ms']} |")


if __name__ == "__main__":
    main()
