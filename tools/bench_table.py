#!/usr/bin/env python3
"""Turns benchmark JSON lines into the Markdown tables BENCHMARKS.md keeps.

Reads the lines `tools/bench_serving.sh` (one per server run and client count) and
`tools/seed_baseline.py` (one per Python setup) print, from files or stdin, and writes:

- the Python baselines: median / min / max ms for the 120 sentences;
- the serving runs: sentences/s, latency percentiles, padding, statuses, the precision the
  server ran, and the p50 latency's ratio to the seed's way (`--reference`, a Python setup name;
  default python-input-32, batches of 32 in input order): reference median / p50; with
  `--agreement-with DTYPE`, how many of the fixture's top labels each run's answer shares with
  the run of that dtype (from the answers bench_serving.sh keeps); where runs measured it
  (bench_serving.sh ALONE=N), how far a sentence moved at most between alone and in the 120.

    tools/bench_table.py results.jsonl [--reference python-input-32] [--agreement-with fp32]
"""

from __future__ import annotations

import argparse
import json
import sys


def agreement(baseline: list[str], predictions: list[str]) -> str:
    same = sum(a == b for a, b in zip(baseline, predictions))
    return f" {same}/{len(baseline)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="JSON-lines files (default: stdin)")
    parser.add_argument("--reference", default="python-input-32", help="the Python setup ratios are taken against")
    parser.add_argument("--agreement-with", metavar="DTYPE", help="add each run's top-label agreement with this dtype's run")
    args = parser.parse_args()
    lines = []
    for handle in [open(f) for f in args.files] or [sys.stdin]:
        lines += [json.loads(line) for line in handle if line.strip().startswith("{")]
    python = [r for r in lines if r.get("setup", "").startswith("python-")]
    serving = [r for r in lines if "latency_ms" in r]
    reference = next((r["median_ms"] for r in python if r["setup"] == args.reference), None)
    predictions = lambda run: json.load(open(run["response"]))["predictions"]  # noqa: E731
    baseline = next((predictions(r) for r in serving if r.get("dtype") == args.agreement_with), None)

    if python:
        print("| Python baseline | model | median ms | min–max ms | passes | real/padded tokens | × seed's way |")
        print("|---|---|---:|---:|---:|---:|---:|")
        compiled = []
        for r in python:
            ratio = f"{reference / r['median_ms']:.2f}×" if reference else "–"
            print(f"| {r['description']} | {r['model']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | "
                  f"{r['forward_passes']} | {r['real_tokens']}/{r['padded_tokens']} | {ratio} |")
            if r.get("first_round_s") is not None and "compile" in r["description"]:
                compiled.append(f"{r['description']}: the first round, which compiles, took {r['first_round_s']} s")
        print()
        for line in compiled:
            print(f"- {line}")
        if compiled:
            print()
    if serving:
        agreement_header = f" top label = {args.agreement_with} |" if baseline else ""
        alone = any(r.get("alone_vs_batch") for r in serving)
        alone_header = " alone vs in the 120: max \\|Δp\\| |" if alone else ""
        print(f"| clients | setup | device | precision | sentences/s | p50 ms | p95 ms | p99 ms | real/padded | batches | statuses | p50 × seed's way |{agreement_header}{alone_header}")
        print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|" + ("---:|" if baseline else "") + ("---:|" if alone else ""))
        for r in serving:
            latency, server = r["latency_ms"], r.get("server") or {}
            padding = f"{server['real_over_padded']:.3f}" if server else "–"
            statuses = " ".join(f"{k}: {v}" for k, v in r["statuses"].items())
            precision = r.get("precision", r.get("dtype", ""))
            if r.get("dtype") == "auto":
                precision = f"auto → {precision}"
            if r.get("format") == "aoti":
                precision += " (AOTInductor)"
            ratio = f"{reference / latency['p50']:.2f}×" if reference and latency["p50"] else "–"
            # The model, where runs of several share the table; the rows of a pass, where the server said.
            setup = r["setup"] + (f" ({r['model']})" if len({x.get("model") for x in serving}) > 1 else "")
            if r.get("passes"):
                setup += f", {r['passes']['max_sequences']} rows"
            print(f"| {r['concurrency']} | {setup} | {r.get('device', '')} | {precision} | {r['sentences_per_s']:.1f} | "
                  f"{latency['p50']:.1f} | {latency['p95']:.1f} | {latency['p99']:.1f} | {padding} | {server.get('batches', '–')} | "
                  f"{statuses} | {ratio} |" + (agreement(baseline, predictions(r)) if baseline else "")
                  + (f" {r['alone_vs_batch']['max_abs_diff']:.1e} |" if r.get("alone_vs_batch") else " – |" if alone else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
