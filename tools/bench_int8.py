#!/usr/bin/env python3
"""The CPU precision routes side by side, as the export traces them, on one model in one run
(BENCHMARKS.md, "Batch invariance and int8"):

    fp32                  the reference
    bf16 cast             bf16 as it was exported before (attention in bf16)
    bf16 (exported)       attention in fp64 where the model allows (variants/attention.py)
    int8 per batch        quantize_dynamic: one activation scale per call (the earlier cpu-int8)
    int8 per row          int8 linear layers with a scale per row (torch._int_mm)
    int8 (exported)       per row, attention in fp64 where the model allows (variants/int8.py)

For each: the median time of a 32 x 48 batch and of the 120-sentence fixture in length-sorted
passes of 32; top-label agreement with fp32 and the largest |dp| over the export's agreement
texts; and batch invariance, each text alone against its row in length-sorted passes of 32, over
the fixture and over the agreement texts.

    .venv/bin/python tools/bench_int8.py default
    .venv/bin/python tools/bench_int8.py checkpoint models/checkpoints/deberta-v3-base

Prints one JSON line per route and a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import batchbox_export as ex  # noqa: E402
from batchbox_export.variants import int8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def routes(eager: torch.nn.Module):
    yield "fp32", eager
    yield "bf16 cast", copy.deepcopy(eager).to(torch.bfloat16)
    yield "bf16 (exported)", ex.Variant("cpu", torch.bfloat16).prepare(eager)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    yield "int8 per batch", torch.ao.quantization.quantize_dynamic(copy.deepcopy(eager), {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    yield "int8 per row", int8.quantize(eager)
    yield "int8 (exported)", ex.Variant("cpu", torch.qint8).prepare(eager)


def median_ms(run, rounds: int) -> float:
    run()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["default", "checkpoint"])
    parser.add_argument("path", nargs="?", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    source = ex.default_model(None) if args.source == "default" else ex.from_checkpoint(args.path, None, None)
    eager = source.module.eval().float()
    encode = lambda texts: [e.ids for e in ex.encode(source.tokenizer, texts, source.max_length)]  # noqa: E731
    fixture = encode(json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"])
    agreement_rows = encode(ex.agreement_texts())
    timing = ex.pad([row[:48] for row in (fixture * 2)[:32]], source.pad_token_id)
    reference = ex.sorted_outputs(eager, source, agreement_rows, "cpu")
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    example = ex.pad(ex.random_rows([11, 6], vocab, torch.Generator().manual_seed(0)), source.pad_token_id)
    table = []
    for name, module in routes(eager):
        traced = torch.jit.trace(module, example, check_trace=False)
        sorted_fixture = [ex.pad(c, source.pad_token_id) for c in _chunks(sorted(fixture, key=len))]
        result = {
            "model": source.name,
            "route": name,
            "ms_32x48": median_ms(lambda: traced(*timing), 7),
            "ms_fixture": median_ms(lambda: [traced(*batch) for batch in sorted_fixture], 3),
        }
        outputs = ex.sorted_outputs(traced, source, agreement_rows, "cpu")
        agreed = ex.agreement(reference, outputs)
        result.update(agreeing=agreed["agreeing"], compared=agreed["compared"], max_dp_vs_fp32=agreed["max_abs_diff"])
        for label, rows, batched in [("fixture", fixture, None), ("agreement", agreement_rows, outputs)]:
            batched = batched or ex.sorted_outputs(traced, source, rows, "cpu")
            moves = [
                (a - b).abs().max().item()
                for a, b in zip(ex.probabilities([ex.eager_outputs(traced, source, [r], "cpu")[0] for r in rows]), ex.probabilities(batched))
            ]
            result[f"{label}_max_move"] = max(moves)
            result[f"{label}_over_1e-3"] = sum(m > 1e-3 for m in moves)
            result[f"{label}_texts"] = len(moves)
        print(json.dumps(result), flush=True)
        table.append(result)
    fp32 = table[0]
    print(f"\n{source.name}, {torch.get_num_threads()} threads\n")
    print("| route | 32×48 ms | fixture ms | × fp32 (fixture) | top labels = fp32 | max \\|Δp\\| vs fp32 | alone vs batched, fixture: max \\|Δp\\| (over 1e-3) | agreement texts: max \\|Δp\\| (over 1e-3) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['route']} | {r['ms_32x48']:.0f} | {r['ms_fixture']:.0f} | {fp32['ms_fixture'] / r['ms_fixture']:.2f}× | "
              f"{r['agreeing']}/{r['compared']} | {r['max_dp_vs_fp32']:.1e} | {r['fixture_max_move']:.1e} ({r['fixture_over_1e-3']}/{r['fixture_texts']}) | "
              f"{r['agreement_max_move']:.1e} ({r['agreement_over_1e-3']}/{r['agreement_texts']}) |")
    return 0


def _chunks(rows: list[list[int]]) -> list[list[list[int]]]:
    return [rows[start : start + ex.checks.PASS_ROWS] for start in range(0, len(rows), ex.checks.PASS_ROWS)]


if __name__ == "__main__":
    sys.exit(main())
