"""The traced files an export writes: one per device and dtype the host may run. Each kind of
variant is a module: `floating` (fp32, bf16, fp16, cast) and `int8` (int8 linear layers with
activations scaled row by row). Two change the attention of any kind: `deberta` (DeBERTa's
relative-position bias on the window a sequence reaches, and its attention in fp64) and
`attention` (fp64 attention for the models that take an attention backend); fp64 attention makes
the CPU's bf16 and int8 batch-invariant."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ..checks import TOLERANCE
from . import attention, deberta, floating, int8


@dataclass(frozen=True)
class Variant:
    """One traced file: a device kind and a dtype.

    A trace records dtype and device constants (attention-mask fills, `.to(device)` calls), so a
    graph traced in fp32 on the CPU cannot just be cast to fp16 or moved to a GPU afterwards: each
    (device, dtype) the host may use is traced and checked on its own.

    `torch.qint8` means the `int8` kind: int8 linear layers, weights scaled per output channel and
    activations per row (token), CPU only; the rest of the model stays in fp32.
    """

    device: str
    dtype: torch.dtype
    # "torchscript" (a trace, `.pt`) or "aoti" (an AOTInductor package, `.pt2`; `aoti`).
    format: str = "torchscript"

    @property
    def name(self) -> str:
        if self.dtype == torch.qint8:
            base = f"{self.device}-int8"
        else:
            base = f"{self.device}-{str(self.dtype).removeprefix('torch.')}"
        return base + ("-aoti" if self.format == "aoti" else "")

    @property
    def file(self) -> str:
        return f"model-{self.name}.pt" + ("2" if self.format == "aoti" else "")

    @property
    def manifest_entry(self) -> str | dict:
        """How the manifest lists it: a TorchScript file by its name alone, as every export
        before AOTInductor did; a package with its format."""
        return self.file if self.format == "torchscript" else {"file": self.file, "format": self.format}

    @property
    def tolerance(self) -> float:
        # fp32 must match to the 1e-4. Reduced precision is compared relative to the
        # size of the logits: shapes change the summation order, and so the rounding.
        # int8 is compared with its own eager (quantized) module, which runs the same kernels.
        # A row's padded and alone outputs must agree within the same tolerance.
        bound = {torch.float32: TOLERANCE, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.qint8: 3e-2}[self.dtype]
        # An AOTInductor package in reduced precision rounds in other places than its eager module
        # (it fuses ops and keeps fp32 inside a fused kernel), so the two differ by up to both
        # their roundings: 0.042 in bf16 on the tiny test DeBERTa. Its agreement with fp32, which
        # `auto` requires, is the check that matters for it.
        return bound if self.format == "torchscript" or self.dtype == torch.float32 else 2 * bound

    def prepare(self, eager: torch.nn.Module, window_bias: bool = True) -> torch.nn.Module:
        """The eager fp32 model as this variant runs it: quantized, or cast and moved. DeBERTa's
        attention takes its windowed bias (`deberta`) unless `window_bias` is off; bf16 and int8 on
        the CPU compute attention in fp64 where the model lets them, so that padding cannot move
        their answers."""
        if self.dtype == torch.qint8:
            module = int8.quantize(eager)
        else:
            module = floating.cast(eager, self.device, self.dtype)
        if window_bias:
            deberta.use_window(module)
        if (self.device, self.dtype) in (("cpu", torch.bfloat16), ("cpu", torch.qint8)):
            attention.use_fp64_attention(module)
            deberta.use_fp64(module)
        return module

    @staticmethod
    def parse(text: str) -> "Variant":
        base, aoti = (text.removesuffix("-aoti"), True) if text.endswith("-aoti") else (text, False)
        device, _, dtype = base.partition("-")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.qint8}
        if device not in ("cpu", "cuda") or dtype not in dtypes or (device, dtype) == ("cuda", "int8") or (aoti and dtype == "int8"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected cpu|cuda - float32|bfloat16|float16, or cpu-int8; with -aoti for an AOTInductor "
                "package (not int8)"
            )
        return Variant(device, dtypes[dtype], "aoti" if aoti else "torchscript")


def default_variants() -> list[Variant]:
    variants = [Variant("cpu", torch.float32), Variant("cpu", torch.bfloat16), Variant("cpu", torch.qint8)]
    if torch.cuda.is_available():
        variants += [Variant("cuda", torch.float16), Variant("cuda", torch.float32)]
    return variants

