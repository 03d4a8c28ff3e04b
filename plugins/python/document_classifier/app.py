"""`POST` documents in (on the tenant's route, e.g. `/api/v1/classify/documents`), a topic for
each of their sentences and for each document out: the pre-processing only a plugin can do. The
host classifies sequences; this plugin splits documents into sentences, normalises them, sends
every sentence of every document to the model in one `infer_texts` call (so they share forward
passes), and aggregates the answers per document.

Request: `{"documents": [...]}` or a bare array. A document is a string, or
`{"text": "...", "id": "..."}` where `id` (optional, any string) is echoed back.

Splitting, by rule (no model: predictable, and cheap next to the model):
1. The text is put in Unicode NFC. A blank line (two line breaks, with only spaces between) ends a
   paragraph, and a paragraph always ends a sentence. Inside a paragraph every run of whitespace
   becomes one space.
2. A sentence ends after `.`, `!`, `?` or `…` (a run of them, then any closing quotes or brackets)
   followed by a space and a word that does not start with a lowercase letter ("approx. five" stays
   one sentence). After a lone `.`, it does not end when the word before (less any opening quotes
   or brackets) is an abbreviation: one of ABBREVIATIONS ("Dr.", "vs."), a single capital letter
   (the initials of "J. R. R. Tolkien") or letters joined by dots ("e.g.", "U.S.", "p.m."; so "in
   the U.S. The next" stays one sentence).
3. Sentences are stripped of spaces at both ends.

So "Dr. Smith met J. R. R. Tolkien at 3.30 p.m. on Monday. Was it late? Yes!\\n\\nNo title"
is four sentences: "Dr. Smith met J. R. R. Tolkien at 3.30 p.m. on Monday.", "Was it late?",
"Yes!" and "No title" (tests/document_plugin.rs checks this).

Response: `labels` (the model's), `sentences` (in document order, then text order: each one's
`document` index, normalised `text`, `label` and `probabilities`), `documents` (input order:
`id` or null, `num_sentences`, `mean_probabilities` (per label, over its sentences),
`mean_label` (the top label of that mean), `label_counts` (per label, how many of its sentences
have it as their top label) and `majority_label` (the most counted; a tie goes to the tied label
with the higher mean probability, then to the first in label order)), and `metadata` as the
sentence classifier's, with `num_documents` and `num_sentences`; its `truncated` indexes
`sentences`.

Errors (the SDK's shapes): 400 `invalid_json`; 400 `invalid_request` naming the item
(`documents[2] is empty`, `documents[1].id must be a string, not a number`); 413
`too_many_documents`, `document_too_long` (characters, before normalisation) and
`too_many_sentences` (over all documents, naming the document that passes the limit), from the
settings `max_documents` (100), `max_document_chars` (100,000) and `max_sentences` (1,000); 405
for other methods. Host refusals (quotas, a full queue) answer as the SDK maps them.
"""

import json
import re
import time
import unicodedata

import wit_world
from batchbox_sdk import (
    Classified, Respond, Settings, argmax, check_count, check_text, error, json_kind, json_response, list_body,
    openapi, require_method, respond, warm,
)
from wit_world.imports import types

SETTINGS = Settings(max_documents=100, max_document_chars=100_000, max_sentences=1000)

# Words that end in "." without ending a sentence, lower-case, without their dot. Not "etc." or
# "Inc.", which end sentences as often as not.
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "fig", "al", "approx"}

PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
TERMINATOR = re.compile(r"([.!?…]+)[\"')\]’”»]* ")
INITIAL_OR_DOTTED = re.compile(r"[A-Z]|[^\W\d_](\.[^\W\d_])+")


class Handler(wit_world.exports.Handler):
    def configure(self, config: str) -> None:
        SETTINGS.configure(config, types.Task.SEQUENCE_CLASSIFICATION)

    def handle(self, request):
        return respond(lambda: classify(request))


class Api(wit_world.exports.Api):
    def describe(self) -> str:
        """The route, its body with the configured limits, and its answers (the module's docs)."""
        operation = openapi.operation(
            "Classify every sentence of each document, and each document",
            "Documents are split into sentences by the rules in the plugin's docs and normalised; every "
            "sentence goes to the model in one call. The answer has each sentence's label and "
            "probabilities, and per document the mean probabilities, label counts and majority label.",
            "Documents",
            "DocumentPrediction",
            "Each sentence's and each document's predictions",
            openapi.classified_errors("too_many_documents, document_too_long, too_many_sentences"),
        )
        text = {"type": "string", "minLength": 1, "maxLength": SETTINGS["max_document_chars"]}
        document = {"oneOf": [
            text,
            {"type": "object", "required": ["text"], "additionalProperties": False,
             "properties": {"text": text, "id": {"type": "string"}}},
        ]}
        documents = {"type": "array", "maxItems": SETTINGS["max_documents"], "items": document}
        numbers, strings = {"type": "array", "items": {"type": "number"}}, {"type": "array", "items": {"type": "string"}}
        sentence = {"type": "object", "properties": {
            "document": {"type": "integer"}, "text": {"type": "string"}, "label": {"type": "string"},
            "probabilities": numbers,
        }}
        summary = {"type": "object", "properties": {
            "id": {"type": ["string", "null"]}, "num_sentences": {"type": "integer"}, "mean_probabilities": numbers,
            "mean_label": {"type": "string"}, "label_counts": {"type": "array", "items": {"type": "integer"}},
            "majority_label": {"type": "string"},
        }}
        answer = {"type": "object", "required": ["labels", "sentences", "documents", "metadata"], "properties": {
            "labels": strings,
            "sentences": {"type": "array", "items": sentence},
            "documents": {"type": "array", "items": summary},
            "metadata": openapi.metadata_schema(),
        }}
        return json.dumps({
            "paths": {"/": {"post": operation}},
            "components": {"schemas": {
                "Documents": {"oneOf": [
                    {"type": "object", "required": ["documents"], "additionalProperties": False,
                     "properties": {"documents": documents}},
                    documents,
                ]},
                "DocumentPrediction": answer,
                "Error": openapi.error_schema(),
            }},
        })


