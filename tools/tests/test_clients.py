"""The clients people already have, unchanged, against a real `batchbox serve` (issue 24):
huggingface_hub's `InferenceClient` and, from Node, `@huggingface/inference` through the
`hf-compat` plugin, with the host's `<route>/info` and `<route>/health`, and `tritonclient.http`
through the `kserve-v2` plugin (pinned in tools/requirements.txt and tools/tests/node); scores
judged against transformers' `text-classification` pipeline on the same checkpoint. Pairs,
zero-shot and rerank are test_pairs.py's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import export_model  # noqa: E402,F401  (sets the offline switches before transformers loads)
from batchbox_server import RUST_PLUGINS, get, key_hash, post, serve  # noqa: E402
from huggingface_hub import InferenceClient  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402
from transformers import pipeline  # noqa: E402

SENTENCES = json.loads((ROOT / "tests/fixtures/test_120_sentences.json").read_text())["sentences"]
KEY = "hf-tenant-key"
KSERVE_KEY = "kserve-key"
CHECKPOINTS = {"single": ROOT / "models/test/checkpoint-best", "multi": ROOT / "models/test/checkpoint-multilabel"}
MODELS = {"single": ROOT / "models/test/tiny-deberta", "multi": ROOT / "models/test/tiny-deberta-multilabel"}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hf = str(RUST_PLUGINS / "hf_compat.wasm")
    tenants = [
        {"name": "hf-single", "wasm": hf, "routes": ["/hf/single"], "model": "single"},
        {"name": "hf-multi", "wasm": hf, "routes": ["/hf/multi"], "model": "multi", "keys": [key_hash(KEY)]},
        {"name": "kserve", "wasm": str(RUST_PLUGINS / "kserve_v2.wasm"), "routes": ["/kserve"], "model": "single",
         "keys": [key_hash(KSERVE_KEY)]},
    ]
    models = [{"name": kind, "path": str(path), "cpu_dtype": "fp32"} for kind, path in MODELS.items()]
    with serve(tmp_path_factory.mktemp("clients"), models, tenants) as base:
        yield base


@pytest.fixture(autouse=True)
def online_for_the_client(monkeypatch):
    """The export tools switch huggingface_hub offline (nothing here may reach a hub); the client
    checks that switch before every request, this server's included. Its calls go to 127.0.0.1."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def pipelines():
    return {kind: pipeline("text-classification", model=str(p), tokenizer=str(p), device="cpu") for kind, p in CHECKPOINTS.items()}


def same(served, expected, what):
    """Labels in the same order and scores within TOLERANCE."""
    assert [e.label for e in served] == [e["label"] for e in expected], what
    worst = max(abs(s.score - e["score"]) for s, e in zip(served, expected))
    assert worst <= TOLERANCE, f"{what}: {served} vs {expected}"


def test_inference_client_text_classification_matches_the_pipeline(server, pipelines):
    single = InferenceClient(model=f"{server}/hf/single")
    multi = InferenceClient(model=f"{server}/hf/multi", token=KEY)
    for i, sentence in enumerate(SENTENCES[:40]):
        same(single.text_classification(sentence), pipelines["single"](sentence, top_k=None), f"single {i}")
        # A multi-label model: a sigmoid per label, as the pipeline chooses it, unasked.
        same(multi.text_classification(sentence), pipelines["multi"](sentence, top_k=None), f"multi {i}")
    sentence = SENTENCES[7]
    for function in ["softmax", "sigmoid", "none"]:
        served = multi.text_classification(sentence, function_to_apply=function)
        same(served, pipelines["multi"](sentence, top_k=None, function_to_apply=function), function)
    served = multi.text_classification(sentence, top_k=2)
    assert len(served) == 2
    same(served, pipelines["multi"](sentence, top_k=2), "top_k 2")


