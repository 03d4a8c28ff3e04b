"""What an export checks before it writes anything: each traced file against the eager model, on
padded batches, and each reduced-precision variant's top labels against fp32's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import ExportError
from .golden import eager_outputs
from .rows import pad, random_rows, rows_of

TOLERANCE = 1e-4
CHECK_LENGTHS = (3, 17, 64, 300)

if TYPE_CHECKING:
    from .sources import Source
    from .variants import Variant



def check_traced(eager: torch.nn.Module, traced: torch.nn.Module, source: Source, variant: Variant) -> list[str]:
    """Compares traced with eager on padded batches, and padded with unpadded rows.

    Returns a line per check; raises ExportError on the first that fails.
    """
    generator = torch.Generator().manual_seed(1234)
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    report = []
    for length in sorted({min(n, source.max_length) for n in CHECK_LENGTHS}):
        # Three rows of different lengths, so every batch carries padding.
        lengths = [length, max(1, length // 2), max(1, length // 3)]
        rows = random_rows(lengths, vocab, generator)
        batch = [t.to(variant.device) for t in pad(rows, source.pad_token_id)]
        with torch.inference_mode():
            want = eager(*batch).float()
            got = traced(*batch).float()
            alone = [traced(*[t.to(variant.device) for t in pad([row], source.pad_token_id)]).float() for row in rows]
        scale = 1.0 if variant.dtype == torch.float32 else max(1.0, want.abs().max().item())
        diff = (want - got).abs().max().item() / scale
        if not diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: traced module differs from the eager model at length {length}: "
                f"max |diff| = {diff:.3g} > {variant.tolerance} (shapes {list(want.shape)}, {list(got.shape)})"
            )
        padding_diff = max(
            (a - b).abs().max().item() / scale
            for a, b in zip(rows_of(got, lengths, source.task), (rows_of(o, [n], source.task)[0] for o, n in zip(alone, lengths)))
        )
        if variant.padding_must_not_matter and not padding_diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: padding changes the traced module's outputs at length {length}: max |diff| = "
                f"{padding_diff:.3g} > {variant.tolerance}; the attention mask did not reach the graph as an input"
            )
        note = "" if variant.padding_must_not_matter else " (activation scales are per batch)"
        report.append(f"{variant.name} length {length:>3}: traced vs eager {diff:.2e}, padded vs alone {padding_diff:.2e}{note}")
    return report



AGREEMENT_ROWS = 64


def agreement_rows(source: Source, golden_rows: list[list[int]]) -> list[list[int]]:
    """What reduced-precision variants are compared with fp32 on: the golden texts and random rows
    of 4 to 64 tokens."""
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    generator = torch.Generator().manual_seed(99)
    lengths = torch.randint(4, min(64, source.max_length) + 1, (AGREEMENT_ROWS,), generator=generator).tolist()
    return golden_rows + random_rows(lengths, vocab, generator)


def top_labels(module: torch.nn.Module, source: Source, rows: list[list[int]], device: str) -> list[torch.Tensor]:
    """Each row's top label (one per token for token classifiers), in batches of 16."""
    return [o.argmax(-1) for start in range(0, len(rows), 16) for o in eager_outputs(module, source, rows[start : start + 16], device)]


def agreement(want: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[int, int]:
    """How many top labels agree, out of how many."""
    return sum(int((a == b).sum()) for a, b in zip(want, got)), sum(a.numel() for a in want)

