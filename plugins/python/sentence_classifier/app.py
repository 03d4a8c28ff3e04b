"""`POST /api/v1/predict/sentences` in Python: the Rust sentence-classifier's API, errors and
metadata, on the Python SDK (plugins/python/batchbox_sdk)."""

import json
import time

import wit_world
from batchbox_sdk import Classified, Settings, TextList, json_response, openapi, require_method, respond
from wit_world.imports import types

SETTINGS = Settings(max_sentences=1000, max_sentence_chars=10_000)


class Handler(wit_world.exports.Handler):
    def configure(self, config: str) -> None:
        SETTINGS.configure(config, types.Task.SEQUENCE_CLASSIFICATION)

    def handle(self, request):
        return respond(lambda: classify(request))


class Api(wit_world.exports.Api):
    def describe(self) -> str:
        """The route, its body with the configured limits, and its answers: as the Rust plugin's."""
        operation = openapi.operation(
            "Classify sentences",
            "One row of probabilities (softmax over the labels) per sentence, in input order, the top "
            "label of each, and timing metadata. An empty list gives empty results.",
            "Sentences",
            "Prediction",
            "The predictions",
            openapi.classified_errors("too_many_sentences, sentence_too_long"),
        )
        sentences = openapi.text_list("sentences", SETTINGS["max_sentences"], SETTINGS["max_sentence_chars"])
        schemas = {"Sentences": sentences, "Prediction": openapi.prediction_schema(), "Error": openapi.error_schema()}
        return json.dumps({"paths": {"/": {"post": operation}}, "components": {"schemas": schemas}})


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
