"""What an export checks before it writes anything, and what it measures and records.

- Each traced file against the eager model on padded batches (refused past its tolerance, relative
  to the largest logit when that is over 1), and each padded row against the same row alone
  (refused: the attention mask did not reach the graph, or the model ignores it; the message
  says which, with the eager model's own figure).
- Agreement with fp32 on the agreement texts (at least 256, run as the server groups them): top
  labels must agree on at least 99%; the largest difference in probability is reported beside.
- Batch invariance: a sentence's probabilities must not move with the sentences batched beside it
  by more than 1e-5 (fp32) or 1e-3 (the others): probes alone and beside neighbours, and every
  agreement text regrouped into other passes (fp32, the reference, with the probes alone).

A variant outside the agreement or invariance bounds is still written (it can be chosen by name,
with a warning); the manifest records both figures and `cpu_dtype: auto` does not choose it.
"""

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



def relative_diff(want: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """The largest |want - got| relative to the logits' size (absolute below 1), and that size: a
    head with logits near 780 rounds at 1e-4 in fp32 whatever the trace does."""
    scale = max(1.0, want.abs().max().item())
    return (want - got).abs().max().item() / scale, scale


def said(diff: float, scale: float) -> str:
    """A relative difference as the refusals report it, with its absolute size."""
    return f"max |diff| = {diff * scale:.3g}, {diff:.3g} relative to the largest logit {scale:.3g}"


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
        diff, scale = relative_diff(want, got)
        if not diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: traced module differs from the eager model at length {length}: "
                f"{said(diff, scale)}, > {variant.tolerance} (shapes {list(want.shape)}, {list(got.shape)})"
            )

        def moved(padded, alone):
            rows_alone = (rows_of(o, [n], source.task)[0] for o, n in zip(alone, lengths))
            return max((a - b).abs().max().item() for a, b in zip(rows_of(padded, lengths, source.task), rows_alone))

        padding_diff = moved(got, alone) / scale
        if not padding_diff <= variant.tolerance:
            # Only to say why: does the eager model itself move as much?
            with torch.inference_mode():
                eager_alone = [eager(*[t.to(variant.device) for t in pad([row], source.pad_token_id)]).float() for row in rows]
            eager_moved = moved(want, eager_alone)
            cause = (
                f"the eager model moves as much ({eager_moved:.3g}): it does not honour the attention mask"
                if eager_moved / scale > variant.tolerance
                else f"the eager model moves by {eager_moved:.3g} only, so the attention mask did not reach the graph as an input"
            )
            raise ExportError(
                f"{variant.name}: padding changes the traced module's outputs at length {length}: "
                f"{said(padding_diff, scale)}, > {variant.tolerance}; {cause}"
            )
        report.append(f"{variant.name} length {length:>3}: traced vs eager {diff:.2e}, padded vs alone {padding_diff:.2e}")
    return report


PAIR_CHECK_LENGTHS = (3, 17, 64, 512)


