"""`POST /api/v1/predict/sentences` in Python: the Rust sentence-classifier's API, errors and
metadata, on the Python SDK (plugins/python/batchbox_sdk)."""

import time

import wit_world
from batchbox_sdk import (
    Respond, Settings, TextList, argmax, host_call, json_response, ms, require_method, round_ms, softmax,
)
from wit_world.imports import host, types

SETTINGS = Settings(max_sentences=1000, max_sentence_chars=10_000)


class Handler(wit_world.exports.Handler):
    def configure(self, config: str) -> None:
        SETTINGS.configure(config, types.Task.SEQUENCE_CLASSIFICATION)

    def handle(self, request):
        try:
            return classify(request)
        except Respond as answer:
            return answer.response


def classify(request):
    started = time.perf_counter()
    require_method(request, "POST")
    sentences = TextList("sentences", "sentence", SETTINGS["max_sentences"], SETTINGS["max_sentence_chars"]).parse(
        request.body
    )
    info = host.model()

    tokenize_started = time.perf_counter()
    encodings = host_call(host.tokenize, sentences)
    tokenize_ms = ms(tokenize_started)
    ids = [e.ids for e in encodings]
    inference, infer_ms = None, 0.0
    if ids:  # nothing to compute: no call, no model time
        infer_started = time.perf_counter()
        inference = host_call(host.infer, ids)
        infer_ms = ms(infer_started)

    outputs = inference.outputs if inference else []
    probabilities = [softmax(t.data) for t in outputs]
    queue_ms = inference.queue_us / 1e3 if inference else 0.0
    compute_ms = inference.compute_us / 1e3 if inference else 0.0
    total_ms = ms(started)
    plugin_ms = max(total_ms - tokenize_ms - infer_ms, 0.0) + max(infer_ms - queue_ms - compute_ms, 0.0)
    return json_response(200, {
        "probabilities": probabilities,
        "labels": info.labels,
        "predictions": [info.labels[argmax(p)] for p in probabilities],
        "metadata": {
            "processing_time_ms": round_ms(total_ms),
            "total_words": sum(len(s.split()) for s in sentences),
            "total_tokens": sum(len(i) for i in ids),
            "num_sentences": len(sentences),
            "model_version": info.version,
            "truncated": [i for i, e in enumerate(encodings) if e.truncated],
            "forward_passes": inference.forward_passes if inference else 0,
            "batch_ids": list(inference.batch_ids) if inference else [],
            "breakdown_ms": {
                "tokenize": round_ms(tokenize_ms),
                "queue": round_ms(queue_ms),
                "inference": round_ms(compute_ms),
                "plugin": round_ms(plugin_ms),
            },
        },
    })
