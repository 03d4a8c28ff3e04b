"""Scores as the checkpoint means them (issue 24, item 1), judged against transformers'
`text-classification` pipeline on the same checkpoints, through a real `batchbox serve` and the
sentence classifier in Rust, Python and JavaScript.

The models are `make test-models`' tiny DeBERTa-v3 checkpoints (random weights): a single-label
head (softmax), a multi-label one (`problem_type: multi_label_classification`, a sigmoid per label)
and a one-label score (a sigmoid, as a cross-encoder's relevance). The server is the release build
(`make build`), as `make test` leaves it.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import export_model as ex  # noqa: E402  (sets the offline switches before transformers loads)
from batchbox_server import post, serve  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config, pipeline  # noqa: E402

SENTENCES = json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"]
CHECKPOINTS = {
    "single": ROOT / "models/test/checkpoint-best",
    "multi": ROOT / "models/test/checkpoint-multilabel",
    "score": ROOT / "models/test/checkpoint-score",
}
MODELS = {
    "single": ROOT / "models/test/tiny-deberta",
    "multi": ROOT / "models/test/tiny-deberta-multilabel",
    "score": ROOT / "models/test/tiny-deberta-score",
}
PLUGINS = {
    "rust": ROOT / "plugins/target/wasm32-wasip2/release/sentence_classifier.wasm",
    "python": ROOT / "plugins/target/python/sentence_classifier.wasm",
    "js": ROOT / "plugins/target/js/sentence_classifier.wasm",
}
TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "problem_type, num_labels",
    [(None, 3), (None, 1), ("single_label_classification", 3), ("multi_label_classification", 4),
     ("multi_label_classification", 1), ("regression", 1), ("regression", 2)],
)
def test_the_exported_activation_is_the_one_the_pipeline_applies(problem_type, num_labels):
    """The export's rule against the pipeline's own choice, on a real (random) model per config."""
    config = DebertaV2Config(vocab_size=700, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, num_labels=num_labels, problem_type=problem_type)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(
        CHECKPOINTS["single"]), device="cpu")
    text = "The match ended in a draw."
    with torch.inference_mode():
        logits = model(**classify.tokenizer(text, return_tensors="pt")).logits[0].numpy()
    chosen = ex.activation("sequence-classification", problem_type, num_labels)
    expected = {"softmax": np.exp(logits) / np.exp(logits).sum(), "sigmoid": 1 / (1 + np.exp(-logits)), "none": logits}
    got = {row["label"]: row["score"] for row in classify(text, top_k=None)}
    labels = [model.config.id2label[i] for i in range(num_labels)]
    np.testing.assert_allclose([got[label] for label in labels], expected[chosen], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tenants = [
        {"name": f"{language}-{kind}", "wasm": str(wasm), "routes": [f"/{language}/{kind}"], "model": kind}
        for language, wasm in PLUGINS.items() for kind in MODELS
        if language == "rust" or kind == "multi"
    ]
    models = [{"name": kind, "path": str(path), "cpu_dtype": "fp32"} for kind, path in MODELS.items()]
    with serve(tmp_path_factory.mktemp("scores"), models, tenants) as base:
        yield base


@pytest.fixture(scope="module")
def pipelines():
    return {
        kind: pipeline("text-classification", model=str(path), tokenizer=str(path), device="cpu")
        for kind, path in CHECKPOINTS.items()
    }


def reference(classify, function_to_apply=None) -> list[list[dict]]:
    """The pipeline's every label and score per sentence, highest first."""
    kwargs = {"function_to_apply": function_to_apply} if function_to_apply else {}
    return classify(SENTENCES, top_k=None, truncation=True, **kwargs)


def assert_scores_equal(served: list[list[dict]], expected: list[list[dict]], what: str) -> None:
    assert len(served) == len(expected) == len(SENTENCES), what
    for i, (ours, theirs) in enumerate(zip(served, expected)):
        got, want = {r["label"]: r["score"] for r in ours}, {r["label"]: r["score"] for r in theirs}
        assert got.keys() == want.keys(), f"{what}, sentence {i}: labels {list(got)} vs {list(want)}"
        worst = max(abs(got[label] - want[label]) for label in want)
        assert worst <= TOLERANCE, f"{what}, sentence {i}: {ours} vs the pipeline's {theirs}"
        # Sorted as the pipeline sorts them (ties aside, which random logits do not make).
        assert [r["label"] for r in ours] == [r["label"] for r in theirs], f"{what}, sentence {i}"


