"""The golden texts and their eager outputs, which the Rust tests and `cpu_dtype: auto` read
from `golden.json`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .rows import encode, pad, rows_of

if TYPE_CHECKING:
    from .sources import Source


GOLDEN_TEXTS = [
    "The home team scored twice in the final minutes to win the championship.",
    "Parliament passed the budget after a long debate about taxes.",
    "Shares of the chip maker rose 4% after strong quarterly earnings.",
    "Short.",
    "Doctors recommend regular exercise and a balanced diet to lower blood pressure.",
    "Café owners in Zürich say the new law is “confusing” — 混乱 — and costly.",
    # Longer than any max length used here, so the golden file covers truncation too.
    " ".join(["The telescope observed a distant galaxy whose light left it billions of years ago."] * 40),
]


def agreement_texts() -> list[str]:
    """What variants are compared with fp32 on: the golden texts, then `agreement_texts.txt`
    (written for this, never request traffic; `# ` lines are comments)."""
    lines = (Path(__file__).parent / "agreement_texts.txt").read_text(encoding="utf-8").splitlines()
    return GOLDEN_TEXTS + [line for line in lines if line and not line.startswith("# ")]


def golden(module: torch.nn.Module, source: Source) -> dict:
    """Eager fp32 outputs on the CPU for a few texts, as the Rust tests expect them; `export`
    adds each variant's own eager outputs under `variants`."""
    encodings = encode(source.tokenizer, GOLDEN_TEXTS, source.max_length)
    rows = [e.ids for e in encodings]
    outputs = eager_outputs(module, source, rows, "cpu")
    return {
        "texts": GOLDEN_TEXTS,
        "input_ids": rows,
        "truncated": [bool(e.overflowing) for e in encodings],
        "outputs": [o.flatten().tolist() for o in outputs],
        "shapes": [list(o.shape) for o in outputs],
        "variants": {},
    }


def eager_outputs(module: torch.nn.Module, source: Source, rows: list[list[int]], device: str) -> list[torch.Tensor]:
    """One padded batch through `module` on `device`; each row's output in fp32 on the CPU."""
    ids, mask = (t.to(device) for t in pad(rows, source.pad_token_id))
    with torch.inference_mode():
        output = module(ids, mask).float().cpu()
    return rows_of(output, [len(r) for r in rows], source.task)

