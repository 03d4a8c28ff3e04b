"""The `cpu-int8` variant: int8 linear layers whose activations are scaled row by row.

Each linear layer's weight is stored in int8 with one scale per output channel. At run time each
token's input row gets its own scale (its largest magnitude maps to 127), is rounded to int8,
multiplied by the weight in integers (`torch._int_mm`: int8 x int8 -> int32, exact), and scaled
back; the rest of the model stays in fp32.

Why per row: `torch.ao.quantization.quantize_dynamic`, the earlier int8, computes one activation
scale over the whole `[rows, length, hidden]` input of each call, so a sentence's probabilities
moved by up to 0.17 with the sentences (and the padding) batched beside it. Scaled per row, a
token's integers depend on its own values alone, and integer products are exact. What could still
move them is fp32's rounding where the model reduces over the padded length (attention, pooling):
a few 1e-7, which now and then tips a rounding to int8 the other way and grows through the layers
(up to 5.0e-2 on MiniLM). Where the model allows, the variant computes attention in fp64
(`attention.py`), and then a sentence moved by 3.6e-7 at most with its neighbours; where it does not
(DeBERTa), the export measures and records how far it moves, and `cpu_dtype: auto` does not choose
it past the bound.
"""

from __future__ import annotations

import copy

import torch

# An activation row of zeros still gets a finite scale.
SMALLEST_SCALE = 1e-12


class RowScaledInt8Linear(torch.nn.Module):
    """A `torch.nn.Linear` with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=SMALLEST_SCALE) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # `_int_mm` takes the weight as [in, out].
        self.register_buffer("weight_t", quantized.t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=SMALLEST_SCALE) / 127
        quantized = torch.round(rows / scale).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * scale * self.weight_scale + self.bias
        return y.reshape(x.shape[:-1] + (y.shape[-1],))


def quantize(eager: torch.nn.Module) -> torch.nn.Module:
    """A copy of `eager` (fp32) with every linear layer made a `RowScaledInt8Linear`."""
    module = copy.deepcopy(eager)
    _replace_linears(module)
    return module


def _replace_linears(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, RowScaledInt8Linear(child))
        else:
            _replace_linears(child)
