"""Sentence pairs end to end (issue 24): the host's `infer-pairs`, the `hf-compat` plugin's TEI
pairs, the `zero-shot` plugin and the `rerank` plugin, served by a real `batchbox serve` and
judged against transformers on the same checkpoints: the `text-classification` pipeline given
`{"text", "text_pair"}`, eager PyTorch given `token_type_ids` with the tokenizer's own
`longest_first` truncation, and the `zero-shot-classification` pipeline; through the real clients:
huggingface_hub's `InferenceClient.zero_shot_classification` and the `cohere` SDK's v2 `rerank`
(PyPI, pinned in tools/requirements.txt)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import export_model  # noqa: E402,F401  (sets the offline switches before transformers loads)
import cohere  # noqa: E402
import torch  # noqa: E402
from batchbox_server import RUST_PLUGINS, key_hash, post, serve  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline  # noqa: E402

SENTENCES = json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"]
PAIRS = [(SENTENCES[i], SENTENCES[(i + 7) % len(SENTENCES)]) for i in range(len(SENTENCES))]
CHECKPOINTS = {"cross": ROOT / "models/test/checkpoint-cross-encoder", "nli": ROOT / "models/test/checkpoint-nli"}
MODELS = {"cross": ROOT / "models/test/tiny-cross-encoder", "nli": ROOT / "models/test/tiny-deberta-nli",
          "topics": ROOT / "models/minilm-topics"}
LABELS = ["sports", "politics", "business", "technology", "science", "health", "entertainment"]
KEY = "zero-shot-key"
RERANK_KEY = "rerank-key"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hf, zero_shot, rerank = (str(RUST_PLUGINS / f"{name}.wasm") for name in ("hf_compat", "zero_shot", "rerank"))
    tenants = [
        {"name": "tei-cross", "wasm": hf, "routes": ["/tei/cross"], "model": "cross"},
        {"name": "tei-nli", "wasm": hf, "routes": ["/tei/nli"], "model": "nli"},
        {"name": "tei-topics", "wasm": hf, "routes": ["/tei/topics"], "model": "topics"},
        {"name": "zero-shot", "wasm": zero_shot, "routes": ["/api/v1/zero-shot"], "model": "nli",
         "keys": [key_hash(KEY)], "config": {"max_candidate_labels": 8}},
        {"name": "rerank", "wasm": rerank, "routes": ["/rr"], "model": "cross", "keys": [key_hash(RERANK_KEY)]},
        # Only for the OpenAPI document below: test_clients.py calls it.
        {"name": "kserve", "wasm": str(RUST_PLUGINS / "kserve_v2.wasm"), "routes": ["/kserve"], "model": "cross"},
    ]
    models = [{"name": kind, "path": str(path), "cpu_dtype": "fp32"} for kind, path in MODELS.items()]
    with serve(tmp_path_factory.mktemp("pairs"), models, tenants) as base:
        yield base


@pytest.fixture(autouse=True)
def online_for_the_client(monkeypatch):
    """The export tools switch huggingface_hub offline; the client checks that switch before every
    request, this server's included. Its calls go to 127.0.0.1."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def classifier(kind: str):
    path = str(CHECKPOINTS[kind])
    return pipeline("text-classification", model=path, tokenizer=path, device="cpu")


def test_tei_pairs_match_the_text_classification_pipeline_given_text_pairs(server):
    for kind in CHECKPOINTS:
        # Cut `longest_first` at the model's limit, as TEI cuts (some pairs pass the NLI model's 128 tokens).
        reference = classifier(kind)([{"text": a, "text_pair": b} for a, b in PAIRS], top_k=None, truncation="longest_first")
        status, served = post(server, f"/tei/{kind}/predict", {"inputs": [list(pair) for pair in PAIRS]})
        assert status == 200, served
        for i, (got, want) in enumerate(zip(served, reference, strict=True)):
            assert [g["label"] for g in got] == [w["label"] for w in want], f"{kind} pair {i}"
            worst = max(abs(g["score"] - w["score"]) for g, w in zip(got, want))
            assert worst <= TOLERANCE, f"{kind} pair {i}: {got} vs {want}"
    # One pair alone is TEI's flat answer; a batch may mix pairs with single texts, in order.
    status, one = post(server, "/tei/cross/predict", {"inputs": list(PAIRS[3])})
    assert status == 200 and one == served_pair(server, PAIRS[3])
    status, mixed = post(server, "/tei/cross/predict", {"inputs": [list(PAIRS[3]), SENTENCES[5], [SENTENCES[6]]]})
    assert status == 200 and mixed[0] == one
    # (Two bare strings would be one pair: TEI's rule. A batch of single texts lists each alone.)
    status, singles = post(server, "/tei/cross/predict", {"inputs": [[SENTENCES[5]], [SENTENCES[6]]]})
    assert status == 200 and mixed[1:] == singles


