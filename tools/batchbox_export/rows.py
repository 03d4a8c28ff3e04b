"""Token rows: encoding texts, padding rows into a batch, random rows for the checks, and each
sequence's output without its padding."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int):
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: don't change the caller's settings
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer.encode_batch(texts)


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def random_rows(lengths: list[int], vocab: int, generator: torch.Generator) -> list[list[int]]:
    # Skip the start of the vocabulary, where tokenizers keep their special tokens.
    low = min(1000, vocab // 4)
    return [torch.randint(low, vocab, (n,), generator=generator).tolist() for n in lengths]


def rows_of(output: torch.Tensor, lengths: list[int], task: str) -> list[torch.Tensor]:
    """Per-sequence outputs without padding: [labels], or [length, labels] for token tasks."""
    if task == "token-classification":
        return [output[i, :n] for i, n in enumerate(lengths)]
    return [output[i] for i in range(len(lengths))]
