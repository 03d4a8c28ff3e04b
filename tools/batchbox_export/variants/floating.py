"""The floating-point variants: `cpu-float32`, `cpu-bfloat16`, `cuda-float16`, `cuda-float32`.

The eager fp32 model cast and moved. A trace records dtype and device constants (attention-mask
fills, `.to(device)` calls), so each (device, dtype) the host may run is traced from its own cast
and checked on its own.
"""

from __future__ import annotations

import copy

import torch


def cast(eager: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `eager` on `device` in `dtype`. Python's Module.to casts floating tensors only;
    integer buffers (position ids) stay."""
    return copy.deepcopy(eager).to(device, dtype)
