"""`POST /api/v1/predict/sentences` in Python: the Rust sentence-classifier's API, errors and
metadata, on the Python SDK (plugins/python/batchbox_sdk)."""

import json
import time

import wit_world
from batchbox_sdk import SCORE_FIELDS, Classified, Settings, TextList, json_response, openapi, require_method, respond
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
            "The scores of each sentence, in input order (softmax probabilities for a single-label model; "
            "a sigmoid per label for a multi-label or one-label model; the logits for regression; or the "
            "function_to_apply asked for), its prediction, and timing metadata. An empty list gives empty "
            "results.",
            "Sentences",
            "Prediction",
            "The predictions",
            openapi.classified_errors("too_many_sentences, sentence_too_long"),
        )
        sentences = openapi.text_list(
            "sentences", SETTINGS["max_sentences"], SETTINGS["max_sentence_chars"], openapi.score_options()
        )
        schemas = {"Sentences": sentences, "Prediction": openapi.prediction_schema(), "Error": openapi.error_schema()}
        return json.dumps({"paths": {"/": {"post": operation}}, "components": {"schemas": schemas}})


def classify(request):
    started = time.perf_counter()
    require_method(request, "POST")
    sentences, fields = TextList(
        "sentences", "sentence", SETTINGS["max_sentences"], SETTINGS["max_sentence_chars"]
    ).parse_with(request.body, SCORE_FIELDS)
    result = Classified(sentences, started, fields=fields)
    return json_response(200, result.answer(num_sentences=len(sentences)))