def test_endpoint_info_and_health_come_from_the_host_under_the_route(server):
    # The client asks these of "hf-inference" endpoints only, as a TEI or HF endpoint is.
    multi = InferenceClient(model=f"{server}/hf/multi", token=KEY, provider="hf-inference")
    assert multi.health_check()
    info = multi.get_endpoint_info()
    assert info["model_type"]["classifier"]["id2label"] == {"0": "joy", "1": "anger", "2": "fear", "3": "sadness", "4": "surprise"}
    assert (info["max_input_length"], info["activation"], info["tenant"]) == (128, "sigmoid", "hf-multi")
    # /info needs the tenant's key, as its route does; /health does not.
    assert get(server, "/hf/multi/info")[0] == 401
    assert get(server, "/hf/multi/health")[0] == 200
    single = InferenceClient(model=f"{server}/hf/single", provider="hf-inference")
    assert single.get_endpoint_info()["model_id"] == "checkpoint-best"
    assert single.text_classification(SENTENCES[0])[0].label in {"negative", "neutral", "positive"}
    # Not under a route: not found.
    assert get(server, "/nowhere/info")[0] == 404


def test_a_keyed_tenant_refuses_the_client_without_its_key(server):
    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(model=f"{server}/hf/multi").text_classification("hello")
    assert refused.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(model=f"{server}/hf/multi", token="wrong").text_classification("hello")
    assert refused.value.response.status_code == 401


def test_tei_predict_answers_flat_for_one_text_and_nested_for_a_batch(server, pipelines):
    status, one = post(server, "/hf/single/predict", {"inputs": SENTENCES[0]})
    assert status == 200 and isinstance(one[0], dict), one
    assert [r["label"] for r in one] == [r["label"] for r in pipelines["single"](SENTENCES[0], top_k=None)]
    status, batch = post(server, "/hf/single/predict", {"inputs": [[s] for s in SENTENCES[:3]], "raw_scores": True})
    assert status == 200 and len(batch) == 3 and all(isinstance(row, list) for row in batch), batch
    status, batch = post(server, "/hf/single/predict", {"inputs": SENTENCES[:3]})
    assert status == 200 and len(batch) == 3


@pytest.mark.parametrize("route, body, status, names", [
    ("/hf/single", {"inputs": "x", "parameters": {"top_k": 0}}, 400, "top_k"),
    ("/hf/single", {"inputs": "x", "parameters": {"top_k": 4}}, 400, "top_k"),
    ("/hf/single", {"inputs": "x", "parameters": {"function_to_apply": "tanh"}}, 400, "function_to_apply"),
    ("/hf/single", {"inputs": "x", "parameters": {"temperature": 1}}, 400, "temperature"),
    ("/hf/single", {"text": "x"}, 400, "text"),
    ("/hf/single/predict", {"inputs": "x", "truncation_direction": "left"}, 400, "truncation_direction"),
    ("/hf/single/predict", {"inputs": "word " * 400, "truncate": False}, 413, "truncate"),
])
def test_bad_input_is_a_4xx_in_teis_shape_naming_the_field(server, route, body, status, names):
    got, answer = post(server, route, body)
    assert got == status and names in answer["error"] and answer["error_type"], answer
    assert post(server, "/hf/single", {"inputs": "still serving"})[0] == 200


