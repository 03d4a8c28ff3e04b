#!/usr/bin/env python3
"""The seed's way of serving, in Python, for side-by-side comparisons with batchbox.

The seed API tokenized each chunk of `--batch-size` sentences in input order, padded it to its
longest row, ran the eager Hugging Face model (fp16 on CUDA) and took the softmax. This script
does exactly that, on the same model the batchbox export starts from, and times it end to end:
tokenizing, padding, every forward pass and the probabilities back on the CPU. `--order sorted`
above the sentence count gives the other reference, one length-sorted batch. Each `--setup
ORDER:BATCH` is measured on the same loaded model (default: input:32, the seed's way).

    tools/seed_baseline.py --device cpu --dtype float32 default
    tools/seed_baseline.py --device cuda --dtype float16 --setup input:32 --setup sorted:1000 \
        synthetic --size large --tokenizer tokenizer.json
    tools/seed_baseline.py --device cpu checkpoint models/checkpoints/deberta-v3-base
    tools/seed_baseline.py --device cuda --dtype float16 --compile max-autotune --setup sorted:1000 \
        synthetic --size large --tokenizer tokenizer.json

`--compile MODE` runs the same model through `torch.compile`: what a user who only wants speed
can write in twenty lines. Its first warm-up round compiles (`first_round_s`).

Prints one JSON line per setup: median / min / max milliseconds over `--rounds` (after
`--warmup`), forward passes and real/padded tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_model as ex  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests/fixtures/test_120_sentences.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def source_from(args) -> ex.Source:
    if args.source == "default":
        return ex.default_model(None)
    if args.source == "checkpoint":
        return ex.from_checkpoint(args.path, None, None)
    return ex.synthetic_deberta(args.size, args.labels, args.seed, args.tokenizer)


def predict(model, tokenizer, sentences: list[str], batch_size: int, order: str, device: str):
    """The seed's loop: chunks in input (or length-sorted) order, each padded to its longest row."""
    indices = list(range(len(sentences)))
    if order == "sorted":
        # The tokenizer pads: a sequence's own length is its attention mask's sum.
        lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(sentences)]
        indices.sort(key=lambda i: -lengths[i])
    probabilities: list = [None] * len(sentences)
    passes = real = padded = 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        encodings = tokenizer.encode_batch([sentences[i] for i in chunk])
        ids = torch.tensor([e.ids for e in encodings], device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=device)
        with torch.inference_mode():
            rows = torch.softmax(model(ids, mask).float(), dim=-1).cpu().tolist()
        for i, row in zip(chunk, rows):
            probabilities[i] = row
        passes += 1
        real += int(mask.sum())
        padded += mask.numel()
    return probabilities, passes, real, padded


def parse_setup(text: str) -> tuple[str, int]:
    order, _, batch = text.partition(":")
    if order not in ("input", "sorted") or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected input:N or sorted:N")
    return order, int(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--setup", action="append", type=parse_setup, help="ORDER:BATCH, ORDER input or sorted (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", metavar="MODE", help="torch.compile the model with this mode (e.g. max-autotune): "
                        "the twenty lines of Python a user can write; the first warm-up round compiles, and its time is reported")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    sub = parser.add_subparsers(dest="source", required=True)
    sub.add_parser("default", help="the default model (all-MiniLM-L6-v2 topics)")
    p = sub.add_parser("checkpoint", help="a Hugging Face checkpoint directory")
    p.add_argument("path", type=Path)
    p = sub.add_parser("synthetic", help="DeBERTa-v3 with seeded random weights")
    p.add_argument("--size", choices=sorted(ex.SYNTHETIC_SIZES), default="large")
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    source = source_from(args)
    model = source.module.eval().to(args.device, DTYPES[args.dtype])
    if args.compile:
        model = torch.compile(model, mode=args.compile)
    tokenizer = source.tokenizer
    tokenizer.enable_truncation(source.max_length)
    tokenizer.enable_padding(pad_id=source.pad_token_id)
    sentences = json.loads(FIXTURE.read_text())["sentences"]

    for order, batch_size in args.setup or [("input", 32)]:
        times, first_round_s = [], None
        for round_ in range(args.warmup + args.rounds):
            started = time.perf_counter()
            _, passes, real, padded = predict(model, tokenizer, sentences, batch_size, order, args.device)
            if round_ >= args.warmup:
                times.append((time.perf_counter() - started) * 1e3)
            elif round_ == 0:
                first_round_s = time.perf_counter() - started
        compiled = f", torch.compile(mode={args.compile!r})" if args.compile else ""
        print(json.dumps({
            "setup": f"python-{order}-{batch_size}" + ("-compiled" if args.compile else ""),
            "description": f"Python {'compiled' if args.compile else 'eager'}, batches of {batch_size} in {order} order, "
                           f"{args.dtype} on {args.device}{compiled}",
            "first_round_s": round(first_round_s, 1) if first_round_s is not None else None,
            "model": source.name,
            "device": args.device,
            "dtype": args.dtype,
            "sentences": len(sentences),
            "median_ms": round(statistics.median(times), 2),
            "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2),
            "rounds": len(times),
            "forward_passes": passes,
            "real_tokens": real,
            "padded_tokens": padded,
            "torch_threads": torch.get_num_threads(),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