@pytest.mark.parametrize("kind", ["single", "multi", "score"])
def test_each_model_is_scored_with_its_own_function_as_the_pipeline_scores_it(server, pipelines, kind):
    status, answer = post(server, f"/rust/{kind}", {"sentences": SENTENCES, "top_k": None})
    assert status == 200, answer
    expected = reference(pipelines[kind])
    assert_scores_equal(answer["scores"], expected, f"{kind}, the model's own function")
    # `probabilities` holds the same scores in label order.
    labels = answer["labels"]
    for row, scores in zip(answer["probabilities"], answer["scores"]):
        assert row == [next(s["score"] for s in scores if s["label"] == label) for label in labels]
    if kind == "score":
        # A one-label head keeps its score (it used to be softmax's constant 1.0).
        assert len({round(row[0], 6) for row in answer["probabilities"]}) > 100, answer["probabilities"][:5]


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
def test_function_to_apply_is_honoured_as_the_pipeline_honours_it(server, pipelines, function):
    for kind in ["single", "multi"]:
        status, answer = post(server, f"/rust/{kind}", {"sentences": SENTENCES, "top_k": None,
                                                        "function_to_apply": function})
        assert status == 200, answer
        assert_scores_equal(answer["scores"], reference(pipelines[kind], function), f"{kind}, {function}")
    status, raw = post(server, "/rust/single", {"sentences": SENTENCES, "raw_scores": True})
    status_none, none = post(server, "/rust/single", {"sentences": SENTENCES, "function_to_apply": "none"})
    assert (status, status_none) == (200, 200)
    # The same logits, to fp32's batch invariance (the two requests' passes need not be alike).
    np.testing.assert_allclose(raw["probabilities"], none["probabilities"], rtol=0, atol=TOLERANCE)


def test_top_k_keeps_the_pipelines_highest_labels(server, pipelines):
    status, answer = post(server, "/rust/multi", {"sentences": SENTENCES, "top_k": 2})
    assert status == 200, answer
    expected = pipelines["multi"](SENTENCES, top_k=2, truncation=True)
    assert_scores_equal(answer["scores"], expected, "multi, top_k 2")


def test_a_multi_label_model_predicts_every_label_over_the_threshold(server):
    for threshold in [None, 0.3, 0.9]:
        body = {"sentences": SENTENCES} | ({"threshold": threshold} if threshold is not None else {})
        status, answer = post(server, "/rust/multi", body)
        assert status == 200, answer
        cut = 0.5 if threshold is None else threshold
        for row, predicted in zip(answer["probabilities"], answer["predictions"]):
            over = sorted((i for i, p in enumerate(row) if p > cut), key=lambda i: -row[i])
            assert predicted == [answer["labels"][i] for i in over]
    sizes = {len(p) for p in post(server, "/rust/multi", {"sentences": SENTENCES, "threshold": 0.3})[1]["predictions"]}
    assert len(sizes) > 1, "random logits should give texts different numbers of labels over 0.3"


def test_a_single_label_model_answers_in_the_seeds_shape(server):
    status, answer = post(server, "/rust/single", SENTENCES[:3])
    assert status == 200, answer
    assert set(answer) == {"probabilities", "labels", "predictions", "metadata"}
    assert all(isinstance(p, str) for p in answer["predictions"])
    assert all(abs(sum(row) - 1) < 1e-5 for row in answer["probabilities"])


def test_python_and_javascript_score_as_rust_does(server):
    bodies = [
        {"sentences": SENTENCES, "top_k": None},
        {"sentences": SENTENCES[:20], "function_to_apply": "softmax", "top_k": 3},
        {"sentences": SENTENCES[:20], "raw_scores": True, "threshold": 0.1},
        {"sentences": SENTENCES[:5]},
    ]
    for body in bodies:
        status, rust = post(server, "/rust/multi", body)
        assert status == 200, rust
        for language in ["python", "js"]:
            status, theirs = post(server, f"/{language}/multi", body)
            assert status == 200, (language, theirs)
            assert set(theirs) == set(rust), (language, body)
            assert theirs["predictions"] == rust["predictions"], (language, body)
            np.testing.assert_allclose(theirs["probabilities"], rust["probabilities"], atol=1e-6)
            if "scores" in rust:
                assert [[s["label"] for s in row] for row in theirs["scores"]] == [[s["label"] for s in row] for row in rust["scores"]]


BAD = [
    ({"function_to_apply": "tanh"}, "function_to_apply"),
    ({"function_to_apply": 3}, "function_to_apply"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 6}, "top_k"),
    ({"top_k": "2"}, "top_k"),
    ({"raw_scores": "yes"}, "raw_scores"),
    ({"raw_scores": True, "function_to_apply": "sigmoid"}, "raw_scores"),
    ({"threshold": "high"}, "threshold"),
    ({"temperature": 2}, "temperature"),
]


def test_bad_score_options_get_a_400_naming_the_field_in_every_language(server):
    for language in ["rust", "python", "js"]:
        for extra, field in BAD:
            status, answer = post(server, f"/{language}/multi", {"sentences": SENTENCES[:2], **extra})
            assert status == 400, (language, extra, answer)
            assert answer["error"]["code"] == "invalid_request" and field in answer["error"]["message"], (language, answer)
    # `threshold` means nothing to a single-label model, and says so.
    status, answer = post(server, "/rust/single", {"sentences": SENTENCES[:2], "threshold": 0.5})
    assert status == 400 and "multi-label models only" in answer["error"]["message"], answer
    status, answer = post(server, "/rust/single", {"sentences": SENTENCES[:2], "top_k": 4})
    assert status == 400 and "from 1 to 3" in answer["error"]["message"], answer
    # And the server goes on serving.
    assert post(server, "/rust/multi", {"sentences": SENTENCES[:2]})[0] == 200


def test_v1_models_says_how_each_model_is_scored(server):
    with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as response:
        models = {m["name"]: m for m in json.loads(response.read())["models"]}
    assert (models["multi"]["activation"], models["multi"]["problem_type"]) == ("sigmoid", "multi_label_classification")
    assert (models["single"]["activation"], models["score"]["activation"]) == ("softmax", "sigmoid")
