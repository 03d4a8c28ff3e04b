"""Attention that gives a sequence the same result however much padding shares its pass, for the
reduced-precision variants (bf16, int8) of models whose attention goes through transformers'
attention interface (BERT and MiniLM, RoBERTa, XLM-R, DistilBERT, ELECTRA, ALBERT, ...).

Why: a padded pass reduces over more positions than the sequence alone (the softmax's sum, the
weighted sum of values), and fp32's kernels round those reductions differently with the length,
by a few 1e-7. fp32 itself moves no further, but bf16 and int8 round between layers: now and then
such a difference tips a rounding the other way, and the next layers carry it on. On MiniLM, bf16
moved a text's probabilities by up to 6.3e-3 with its neighbours and per-row int8 by up to 5.0e-2.
Computed in fp64 and rounded once back to the variant's dtype, attention gives the same bits
alone and padded, and so does the rest: bf16 moved 0 and int8 3.6e-7 at most over 447 texts
(BENCHMARKS.md, "Batch invariance, int8 per row and padding").

DeBERTa's attention does not go through the interface; its variants are left as they are, and the
export measures and records how far they move.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "batchbox-fp64"


def _fp64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention (scores, additive mask, softmax, weighted sum) in fp64, with
    the output in the inputs' dtype. Inference only: no dropout, no attention weights returned."""
    dtype = query.dtype
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query.double(), key.double().transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.double()
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value.double()).to(dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _fp64_attention)
# The additive float mask eager attention takes.
AttentionMaskInterface.register(NAME, eager_mask)


def use_fp64_attention(module: torch.nn.Module) -> bool:
    """Switches every transformers model inside `module` that takes an attention backend to fp64
    attention; whether there was one."""
    switched = False
    for model in module.modules():
        if isinstance(model, PreTrainedModel) and getattr(model, "_supports_attention_backend", False):
            model.set_attn_implementation(NAME)
            switched = True
    return switched
