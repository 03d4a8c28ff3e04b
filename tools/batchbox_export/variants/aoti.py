"""AOTInductor packages: the `<device>-<dtype>-aoti` variants, a second format beside TorchScript.

`torch.export` captures the prepared module (windowed, fp64 attention where its TorchScript twin
has it) with both dimensions of both inputs dynamic (`Dim.DYNAMIC`: a named `Dim` with a max
fails on DebertaV2), and `aoti_compile_and_package` compiles it to a `.pt2` package: C++ (or
CUDA) kernels Inductor generated and fused, a shared object the server loads through libtorch
(crates/model-tch/src/aoti.rs). A package runs on the device it was compiled for, with the torch
build that compiled it.

Export specialises sizes 0 and 1 (they become constants), so the graph is captured at 2 rows or
more and 2 tokens or more, and a package is always called with at least 2 of each: `load` pads a
smaller batch up with positions the mask hides and cuts the logits back, as the server does.
Compiling takes about a minute for DeBERTa-v3-base on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch


def compile_package(module: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    """Exports `module` on `example` (input ids and mask, at least 2 x 2) and compiles it to `path`."""
    from torch.export import Dim

    dynamic = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    with torch.inference_mode():
        program = torch.export.export(module, example, dynamic_shapes=(dynamic, dynamic), strict=False)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class Package:
    """A compiled package, loaded, called like the module it was compiled from."""

    def __init__(self, path: Path, device: str):
        self.runner = torch._inductor.aoti_load_package(str(path), device_index=0 if device == "cuda" else -1)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length = ids.shape
        grow = (0, max(0, 2 - length), 0, max(0, 2 - rows))
        logits = self.runner(torch.nn.functional.pad(ids, grow), torch.nn.functional.pad(mask, grow))
        if isinstance(logits, (list, tuple)):
            (logits,) = logits
        logits = logits[:rows]
        return logits[:, :length] if logits.dim() == 3 else logits