def served_pair(server, pair):
    return post(server, "/tei/cross/predict", {"inputs": [list(pair)]})[1][0]


def test_pairs_equal_eager_pytorch_with_token_types_at_lengths_5_to_512_and_the_longer_member_cut(server):
    """The cross-encoder reads token types (BERT, `type_vocab_size: 2`): each pair's raw logit
    equals the eager model given the tokenizer's `input_ids` and `token_type_ids`, cut
    `longest_first` at 512, from the shortest pair to pairs far past the limit on either side."""
    path = str(CHECKPOINTS["cross"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    words = " ".join(SENTENCES).split()
    sizes = [(1, 1), (2, 5), (30, 3), (100, 150), (250, 250), (260, 240), (600, 20), (20, 600), (400, 400)]
    pairs = [(" ".join(words[:a]), " ".join(words[-b:])) for a, b in sizes]
    encoded = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=512,
                        padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    assert min(lengths) <= 8 and max(lengths) == 512 and lengths.count(512) >= 4, lengths
    with torch.inference_mode():
        want = model(**encoded).logits[:, 0].tolist()
        untyped = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[:, 0].tolist()
    status, served = post(server, "/tei/cross/predict", {"inputs": [list(p) for p in pairs], "raw_scores": True})
    assert status == 200, served
    got = [row[0]["score"] for row in served]
    for length, g, w in zip(lengths, got, want):
        assert abs(g - w) <= TOLERANCE * max(1.0, abs(w)), f"length {length}: served {g}, eager {w}"
    # The types matter to this model, so the comparison above could tell them missing.
    assert max(abs(u - w) for u, w in zip(untyped, want)) > 0.01
    # `truncate: false` refuses a pair past the limit instead of cutting it.
    status, refused = post(server, "/tei/cross/predict", {"inputs": [list(pairs[-1])], "truncate": False})
    assert status == 413 and "inputs[0]" in refused["error"], refused


def zero_shot_reference(texts, labels, multi_label, template="This example is {}."):
    path = str(CHECKPOINTS["nli"])
    zero_shot = pipeline("zero-shot-classification", model=path, tokenizer=path, device="cpu")
    answers = zero_shot(texts, candidate_labels=labels, multi_label=multi_label, hypothesis_template=template)
    return [dict(zip(a["labels"], a["scores"])) for a in answers]


def test_zero_shot_matches_the_pipeline_single_and_multi_label_in_batched_passes(server):
    auth = {"authorization": f"Bearer {KEY}"}
    long = " ".join(SENTENCES[:20])  # past the NLI model's 128 tokens: the text is cut, never the hypothesis
    texts = SENTENCES + [long]
    for multi_label in (False, True):
        want = zero_shot_reference(texts, LABELS, multi_label)
        status, served = post(server, "/api/v1/zero-shot", {
            "inputs": texts, "parameters": {"candidate_labels": LABELS, "multi_label": multi_label}}, auth)
        assert status == 200, served
        for i, (got, expected) in enumerate(zip(served, want, strict=True)):
            assert sorted(expected, key=expected.get, reverse=True) == [g["label"] for g in got], f"text {i}"
            worst = max(abs(g["score"] - expected[g["label"]]) for g in got)
            assert worst <= TOLERANCE, f"multi_label={multi_label} text {i}: {got} vs {expected}"
    # A custom template and a single label (scored on its own, as the pipeline does).
    template = "The topic of this text is {}."
    want = zero_shot_reference(SENTENCES[:3], ["science"], False, template)
    status, served = post(server, "/api/v1/zero-shot", {"inputs": SENTENCES[:3], "parameters": {
        "candidate_labels": "science", "hypothesis_template": template}}, auth)
    assert status == 200 and all(abs(s[0]["score"] - w["science"]) <= TOLERANCE for s, w in zip(served, want))


def test_inference_client_zero_shot_classification_works_with_its_token(server):
    client = InferenceClient(model=f"{server}/api/v1/zero-shot", token=KEY)
    for multi_label in (False, True):
        want = zero_shot_reference(SENTENCES[:5], LABELS, multi_label)
        for sentence, expected in zip(SENTENCES[:5], want):
            got = client.zero_shot_classification(sentence, LABELS, multi_label=multi_label)
            assert [g.label for g in got] == sorted(expected, key=expected.get, reverse=True)
            assert max(abs(g.score - expected[g.label]) for g in got) <= TOLERANCE
    status, _ = post(server, "/api/v1/zero-shot", {"inputs": "x", "parameters": {"candidate_labels": ["a"]}})
    assert status == 401


def test_cohere_sdk_rerank_and_tei_rerank_rank_by_the_pipelines_relevance(server):
    query, documents = SENTENCES[0], SENTENCES[1:41]
    reference = classifier("cross")([{"text": query, "text_pair": d} for d in documents], top_k=None, truncation="longest_first")
    want = [r[0]["score"] for r in reference]  # the one label's sigmoid, as the pipeline takes it
    order = sorted(range(len(documents)), key=lambda i: want[i], reverse=True)
    co = cohere.ClientV2(api_key=RERANK_KEY, base_url=f"{server}/rr")
    answer = co.rerank(model="tiny-cross-encoder", query=query, documents=documents, top_n=5)
    assert [r.index for r in answer.results] == order[:5]
    assert max(abs(r.relevance_score - want[r.index]) for r in answer.results) <= TOLERANCE
    assert len(co.rerank(model="any", query=query, documents=documents).results) == len(documents)
    with pytest.raises(cohere.core.api_error.ApiError) as refused:
        cohere.ClientV2(api_key="wrong", base_url=f"{server}/rr").rerank(model="m", query=query, documents=documents)
    assert refused.value.status_code == 401
    # TEI's shape: every text, raw logits on request, the text beside its index on request.
    auth = {"authorization": f"Bearer {RERANK_KEY}"}
    status, tei = post(server, "/rr/rerank", {"query": query, "texts": documents, "return_text": True}, auth)
    assert status == 200 and [r["index"] for r in tei] == order and tei[0]["text"] == documents[order[0]]
    assert max(abs(r["score"] - want[r["index"]]) for r in tei) <= TOLERANCE
    status, raw = post(server, "/rr/rerank", {"query": query, "texts": documents[:3], "raw_scores": True}, auth)
    assert status == 200 and all(abs(1 / (1 + math.exp(-r["score"])) - want[r["index"]]) <= TOLERANCE for r in raw)


@pytest.mark.parametrize(
    "route, body, status, named",
    [
        # A model that takes no pairs (the default topic model: an embedding head).
        ("/tei/topics/predict", {"inputs": ["a question", "a passage"]}, 400, "pairs"),
        ("/tei/cross/predict", {"inputs": [["a", 3]]}, 400, "inputs[0][1]"),
        ("/tei/cross/predict", {"inputs": [["a", ""]]}, 400, "inputs[0][1]"),
        ("/tei/cross", {"inputs": ["a", "b"], "parameters": {"top_k": 0}}, 400, "top_k"),
        ("/api/v1/zero-shot", {"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "no slot"}},
         400, "hypothesis_template"),
        ("/api/v1/zero-shot", {"inputs": "x", "parameters": {"candidate_labels": [str(i) for i in range(9)]}}, 413,
         "candidate_label"),
        ("/api/v1/zero-shot", {"inputs": "x", "parameters": {"candidate_labels": []}}, 400, "candidate_labels"),
        ("/api/v1/zero-shot", {"inputs": "x"}, 400, "candidate_labels"),
        ("/api/v1/zero-shot", {"inputs": [], "parameters": {"candidate_labels": ["a"]}}, 400, "inputs"),
        ("/api/v1/zero-shot", {"inputs": "x", "parameters": {"candidate_labels": ["a"], "multi_label": "yes"}}, 400,
         "multi_label"),
        ("/rr/v2/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
        ("/rr/v2/rerank", {"query": "q", "documents": []}, 400, "documents"),
        ("/rr/v2/rerank", {"query": "", "documents": ["d"]}, 400, "query"),
        ("/rr/rerank", {"query": "q", "texts": ["d", 4]}, 400, "texts[1]"),
    ],
)
def test_bad_pair_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, route, body, status, named):
    key = KEY if "zero-shot" in route else RERANK_KEY
    headers = {"authorization": f"Bearer {key}"} if route.startswith(("/api", "/rr")) else {}
    got, answer = post(server, route, body, headers)
    assert got == status and named in json.dumps(answer), answer
    assert post(server, "/tei/cross/predict", {"inputs": list(PAIRS[0])})[0] == 200


def test_the_protocol_plugins_describe_their_routes_in_a_valid_openapi_document(server):
    from openapi_spec_validator import validate

    from batchbox_server import get

    status, document = get(server, "/openapi.json")
    assert status == 200
    validate(document)
    paths = document["paths"]
    for path in ["/tei/cross", "/tei/cross/predict", "/api/v1/zero-shot", "/rr/rerank", "/rr/v2/rerank",
                 "/kserve/v2/models/{model}/infer"]:
        assert "post" in paths[path], path


def test_the_example_pair_config_passes_check_config():
    import subprocess

    from batchbox_server import BINARY

    done = subprocess.run([str(BINARY), "--config", str(ROOT / "examples/pairs.yaml"), "check-config"],
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "tenant zero-shot" in output and "tenant rerank" in output, output
