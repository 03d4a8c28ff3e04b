"""Tracing each variant, checking it, and writing the model directory whole or not at all."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checks import AGREEMENT_MAX_TOKENS, agreement, check_pairs, check_traced, check_window, invariance, invariance_bound, invariance_sets, sorted_outputs
from .errors import ExportError
from .golden import agreement_texts, eager_outputs, golden
from .rows import encode, pad, random_rows
from .sources import Source
from .variants import Variant, aoti
from .variants.deberta import fits as window_fits, uses_window

FORMAT_VERSION = 1
TASKS = ("sequence-classification", "token-classification")


def example(source: Source, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    # A padded batch at a length the checks don't use: a trace taken without padding could bake
    # "no mask needed" into the graph.
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    rows = random_rows([11, 6], vocab, torch.Generator().manual_seed(0))
    return tuple(t.to(variant.device) for t in pad(rows, source.pad_token_id))


def trace(module: torch.nn.Module, source: Source, variant: Variant) -> torch.jit.ScriptModule:
    with torch.inference_mode():
        return torch.jit.trace(module, example(source, variant), check_trace=False)


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export(source: Source, out: Path, variants: list[Variant], freeze_cuda: bool = True, window_bias: bool = True) -> dict:
    if source.task not in TASKS:
        raise ExportError(f"unsupported task {source.task!r}")
    if source.tokenizer.get_vocab_size() > source.vocab_size:
        raise ExportError(
            f"tokenizer has {source.tokenizer.get_vocab_size()} ids but the model's vocabulary is {source.vocab_size}"
        )
    if not variants:
        raise ExportError("no variants to export")
    eager = source.module.eval().float()
    reference = golden(eager, source)
    warnings = []
    config = getattr(getattr(eager, "model", None), "config", None)
    if window_bias and getattr(config, "model_type", None) == "deberta-v2" and not window_fits(config):
        warnings.append("warning: this DeBERTa config does not fit the windowed attention bias; the original is kept")
    if any(v.device == "cpu" for v in variants) and Variant("cpu", torch.float32) not in variants:
        warnings.append("warning: no cpu-float32: `cpu_dtype: auto`, the default, needs it as its reference; set cpu_dtype by hand")
    # What every variant is compared with fp32 on, and checked for batch invariance with; the
    # server's `cpu_dtype: auto` reads both from golden.json and checks the same.
    rows = [e.ids for e in encode(source.tokenizer, agreement_texts(), min(source.max_length, AGREEMENT_MAX_TOKENS))]
    sets = invariance_sets(rows)
    reference["agreement_ids"] = rows
    reference["invariance"] = sets
    fp32_outputs = sorted_outputs(eager, source, rows, "cpu")

    # Write into a temporary directory beside `out`, then rename: a failed export leaves no half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        report = list(warnings)
        agreements, invariances = {}, {}
        for variant in variants:
            module = variant.prepare(eager, window_bias)
            started = time.monotonic()
            if variant.format == "aoti":
                traced = None
                aoti.compile_package(module, example(source, variant), tmp / variant.file)
                reloaded = aoti.Package(tmp / variant.file, variant.device)
                report.append(f"{variant.name} compiled by AOTInductor in {time.monotonic() - started:.0f} s")
            else:
                traced = trace(module, source, variant)
                if freeze_cuda and variant.device == "cuda":
                    # Weights become constants the JIT can fold: served on an H100, 1.19x the
                    # throughput at 8 clients, the same outputs (BENCHMARKS.md). Not on CPU, where it
                    # did not help. Checked below like any trace.
                    traced = torch.jit.freeze(traced.eval())
                traced.save(str(tmp / variant.file))
                # Check what the host will load: the saved file, read back.
                reloaded = torch.jit.load(str(tmp / variant.file), map_location=variant.device)
            report += check_traced(module, reloaded, source, variant)
            if source.token_types:
                report.append(check_pairs(module, reloaded, source, variant))
            if variant.dtype == torch.float32 and uses_window(module):
                report += check_window(eager, reloaded, source, variant.device)
            outputs = eager_outputs(module, source, reference["input_ids"], variant.device)
            reference["variants"][variant.name] = [o.flatten().tolist() for o in outputs]
            # What the host will serve (the file read back), compared with fp32 and with itself alone.
            outputs = sorted_outputs(reloaded, source, rows, variant.device)
            agreed = agreements[variant.name] = agreement(fp32_outputs, outputs)
            report.append(
                f"{variant.name} top label agrees with fp32 on {agreed['agreeing']}/{agreed['compared']} "
                f"({agreed['agreeing'] / agreed['compared']:.1%}) over {agreed['texts']} texts, max |dp| {agreed['max_abs_diff']:.2e}"
                + ("" if agreed["holds"] else f": under {agreed['min_agreement']:.0%}, so `cpu_dtype: auto` will not choose it")
            )
            bound = invariance_bound(variant.dtype)
            regroup = None if variant.dtype == torch.float32 else outputs
            moved = invariances[variant.name] = invariance(reloaded, source, rows, sets, variant.device, bound, regroup)
            report.append(
                f"{variant.name} batch invariance: a text's probabilities move by {moved['max_abs_diff']:.2e} at most between "
                f"alone and beside {moved['probes'] + moved['neighbours'] - 1} others"
                + (f", or regrouped ({moved['regrouped']} texts)" if moved["regrouped"] else "")
                + f" (bound {moved['bound']:g})"
                + ("" if moved["holds"] else ": NOT batch-invariant, so `cpu_dtype: auto` will not choose it")
            )
            del module, traced, reloaded
        source.tokenizer.save(str(tmp / "tokenizer.json"))
        sha256 = _sha256([tmp / "tokenizer.json"] + [tmp / v.file for v in variants])
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": source.name,
            "description": source.description,
            "task": source.task,
            "labels": source.labels,
            # What turns a row of logits into scores (`batchbox_export.sources.activation`); the
            # SDKs apply it unless a request asks for another.
            "problem_type": source.problem_type,
            "activation": source.activation,
            "max_length": source.max_length,
            "inputs": ["input_ids", "attention_mask"],
            # Whether the model takes sentence pairs, and whether it reads their token types,
            # which travel in the ids: `token + vocab_size * type` (`sources.LogitsOnly`).
            "pairs": source.pairs,
            "token_types": source.token_types,
            "pad_token_id": source.pad_token_id,
            "vocab_size": source.vocab_size,
            "variants": {v.name: v.manifest_entry for v in variants},
            "version": f"{source.name}-{sha256[:12]}",
            "sha256": sha256,
            "torch_version": torch.__version__.split("+")[0],
            "checks": report,
            # Each variant against fp32 on the agreement texts, and how far a text's probabilities
            # move with its neighbours (batchbox_export.checks); what `cpu_dtype: auto` measures too.
            "agreement_with_fp32": agreements,
            "invariance": invariances,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "golden.json").write_text(json.dumps(reference) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        tmp.mkdir()  # TemporaryDirectory wants something to clean up
    return manifest