def test_tritonclient_http_infers_with_and_without_binary_data_and_classification(server, pipelines):
    """KServe's Open Inference Protocol through the `kserve-v2` plugin, with Triton's own HTTP client
    and the tenant's key in its `headers`: JSON and binary tensors both ways, the classification
    extension, metadata and health; the scores are the pipeline's."""
    def auth():
        # A new dict per call: the client writes its Inference-Header-Content-Length into the one it is given.
        return {"Authorization": f"Bearer {KSERVE_KEY}"}

    client = triton.InferenceServerClient(url=server.removeprefix("http://") + "/kserve")
    model = "checkpoint-best"
    assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
    assert client.is_model_ready(model, headers=auth())
    metadata = client.get_model_metadata(model, headers=auth())
    assert metadata["inputs"][0]["name"] == "TEXT" and {o["name"] for o in metadata["outputs"]} == {"SCORES", "LOGITS"}
    assert "classification" in client.get_server_metadata(headers=auth())["extensions"]
    texts = SENTENCES[:24]
    reference = pipelines["single"](texts, top_k=None)
    labels = ["negative", "neutral", "positive"]
    want = np.array([[next(r["score"] for r in row if r["label"] == label) for label in labels] for row in reference])
    for binary in (True, False):
        text = triton.InferInput("TEXT", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
        outputs = [triton.InferRequestedOutput("SCORES", binary_data=binary),
                   triton.InferRequestedOutput("LOGITS", binary_data=binary, class_count=2)]
        result = client.infer(model, [text], outputs=outputs, headers=auth())
        scores = result.as_numpy("SCORES")
        assert scores.shape == (len(texts), 3) and np.abs(scores - want).max() <= TOLERANCE, binary
        # The classification extension: "<score>:<index>:<label>", highest first.
        classes = result.as_numpy("LOGITS")
        assert classes.shape == (len(texts), 2)
        for row, expected in zip(classes, reference):
            top = [c.decode() if isinstance(c, bytes) else c for c in row]
            assert [c.split(":", 2)[2] for c in top] == [r["label"] for r in expected[:2]], top
    # No outputs named: all of them, binary (the client asks so).
    result = client.infer(model, [text], headers=auth())
    assert np.abs(result.as_numpy("SCORES") - want).max() <= TOLERANCE
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer(model, [text])
    assert refused.value.status() == "401"
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("another-model", [text], headers=auth())
    assert refused.value.status() == "404" and "checkpoint-best" in refused.value.message()


@pytest.mark.parametrize("header, body, names", [
    (None, {"inputs": [{"name": "WORDS", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, "WORDS"),
    (None, {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}, "shape"),
    (None, {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
    (None, {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "outputs": [{"name": "SCORES", "parameters": {"classification": 4}}]}, "classification"),
    # Binary sizes that do not add up: more declared than sent, and bytes left over.
    ("binary", {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]},
     "binary_data_size"),
    ("extra", {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]},
     "do not add up"),
])
def test_a_bad_v2_request_is_a_400_naming_what_is_wrong(server, header, body, names):
    import urllib.error
    import urllib.request

    head = json.dumps(body).encode()
    data = head + ({"binary": b"\x01\x00\x00\x00x", "extra": b"\x01\x00\x00\x00x" + b"zz"}.get(header, b""))
    headers = {"authorization": f"Bearer {KSERVE_KEY}", "content-type": "application/octet-stream"}
    if header:
        headers["inference-header-content-length"] = str(len(head))
    request = urllib.request.Request(f"{server}/kserve/v2/models/checkpoint-best/infer", data=data, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    answer = json.loads(refused.value.read())
    assert refused.value.code == 400 and names in answer["error"], answer
    assert post(server, "/hf/single", {"inputs": "still serving"})[0] == 200


def node_text_classification(endpoint: str, texts: list[str], token: str | None = None, parameters: dict | None = None):
    """@huggingface/inference's textClassification, run by Node (tools/tests/node)."""
    request = json.dumps({"endpointUrl": endpoint, "token": token, "texts": texts, "parameters": parameters})
    done = subprocess.run(["node", str(ROOT / "tools/tests/node/text_classification.mjs"), request],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_huggingface_inference_js_text_classification_matches_the_pipeline(server, pipelines):
    """The JavaScript client (npm, pinned in tools/tests/node/package-lock.json) from Node: it
    throws on TEI's flat list, so this is what holds hf-compat to the nested one."""
    texts = SENTENCES[:10]
    answer = node_text_classification(f"{server}/hf/multi", texts, token=KEY)
    for text, served in zip(texts, answer["answers"], strict=True):
        expected = pipelines["multi"](text, top_k=None)
        assert [s["label"] for s in served] == [e["label"] for e in expected], text
        assert max(abs(s["score"] - e["score"]) for s, e in zip(served, expected)) <= TOLERANCE
    answer = node_text_classification(f"{server}/hf/single", texts[:2], parameters={"top_k": 1, "function_to_apply": "none"})
    for text, served in zip(texts, answer["answers"]):
        expected = pipelines["single"](text, top_k=1, function_to_apply="none")
        assert len(served) == 1 and served[0]["label"] == expected[0]["label"]
        assert abs(served[0]["score"] - expected[0]["score"]) <= TOLERANCE
    refused = node_text_classification(f"{server}/hf/multi", texts[:1], token="wrong")
    assert refused["status"] == 401, refused