def check_pairs(module: torch.nn.Module, traced: torch.nn.Module, source: Source, variant: Variant) -> str:
    """For a model with token types: the traced module, given pairs' types inside the ids
    (`sources.LogitsOnly`), against the eager model given `token_type_ids` as its own input, on
    padded batches of pairs split at different points. Refused past the variant's tolerance; the
    report says how far the types move the logits, so that a graph that lost them would show."""
    generator = torch.Generator().manual_seed(2468)
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    worst, moved = 0.0, 0.0
    for length in sorted({min(n, source.max_length) for n in PAIR_CHECK_LENGTHS}):
        lengths = [length, max(2, length // 2), max(2, length // 3)]
        rows = random_rows(lengths, vocab, generator)
        ids, mask = pad(rows, source.pad_token_id)
        # The second member starts somewhere inside each row; padding keeps type 0.
        types = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            types[i, torch.randint(1, n, (1,), generator=generator).item() : n] = 1
        with torch.inference_mode():
            on = lambda t: t.to(variant.device)  # noqa: E731
            want = module.model(input_ids=on(ids), attention_mask=on(mask), token_type_ids=on(types)).logits.float()
            untyped = module.model(input_ids=on(ids), attention_mask=on(mask)).logits.float()
            got = traced(on(ids + types * source.vocab_size), on(mask)).float()
        diff, scale = relative_diff(want, got)
        if not diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: sentence pairs: the traced module differs from the eager model given token_type_ids at "
                f"length {length}: {said(diff, scale)}, > {variant.tolerance}"
            )
        worst, moved = max(worst, diff), max(moved, (want - untyped).abs().max().item())
    return (
        f"{variant.name} sentence pairs: traced (types in the ids) vs eager (token_type_ids) {worst:.2e} at lengths "
        f"{', '.join(str(min(n, source.max_length)) for n in PAIR_CHECK_LENGTHS)}; the types move the logits by up to {moved:.3g}"
    )


# Lengths that cross the relative-position buckets' edges (DeBERTa-v3: 256 buckets, 512 positions).
WINDOW_CHECK_LENGTHS = (1, 2, 3, 17, 64, 255, 256, 257, 300, 511, 512)


def check_window(original: torch.nn.Module, traced: torch.nn.Module, source: Source, device: str = "cpu") -> list[str]:
    """The windowed attention bias (variants/deberta.py), traced in fp32 on `device`, against the
    *original* eager model on the CPU at lengths that cross the bucket edges: equal within fp32's
    1e-4, or refused."""
    generator = torch.Generator().manual_seed(4321)
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    worst = 0.0
    for length in sorted({min(n, source.max_length) for n in WINDOW_CHECK_LENGTHS}):
        rows = random_rows([length, max(1, length // 2)], vocab, generator)
        batch = pad(rows, source.pad_token_id)
        with torch.inference_mode():
            windowed = traced(*(t.to(device) for t in batch)).float().cpu()
            diff = (original(*batch).float() - windowed).abs().max().item()
        if not diff <= TOLERANCE:
            raise ExportError(
                f"the windowed attention bias differs from the original model at length {length}: max |diff| = "
                f"{diff:.3g} > {TOLERANCE}; export with --no-window-bias to keep the original"
            )
        worst = max(worst, diff)
    return [f"windowed attention bias ({device}) vs the original model at lengths {WINDOW_CHECK_LENGTHS[0]}-"
            f"{min(WINDOW_CHECK_LENGTHS[-1], source.max_length)}: max |diff| {worst:.2e}"]


# The bounds a served variant is held to (README, "Precision on CPU"); the server's
# `cpu_dtype: auto` holds the same (crates/model/src/checks.rs).
MIN_AGREEMENT = 0.99
MIN_AGREEMENT_TEXTS = 256
INVARIANCE_BOUND_FP32 = 1e-5
INVARIANCE_BOUND = 1e-3
# Agreement texts are truncated to this: classifiers mostly see sentences, and the server runs
# every check at each start, where a pass of 512-token rows costs more than it tells.
AGREEMENT_MAX_TOKENS = 128
# Rows per pass when texts run as the server groups them.
PASS_ROWS = 32
# The invariance check's texts: probes of up to 64 tokens, neighbours of up to 128 (so the shared
# pass pads each probe), spread over lengths.
PROBES, PROBE_MAX_TOKENS = 12, 64
NEIGHBOURS, NEIGHBOUR_MAX_TOKENS = 20, 128


def invariance_bound(dtype: torch.dtype) -> float:
    """How far a row's probabilities may move with its neighbours: fp32's own rounding, or 1e-3."""
    return INVARIANCE_BOUND_FP32 if dtype == torch.float32 else INVARIANCE_BOUND


def probabilities(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax over the labels (per token for token classifiers), in fp32."""
    return [torch.softmax(o.float(), dim=-1) for o in outputs]


def largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a - b|; infinite if either holds a NaN, so that a variant whose outputs
    overflow cannot pass a check (the server's checks count NaN the same way)."""
    gap = (a - b).abs()
    return float("inf") if bool(gap.isnan().any()) else gap.max().item()


def sorted_outputs(module: torch.nn.Module, source: Source, rows: list[list[int]], device: str) -> list[torch.Tensor]:
    """Each row's output when the rows run as the server groups them: length-sorted passes of up to
    `PASS_ROWS` rows. In the rows' order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for start in range(0, len(order), PASS_ROWS):
        chunk = order[start : start + PASS_ROWS]
        for i, output in zip(chunk, eager_outputs(module, source, [rows[i] for i in chunk], device)):
            outputs[i] = output
    return outputs


def agreement(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict:
    """How a variant's outputs compare with fp32's on the same texts: top labels agreeing, out of
    how many (one per token for token classifiers), and the largest difference in probability."""
    want, got = probabilities(reference), probabilities(outputs)
    agreeing = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(want, got))
    compared = sum(a.argmax(-1).numel() for a in want)
    return {
        "texts": len(want),
        "agreeing": agreeing,
        "compared": compared,
        "max_abs_diff": max(largest_gap(a, b) for a, b in zip(want, got)),
        "min_agreement": MIN_AGREEMENT,
        "holds": len(want) >= MIN_AGREEMENT_TEXTS and agreeing >= MIN_AGREEMENT * compared,
    }


def invariance_sets(rows: list[list[int]]) -> dict:
    """Which of `rows` the invariance check runs alone (probes) and beside them (neighbours),
    by index; written to golden.json so the server checks the same."""
    def spread(indices: list[int], count: int) -> list[int]:
        indices = sorted(indices, key=lambda i: (len(rows[i]), i))
        if len(indices) <= count:
            return indices
        return sorted({indices[round(k * (len(indices) - 1) / (count - 1))] for k in range(count)})

    probes = spread([i for i, r in enumerate(rows) if len(r) <= PROBE_MAX_TOKENS], PROBES)
    rest = [i for i, r in enumerate(rows) if len(r) <= NEIGHBOUR_MAX_TOKENS and i not in probes]
    return {"probes": probes, "neighbours": spread(rest, NEIGHBOURS)}


def invariance(
    module: torch.nn.Module, source: Source, rows: list[list[int]], sets: dict, device: str, bound: float,
    sorted_rows: list[torch.Tensor] | None = None,
) -> dict:
    """How far a probe's probabilities move between running alone and running in one padded pass
    with the other probes and the neighbours (texts of other lengths); and, given every row's
    output in sorted passes (`sorted_outputs`), how far any row's move when the pass boundaries
    shift by half a pass (other neighbours, other padding). The server checks the same
    (crates/model/src/checks.rs); fp32, the reference, with the probes alone."""
    probes = [rows[i] for i in sets["probes"]]
    neighbours = [rows[i] for i in sets["neighbours"]]
    alone = [eager_outputs(module, source, [row], device)[0] for row in probes]
    together = eager_outputs(module, source, probes + neighbours, device)[: len(probes)]
    moved = max(largest_gap(a, b) for a, b in zip(probabilities(alone), probabilities(together)))
    regrouped = 0
    if sorted_rows is not None:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        passes = [order[: PASS_ROWS // 2]] + [order[s : s + PASS_ROWS] for s in range(PASS_ROWS // 2, len(order), PASS_ROWS)]
        for chunk in filter(None, passes):
            outputs = eager_outputs(module, source, [rows[i] for i in chunk], device)
            for i, (a, b) in zip(chunk, zip(probabilities(outputs), probabilities([sorted_rows[i] for i in chunk]))):
                moved = max(moved, largest_gap(a, b))
        regrouped = len(rows)
    return {
        "probes": len(probes), "neighbours": len(neighbours), "regrouped": regrouped,
        "max_abs_diff": moved, "bound": bound, "holds": moved <= bound,
    }
