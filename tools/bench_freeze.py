#!/usr/bin/env python3
"""Does freezing the exported TorchScript make it faster? Measured before deciding.

Loads one variant of an exported model three ways: as exported, `torch.jit.freeze`d, and frozen
then `torch.jit.optimize_for_inference`d; checks their outputs against the exported module on
the 120-sentence fixture in length-sorted batches of 32, and times each over `--rounds`
interleaved rounds (medians).

    tools/bench_freeze.py models/minilm-topics cpu-float32 [--rounds 5]
    tools/bench_freeze.py models/synthetic-deberta-v3-large cuda-float16   (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchbox_export import pad as _pad  # noqa: E402
from seed_baseline import FIXTURE  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an exported model directory")
    parser.add_argument("variant", help="e.g. cpu-float32, cpu-bfloat16, cpu-int8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    manifest = json.loads((args.model / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest["max_length"])
    rows = [e.ids for e in tokenizer.encode_batch(json.loads(FIXTURE.read_text())["sentences"])]
    rows.sort(key=len, reverse=True)
    device = args.variant.split("-")[0]
    batches = [[t.to(device) for t in _pad(rows[i : i + 32], manifest["pad_token_id"])] for i in range(0, len(rows), 32)]

    path = str(args.model / manifest["variants"][args.variant])
    load = lambda: torch.jit.load(path, map_location=device).eval()  # noqa: E731
    # GPU work is asynchronous: a timing ends when the device has finished.
    finish = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    modules = {
        "as exported": load(),
        "frozen": torch.jit.freeze(load()),
        "frozen + optimize_for_inference": torch.jit.optimize_for_inference(torch.jit.freeze(load())),
    }
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.inference_mode():
        reference = [modules["as exported"](*b) for b in batches]
        for name, module in modules.items():
            for _ in range(2):  # the profiling executor optimises after its first runs
                outputs = [module(*b) for b in batches]
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(reference, outputs))
            print(f"{name}: max |diff| vs as exported {diff:.2e}")
        for _ in range(args.rounds):
            for name, module in modules.items():
                started = time.perf_counter()
                for batch in batches:
                    module(*batch)
                finish()
                times[name].append((time.perf_counter() - started) * 1e3)
    base = statistics.median(times["as exported"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name}: median {median:.1f} ms (min {min(samples):.1f}, max {max(samples):.1f}), {base / median:.2f}x as exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
