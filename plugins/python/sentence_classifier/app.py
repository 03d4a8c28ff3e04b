"""`POST /api/v1/predict/sentences` in Python: the Rust sentence-classifier's API, errors and
metadata, on the Python SDK (plugins/python/batchbox_sdk)."""

import time

import wit_world
from batchbox_sdk import Classified, Settings, TextList, json_response, require_method, respond
from wit_world.imports import types

SETTINGS = Settings(max_sentences=1000, max_sentence_chars=10_000)


class Handler(wit_world.exports.Handler):
    def configure(self, config: str) -> None:
        SETTINGS.configure(config, types.Task.SEQUENCE_CLASSIFICATION)

    def handle(self, request):
        return respond(lambda: classify(request))


def classify(request):
    started = time.perf_counter()
    require_method(request, "POST")
    sentences = TextList("sentences", "sentence", SETTINGS["max_sentences"], SETTINGS["max_sentence_chars"]).parse(
        request.body
    )
    result = Classified(sentences, started)
    return json_response(200, {
        "probabilities": result.probabilities,
        "labels": result.labels,
        "predictions": result.predictions,
        "metadata": result.metadata(num_sentences=len(sentences)),
    })
