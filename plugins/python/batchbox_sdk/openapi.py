"""Helpers for `describe`: the pieces of an OpenAPI 3.1 fragment every plugin repeats (see the
WIT's `api`), as in the Rust SDK's `openapi` module."""


def error_schema() -> dict:
    """The error body every SDK writes, `{"error": {"code", "message", "quota"?}}`, to put in the
    fragment's `components.schemas` as `Error` (the host renames it per tenant)."""
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "quota": {"type": "string"},
                },
            }
        },
    }


def schema(name: str) -> dict:
    """`{"$ref": "#/components/schemas/<name>"}`."""
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(description: str) -> dict:
    """A response whose body is that `Error`."""
    return {"description": description, "content": {"application/json": {"schema": schema("Error")}}}


def text_list(field: str, max_items: int, max_chars: int, optional: dict | None = None) -> dict:
    """The usual body of a text model (`TextList`): `{"<field>": [...]}` or a bare array of
    non-empty strings, with its limits; the object form also takes the `optional` properties (e.g.
    `score_options()`)."""
    items = {"type": "array", "maxItems": max_items, "items": {"type": "string", "minLength": 1, "maxLength": max_chars}}
    properties = {field: items, **(optional or {})}
    return {
        "oneOf": [
            {"type": "object", "required": [field], "additionalProperties": False, "properties": properties},
            items,
        ]
    }


def score_options() -> dict:
    """The request fields of `ScoreOptions`, as properties for `text_list`."""
    return {
        "function_to_apply": {
            "enum": ["softmax", "sigmoid", "none", None],
            "description": "The function from logits to scores; the model's own when absent (softmax, or a "
            "sigmoid per label for multi-label and one-label models, none for regression).",
        },
        "raw_scores": {"type": "boolean", "description": 'true: the logits, as function_to_apply "none".'},
        "top_k": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "Adds `scores`: each text's k highest labels and scores, sorted; null for all labels.",
        },
        "threshold": {
            "type": "number",
            "description": "Multi-label models only: a label over it is predicted (default 0.5).",
        },
    }


def metadata_schema() -> dict:
    """The `metadata` object `Classified.metadata` writes."""
    integer, integers = {"type": "integer"}, {"type": "array", "items": {"type": "integer"}}
    return {
        "type": "object",
        "properties": {
            "processing_time_ms": {"type": "number"},
            "total_words": integer,
            "total_tokens": integer,
            "num_sentences": integer,
            "model_version": {"type": "string"},
            "truncated": integers,
            "forward_passes": integer,
            "batch_ids": integers,
            "breakdown_ms": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    }


def operation(summary: str, description: str, body: str, answer: str, answered: str, errors: dict) -> dict:
    """A JSON-in, JSON-out operation: its body and 200 answer are the named schemas (`answered`
    describes the answer), and each of `errors` (`{status: description}`) is an `Error`."""
    json_of = lambda name: {"application/json": {"schema": schema(name)}}  # noqa: E731
    responses = {"200": {"description": answered, "content": json_of(answer)}}
    responses.update({str(status): error_response(text) for status, text in errors.items()})
    return {"summary": summary, "description": description, "requestBody": {"required": True, "content": json_of(body)}, "responses": responses}


def classified_errors(items: str) -> dict:
    """The errors of a plugin built on `TextList`, `Classified` and `require_method`, for
    `operation`; `items` names what its 413 counts ("too_many_sentences, sentence_too_long")."""
    return {
        400: "invalid_json or invalid_request: the message names the item",
        405: "method_not_allowed: use POST",
        413: f"{items}, or too_large for the model's queue",
        429: "quota_exceeded: `quota` names the tenant's quota",
        503: "overloaded: the model's queue is full; retry after Retry-After",
        504: "timed_out: still waiting for the model when the request's time ran out",
    }


def prediction_schema() -> dict:
    """What a classifier answers from `Classified.answer`: `probabilities` (the scores, in label
    order), `labels`, `predictions` (a label per text, or for a multi-label model the labels over
    the threshold), `scores` when asked for with `top_k`, and `metadata`."""
    strings = {"type": "array", "items": {"type": "string"}}
    label_score = {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
    }
    return {
        "type": "object",
        "required": ["probabilities", "labels", "predictions", "metadata"],
        "properties": {
            "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "labels": strings,
            "predictions": {"type": "array", "items": {"oneOf": [{"type": "string"}, strings]}},
            "scores": {"type": "array", "items": {"type": "array", "items": label_score}},
            "metadata": metadata_schema(),
        },
    }
