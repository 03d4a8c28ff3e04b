"""What every batchbox plugin written in Python needs, so a plugin is mostly its own logic.

The Python twin of the Rust SDK (plugins/sdk): the same JSON shapes, error codes and statuses.

- `json_response`, `error`: responses, errors in the host's shape `{"error": {"code", "message"}}`;
- `TextList`: the usual body of a text model, `{"<field>": [...]}` or a bare array, checked item
  by item (400 naming the item, 413 naming the limit);
- `Settings`: the plugin's config, parsed in `configure` (with the model's task checked);
- `host_call`: a host call whose failure becomes the HTTP answer it stands for (see the WIT);
- `softmax`, `argmax`, `ms`, `round_ms`: the arithmetic every classifier repeats.

Bindings come from `componentize-py bindings` (the `wit_world` package), generated at build time.
"""

import json
import math
import time

from componentize_py_types import Err
from wit_world.exports.handler import Response
from wit_world.imports import types


class Respond(Exception):
    """Raised with the response to send instead: the early return of a failed check."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


def json_response(status: int, value) -> Response:
    """A JSON response."""
    body = json.dumps(value, separators=(",", ":")).encode()
    return Response(status=status, headers=[("content-type", "application/json")], body=body)


def error(status: int, code: str, message: str, **extra) -> Response:
    """An error response in the host's shape: `{"error": {"code": ..., "message": ...}}`."""
    return json_response(status, {"error": {"code": code, "message": message, **extra}})


def parse_json(body: bytes):
    """Parses a JSON body; on failure, raises the 400 that says what was wrong and where."""
    if not body:
        raise Respond(error(400, "invalid_json", "the request body is empty; expected JSON"))
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Respond(error(400, "invalid_json", f"invalid JSON body: {e}")) from None


def require_method(request, method: str) -> None:
    """Raises 405 (with `Allow`) unless the request uses `method`."""
    if request.method != method:
        response = error(405, "method_not_allowed", f"{request.method} is not allowed here; use {method}")
        response.headers.append(("allow", method))
        raise Respond(response)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class TextList:
    """A list of texts in a request body, `{"<field>": [...]}` or a bare array of strings."""

    def __init__(self, field: str, item: str, max_items: int, max_chars: int):
        self.field, self.item, self.max_items, self.max_chars = field, item, max_items, max_chars

    def parse(self, body: bytes) -> list:
        field, item = self.field, self.item

        def bad(message):
            return Respond(error(400, "invalid_request", message))

        value = parse_json(body)
        if isinstance(value, dict):
            if field not in value:
                raise bad(f"missing field `{field}`")
            unknown = [key for key in value if key != field]
            if unknown:
                raise bad(f'unknown field `{unknown[0]}`; the body is {{"{field}": [...]}}')
            items = value[field]
            if not isinstance(items, list):
                raise bad(f"`{field}` must be an array of strings, not {_kind(items)}")
        elif isinstance(value, list):
            items = value
        else:
            raise bad(f'expected {{"{field}": [...]}} or an array of strings, not {_kind(value)}')
        if len(items) > self.max_items:
            message = f"{len(items)} {item}s in one request; the limit is {self.max_items}"
            raise Respond(error(413, f"too_many_{item}s", message))
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise bad(f"{field}[{i}] must be a string, not {_kind(text)}")
            if not text.strip():
                raise bad(f"{field}[{i}] is empty")
            if len(text) > self.max_chars:
                message = f"{field}[{i}] has {len(text)} characters; the limit is {self.max_chars}"
                raise Respond(error(413, f"{item}_too_long", message))
        return items


class Settings:
    """A plugin's settings: defaults overridden by its `config`, set by `configure`."""

    def __init__(self, **defaults):
        self.defaults = defaults
        self.values = None

    def configure(self, config: str, task: types.Task) -> None:
        """Parses `config` (unknown keys refused) and checks the model's task; raises `Err` to
        stop startup with the reason."""
        from wit_world.imports import host

        try:
            given = json.loads(config)
        except ValueError as e:
            raise Err(f"invalid config: {e}") from None
        if not isinstance(given, dict):
            raise Err(f"invalid config: expected an object, not {_kind(given)}")
        for key, value in given.items():
            if key not in self.defaults:
                raise Err(f"invalid config: unknown field `{key}`, expected one of {sorted(self.defaults)}")
            if type(value) is not type(self.defaults[key]):
                raise Err(f"invalid config: {key}: expected {_kind(self.defaults[key])}, not {_kind(value)}")
        info = host.model()
        if info.task != task:
            raise Err(f"model {info.name} does {info.task.name}; this plugin needs {task.name}")
        self.values = {**self.defaults, **given}

    def __getitem__(self, key):
        if self.values is None:
            raise Respond(error(500, "internal", "plugin not configured"))
        return self.values[key]


def into_response(failure) -> Response:
    """The HTTP answer a failed host call stands for (statuses documented in the WIT)."""
    if isinstance(failure, types.Error_InvalidInput):
        return error(400, "invalid_input", failure.value)
    if isinstance(failure, types.Error_TooLarge):
        return error(413, "too_large", failure.value)
    if isinstance(failure, types.Error_QuotaExceeded):
        return error(429, "quota_exceeded", failure.value.message, quota=failure.value.quota)
    if isinstance(failure, types.Error_Overloaded):
        response = error(503, "overloaded", failure.value)
        response.headers.append(("retry-after", "1"))
        return response
    if isinstance(failure, types.Error_TimedOut):
        return error(504, "timed_out", failure.value)
    return error(500, "internal", failure.value)


def host_call(function, *args):
    """Calls a host function; a refusal raises the response it stands for."""
    try:
        return function(*args)
    except Err as e:
        raise Respond(into_response(e.value)) from None


def softmax(logits) -> list:
    """Probabilities from logits (numerically stable)."""
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    total = sum(exp)
    return [x / total for x in exp]


def argmax(values) -> int:
    """The index of the largest value (the first among equals); 0 for an empty list."""
    return max(range(len(values)), key=lambda i: (values[i], -i)) if values else 0


def ms(since: float) -> float:
    """Milliseconds since `since` (a `time.perf_counter()` reading)."""
    return (time.perf_counter() - since) * 1e3


def round_ms(value: float) -> float:
    """Milliseconds to the microsecond, for responses: finer digits are noise."""
    return round(value, 3)
