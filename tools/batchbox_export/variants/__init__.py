"""The traced files an export writes: one per device and dtype the host may run."""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch

from .checks import TOLERANCE


@dataclass(frozen=True)
class Variant:
    """One traced file: a device kind and a dtype.

    A trace records dtype and device constants (attention-mask fills, `.to(device)` calls), so a
    graph traced in fp32 on the CPU cannot just be cast to fp16 or moved to a GPU afterwards: each
    (device, dtype) the host may use is traced and checked on its own.

    `torch.qint8` means dynamic int8 quantization of the linear layers (weights stored in int8,
    activations quantized per batch), CPU only: the rest of the model stays in fp32.
    """

    device: str
    dtype: torch.dtype

    @property
    def name(self) -> str:
        if self.dtype == torch.qint8:
            return f"{self.device}-int8"
        return f"{self.device}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def file(self) -> str:
        return f"model-{self.name}.pt"

    @property
    def tolerance(self) -> float:
        # fp32 must match to the 1e-4. Reduced precision is compared relative to the
        # size of the logits: shapes change the summation order, and so the rounding.
        # int8 is compared with its own eager (quantized) module, which runs the same kernels.
        return {torch.float32: TOLERANCE, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.qint8: 3e-2}[self.dtype]

    @property
    def padding_must_not_matter(self) -> bool:
        """Whether a row's output must stay the same when other rows share its batch.

        Not for int8: dynamic quantization scales activations per batch (per tensor), so the
        rows beside a sequence change its rounding (on MiniLM by up to a tenth of the logits'
        range). That is the variant's nature, not a lost attention mask, so its figure is reported
        only; the mask is what the exact check of the fp32 variant, always exported beside it,
        proves.
        """
        return self.dtype != torch.qint8

    def prepare(self, eager: torch.nn.Module) -> torch.nn.Module:
        """The eager fp32 model as this variant runs it: quantized, or cast and moved.

        Python's Module.to casts floating tensors only; integer buffers (position ids) stay.
        """
        module = copy.deepcopy(eager)
        if self.dtype == torch.qint8:
            # Per-channel weight scales: per-tensor ones moved MiniLM's top label on 7 of the 120
            # fixture sentences, per-channel on none, at the same speed.
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        return module.to(self.device, self.dtype)

    @staticmethod
    def parse(text: str) -> "Variant":
        device, _, dtype = text.partition("-")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.qint8}
        if device not in ("cpu", "cuda") or dtype not in dtypes or (device, dtype) == ("cuda", "int8"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected cpu|cuda - float32|bfloat16|float16, or cpu-int8")
        return Variant(device, dtypes[dtype])


def default_variants() -> list[Variant]:
    variants = [Variant("cpu", torch.float32), Variant("cpu", torch.bfloat16), Variant("cpu", torch.qint8)]
    if torch.cuda.is_available():
        variants += [Variant("cuda", torch.float16), Variant("cuda", torch.float32)]
    return variants