def split_sentences(text: str) -> list:
    """The sentences of `text`, by the rules in the module's docs."""
    sentences = []
    for paragraph in PARAGRAPH_BREAK.split(unicodedata.normalize("NFC", text)):
        paragraph = " ".join(paragraph.split())
        start = 0
        for end in TERMINATOR.finditer(paragraph):
            if ends_sentence(paragraph, start, end):
                sentences.append(paragraph[start : end.end()].strip())
                start = end.end()
        if paragraph[start:].strip():
            sentences.append(paragraph[start:].strip())
    return sentences


def ends_sentence(paragraph: str, start: int, terminator: re.Match) -> bool:
    if paragraph[terminator.end()].islower():
        return False
    if terminator.group(1) != ".":
        return True
    word = paragraph[start : terminator.start()].rsplit(" ", 1)[-1].lstrip("\"'([{“‘«")
    return word.lower() not in ABBREVIATIONS and not INITIAL_OR_DOTTED.fullmatch(word)


def parse_documents(body: bytes) -> list:
    """The body's documents as (id, text) pairs, or the 400/413 that names the first bad item."""

    def bad(message):
        return Respond(error(400, "invalid_request", message))

    items = list_body(body, "documents", of="documents")
    check_count(len(items), "document", SETTINGS["max_documents"])
    documents = []
    for i, item in enumerate(items):
        where, doc_id = f"documents[{i}]", None
        if isinstance(item, dict):
            unknown = [key for key in item if key not in ("text", "id")]
            if unknown:
                raise bad(f'{where}: unknown field `{unknown[0]}`; a document is a string or {{"text", "id"}}')
            if "text" not in item:
                raise bad(f"{where}: missing field `text`")
            doc_id = item.get("id")
            if doc_id is not None and not isinstance(doc_id, str):
                raise bad(f"{where}.id must be a string, not {json_kind(doc_id)}")
            item, where = item["text"], f"{where}.text"
        elif not isinstance(item, str):
            raise bad(f"{where} must be a string or an object, not {json_kind(item)}")
        documents.append((doc_id, check_text(item, where, "document", SETTINGS["max_document_chars"])))
    return documents


def classify(request):
    started = time.perf_counter()
    require_method(request, "POST")
    documents = parse_documents(request.body)

    sentences, owners = [], []  # every sentence of every document, and its document's index
    for i, (_, text) in enumerate(documents):
        split = split_sentences(text)
        if len(sentences) + len(split) > SETTINGS["max_sentences"]:
            message = (
                f"documents[{i}] brings the request to {len(sentences) + len(split)} sentences; "
                f"the limit is {SETTINGS['max_sentences']}"
            )
            raise Respond(error(413, "too_many_sentences", message))
        sentences += split
        owners += [i] * len(split)

    result = Classified(sentences, started)  # one host call for all of them
    labels = result.labels
    per_document = [[] for _ in documents]
    for owner, probabilities in zip(owners, result.probabilities):
        per_document[owner].append(probabilities)
    return json_response(200, {
        "labels": labels,
        "sentences": [
            {"document": owner, "text": text, "label": label, "probabilities": probabilities}
            for owner, text, label, probabilities in zip(owners, sentences, result.predictions, result.probabilities)
        ],
        "documents": [aggregate(doc_id, rows, labels) for (doc_id, _), rows in zip(documents, per_document)],
        "metadata": result.metadata(num_documents=len(documents), num_sentences=len(sentences)),
    })


def aggregate(doc_id, rows: list, labels: list) -> dict:
    """A document's summary from its sentences' probability rows (at least one: a document is
    never empty)."""
    mean = [sum(column) / len(rows) for column in zip(*rows)]
    counts = [0] * len(labels)
    for row in rows:
        counts[argmax(row)] += 1
    # The most counted label; among equals the higher mean, then the first label.
    majority = max(range(len(labels)), key=lambda j: (counts[j], mean[j], -j))
    return {
        "id": doc_id,
        "num_sentences": len(rows),
        "mean_probabilities": mean,
        "mean_label": labels[argmax(mean)],
        "label_counts": counts,
        "majority_label": labels[majority],
    }


# Requests start with the splitting and the aggregation warm (the SDK's docs say why).
warm(lambda: split_sentences("Dr. Smith met J. R. R. Tolkien at 3.30 p.m. on Monday. Was it late? Yes!\n\nNo “title”"))
warm(lambda: aggregate(None, [[0.25, 0.75], [0.5, 0.5]], ["a", "b"]))
