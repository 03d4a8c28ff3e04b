"""The encoder architectures users bring (issue 24, item 5), each exported as a user would
(`tools/export_model.py checkpoint`, cpu-float32) from a tiny random checkpoint with MiniLM's
tokenizer and no `model_max_length` (tests/fixtures/make_architecture_checkpoints.py), served by
one real `batchbox serve` through the `hf-compat` plugin, and judged against transformers'
`text-classification` pipeline on the same checkpoint: every label's score on the 120-sentence
fixture, and on pairs made from it, within 1e-5."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import export_model  # noqa: E402,F401  (sets the offline switches before transformers loads)
from batchbox_server import RUST_PLUGINS, post, serve  # noqa: E402
from transformers import pipeline  # noqa: E402

SENTENCES = json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"]
PAIRS = [(SENTENCES[i], SENTENCES[-1 - i]) for i in range(20)]
ARCHITECTURES = ["bert", "distilbert", "roberta", "xlm-roberta", "electra", "albert", "deberta", "deberta-v2",
                 "deberta-v3", "modernbert", "mpnet"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hf = str(RUST_PLUGINS / "hf_compat.wasm")
    models = [{"name": a, "path": str(ROOT / f"models/test/arch-{a}"), "cpu_dtype": "fp32"} for a in ARCHITECTURES]
    tenants = [{"name": a, "wasm": hf, "routes": [f"/{a}"], "model": a} for a in ARCHITECTURES]
    with serve(tmp_path_factory.mktemp("architectures"), models, tenants) as base:
        yield base


def same(served, expected, what):
    assert [s["label"] for s in served] == [e["label"] for e in expected], what
    worst = max(abs(s["score"] - e["score"]) for s, e in zip(served, expected))
    assert worst <= TOLERANCE, f"{what}: {served} vs {expected}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_serves_what_the_pipeline_computes_for_texts_and_pairs(server, architecture):
    checkpoint = str(ROOT / f"models/test/architectures/{architecture}")
    classifier = pipeline("text-classification", model=checkpoint, tokenizer=checkpoint, device="cpu")
    manifest = json.loads((ROOT / f"models/test/arch-{architecture}/manifest.json").read_text())
    assert manifest["max_length"] == 512, manifest["max_length"]  # derived from each model's own positions
    status, served = post(server, f"/{architecture}/predict", {"inputs": [[s] for s in SENTENCES]})
    assert status == 200, served
    for i, (got, want) in enumerate(zip(served, classifier(SENTENCES, top_k=None), strict=True)):
        same(got, want, f"{architecture} sentence {i}")
    status, served = post(server, f"/{architecture}/predict", {"inputs": [list(p) for p in PAIRS]})
    assert status == 200, served
    reference = classifier([{"text": a, "text_pair": b} for a, b in PAIRS], top_k=None)
    for i, (got, want) in enumerate(zip(served, reference, strict=True)):
        same(got, want, f"{architecture} pair {i}")
