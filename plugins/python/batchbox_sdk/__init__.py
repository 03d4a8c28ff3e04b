"""What every batchbox plugin written in Python needs, so a plugin is mostly its own logic.

The Python twin of the Rust SDK (plugins/sdk): the same JSON shapes, error codes and statuses.

- `Respond` and `respond`: a failed check raises the response to send, `respond` sends it;
- `json_response`, `error`: responses, errors in the host's shape `{"error": {"code", "message"}}`;
- `TextList`: the usual body of a text model, `{"<field>": [...]}` or a bare array, checked item
  by item (400 naming the item, 413 naming the limit); `list_body`, `check_count` and `check_text`
  are its parts, for bodies whose items are more than strings;
- `Settings`: the plugin's config, parsed in `configure` (with the model's task checked);
- `host_call`: a host call whose failure becomes the HTTP answer it stands for (see the WIT);
- `Classified`: texts through the model in one `infer_texts` call, scored as the model's checkpoint
  means them or as the request asks (`ScoreOptions`), with the metadata every classifier reports
  (timings, tokens, truncations, forward passes);
- `ScoreOptions`: a request's `function_to_apply`, `top_k`, `raw_scores` and `threshold` (the Rust
  SDK's `scores` module, whose docs have the table), checked against the model;
- `softmax`, `argmax`, `ms`, `round_ms`: the arithmetic every classifier repeats;
- `warm`: runs a plugin's pure code at build time, so requests start with it warm (below).

Bindings come from `componentize-py bindings` (the `wit_world` package), generated at build time.

Warm-up. componentize-py imports the plugin at build time and snapshots the interpreter, and every
request gets a fresh instance of that snapshot: what CPython does on the first runs of code (it
specialises bytecode to the types it sees) is otherwise redone by every request. So importing
this module runs the SDK's own pure paths a few dozen times (`_warm_up`: parsing sample bodies,
good and bad, the checks and their errors, settings, softmax and argmax, a classification's
results and metadata on a stand-in host, responses), and a plugin may do the same for its own
helpers with `warm(function)` at module level. Two rules: nothing at build time may call the host
(its imports trap there), which is why `Settings.configure` and `Classified` take the host as an
argument; and the warm-up must leave no state behind (its settings, for one, are its own), so a
request behaves as it would without it.
"""

import json
import math
import re
import time
from types import SimpleNamespace

from componentize_py_types import Err
from wit_world.exports.handler import Request, Response
# Imported here, not where used: a plugin has no files at run time (no preopens), so only the
# modules imported while componentize-py builds it can be imported at all.
from wit_world.imports import host, types


class Respond(Exception):
    """Raised with the response to send instead: the early return of a failed check."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


def respond(answer) -> Response:
    """Runs `answer()` and returns its response, or the one a `Respond` it raised carries. Anything
    else raised is a bug: it traps, and the host answers 500 `plugin_failed`."""
    try:
        return answer()
    except Respond as raised:
        return raised.response


def json_response(status: int, value) -> Response:
    """A JSON response."""
    body = json.dumps(value, separators=(",", ":")).encode()
    return Response(status=status, headers=[("content-type", "application/json")], body=body)


def error(status: int, code: str, message: str, **extra) -> Response:
    """An error response in the host's shape: `{"error": {"code": ..., "message": ...}}`."""
    return json_response(status, {"error": {"code": code, "message": message, **extra}})


# serde_json, the Rust SDK's parser, refuses JSON nested this deep; json.loads goes on, and deep
# enough it crashes the interpreter.
NESTING_LIMIT = 128
# A string, or a bracket outside strings: what counting the nesting needs.
JSON_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"|[\[\]{}]')
# The escape of a UTF-16 surrogate, which is Unicode text only as half of a pair.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(body: bytes):
    """Parses a JSON body as serde_json would; on failure, raises the 400 that says what was wrong
    and where. Only a body that is not JSON is the client's fault: anything else raised (a
    MemoryError) traps, and the host answers 500."""
    if not body:
        raise Respond(error(400, "invalid_json", "the request body is empty; expected JSON"))
    try:
        # UTF-8 and nothing else: json.loads would take bytes in UTF-16 or 32 too, and skip a byte
        # order mark with a codec the component does not hold (a trap). A BOM stays in the text,
        # and json.loads refuses it, as serde_json does.
        text = body.decode()
        if too_deep(text):
            raise ValueError(f"recursion limit exceeded: nested {NESTING_LIMIT} deep")
        value = json.loads(text, parse_constant=not_json, parse_float=in_range, parse_int=in_range_int)
        # json.loads takes an escaped lone surrogate ("\ud800") into a string, which is not
        # Unicode text (the host could not take it). Encoding finds one; the search keeps that
        # rare.
        if SURROGATE_ESCAPE.search(text):
            try:
                json.dumps(value, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate escape, which is not Unicode text") from None
    # UnicodeDecodeError and json.JSONDecodeError are ValueErrors; MemoryError and RecursionError
    # are not.
    except ValueError as e:
        raise Respond(error(400, "invalid_json", f"invalid JSON body: {e}")) from None
    return value


def too_deep(text: str) -> bool:
    """Whether `text` nests arrays and objects `NESTING_LIMIT` deep."""
    if text.count("[") + text.count("{") < NESTING_LIMIT:  # most bodies: no need to look closer
        return False
    depth = 0
    for token in JSON_TOKEN.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth >= NESTING_LIMIT:
                return True
        elif bracket in ("]", "}"):
            depth -= 1
    return False


def not_json(constant: str):
    """json.loads takes `NaN`, `Infinity` and `-Infinity`; JSON has no such values."""
    raise ValueError(f"{constant} is not JSON")


def in_range(literal: str) -> float:
    """json.loads makes a number beyond f64's range (`1e400`) infinite; serde_json refuses it."""
    value = float(literal)
    if math.isinf(value):
        raise ValueError("a number is out of range")
    return value


def in_range_int(literal: str) -> int:
    """As `in_range`, for an integer (serde_json takes one past i64 as an f64)."""
    in_range(literal)
    return int(literal)


def require_method(request, method: str) -> None:
    """Raises 405 (with `Allow`) unless the request uses `method`."""
    if request.method != method:
        response = error(405, "method_not_allowed", f"{request.method} is not allowed here; use {method}")
        response.headers.append(("allow", method))
        raise Respond(response)


def json_kind(value) -> str:
    """How error messages name a JSON value's type: "a string", "an object", "null" and so on."""
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


def list_body(body: bytes, field: str, of: str = "strings") -> list:
    """The items of `{"<field>": [...]}` or of a bare array; anything else is a 400 naming what
    was wrong (`of` says what the array holds, for the messages)."""
    return list_body_with(body, field, (), of)[0]


def list_body_with(body: bytes, field: str, optional, of: str = "strings") -> tuple:
    """As `list_body`, but the object form may also hold the `optional` fields (e.g.
    `SCORE_FIELDS`): returns the items and a dict of those fields (empty for a bare array)."""

    def bad(message):
        return Respond(error(400, "invalid_request", message))

    value = parse_json(body)
    if isinstance(value, list):
        return value, {}
    if not isinstance(value, dict):
        raise bad(f'expected {{"{field}": [...]}} or an array of {of}, not {json_kind(value)}')
    if field not in value:
        raise bad(f"missing field `{field}`")
    unknown = [key for key in value if key != field and key not in optional]
    if unknown:
        also = f", with optional {', '.join(optional)}" if optional else ""
        raise bad(f'unknown field `{unknown[0]}`; the body is {{"{field}": [...]}}{also}')
    items = value[field]
    if not isinstance(items, list):
        raise bad(f"`{field}` must be an array of {of}, not {json_kind(items)}")
    return items, {key: item for key, item in value.items() if key != field}


def check_count(count: int, item: str, limit: int) -> None:
    """Raises 413 `too_many_<item>s` when `count` is over `limit`."""
    if count > limit:
        raise Respond(error(413, f"too_many_{item}s", f"{count} {item}s in one request; the limit is {limit}"))


def check_text(text, where: str, item: str, max_chars: int) -> str:
    """`text` if it is a non-blank string of at most `max_chars` characters; else a 400 naming
    `where` (e.g. `sentences[3]`), or 413 `<item>_too_long`."""
    if not isinstance(text, str):
        raise Respond(error(400, "invalid_request", f"{where} must be a string, not {json_kind(text)}"))
    if not text.strip():
        raise Respond(error(400, "invalid_request", f"{where} is empty"))
    if len(text) > max_chars:
        message = f"{where} has {len(text)} characters; the limit is {max_chars}"
        raise Respond(error(413, f"{item}_too_long", message))
    return text


class TextList:
    """A list of texts in a request body, `{"<field>": [...]}` or a bare array of strings."""

    def __init__(self, field: str, item: str, max_items: int, max_chars: int):
        self.field, self.item, self.max_items, self.max_chars = field, item, max_items, max_chars

    def parse(self, body: bytes) -> list:
        return self.parse_with(body, ())[0]

    def parse_with(self, body: bytes, optional) -> tuple:
        """As `parse`, but the object form may also hold the `optional` fields: returns the texts
        and a dict of those fields."""
        items, options = list_body_with(body, self.field, optional)
        check_count(len(items), self.item, self.max_items)
        texts = [check_text(text, f"{self.field}[{i}]", self.item, self.max_chars) for i, text in enumerate(items)]
        return texts, options


class Settings:
    """A plugin's settings: defaults overridden by its `config`, set by `configure`."""

    def __init__(self, **defaults):
        self.defaults = defaults
        self.values = None

    def configure(self, config: str, task: types.Task, host=host) -> None:
        """Parses `config` (unknown keys refused) and checks the model's task; raises `Err` to
        stop startup with the reason. `host`: the host's imports (the warm-up's stand-in)."""
        try:
            given = json.loads(config)
        except ValueError as e:
            raise Err(f"invalid config: {e}") from None
        if not isinstance(given, dict):
            raise Err(f"invalid config: expected an object, not {json_kind(given)}")
        for key, value in given.items():
            if key not in self.defaults:
                raise Err(f"invalid config: unknown field `{key}`, expected one of {sorted(self.defaults)}")
            if type(value) is not type(self.defaults[key]):
                raise Err(f"invalid config: {key}: expected {json_kind(self.defaults[key])}, not {json_kind(value)}")
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


# The request fields `ScoreOptions.parse` reads.
SCORE_FIELDS = ("function_to_apply", "top_k", "raw_scores", "threshold")
# A multi-label model's threshold when a request sets none.
DEFAULT_THRESHOLD = 0.5
FUNCTIONS = {"softmax": types.Activation.SOFTMAX, "sigmoid": types.Activation.SIGMOID, "none": types.Activation.NONE}


class ScoreOptions:
    """What one request asked of the scores, checked against the model (the Rust SDK's
    `scores::ScoreOptions`, with the same fields, defaults and messages).

    `function`: the `types.Activation` applied to each row of logits; `top_k`: absent (no sorted
    `scores` in the answer), `None` (every label) or a count; `threshold`: over it a multi-label
    model's label is predicted."""

    ABSENT = object()

    def __init__(self, scoring, fields=None, labels: int = 0):
        fields = fields or {}

        def bad(message):
            return Respond(error(400, "invalid_request", message))

        self.function, self.multi_label = scoring.activation, scoring.multi_label
        self.top_k, self.threshold = ScoreOptions.ABSENT, DEFAULT_THRESHOLD
        asked = fields.get("function_to_apply")
        if asked is not None:
            if not isinstance(asked, str):
                raise bad(f"`function_to_apply` must be a string, not {json_kind(asked)}")
            if asked not in FUNCTIONS:
                raise bad(f'`function_to_apply` must be "softmax", "sigmoid" or "none", not {json.dumps(asked)}')
            asked = FUNCTIONS[asked]
        raw = fields.get("raw_scores")
        if raw is not None and not isinstance(raw, bool):
            raise bad(f"`raw_scores` must be a boolean, not {json_kind(raw)}")
        if raw and asked is not None and asked != types.Activation.NONE:
            raise bad(
                f"`raw_scores: true` asks for the logits, but `function_to_apply` asks for {function_name(asked)}; "
                "send one of them"
            )
        self.function = types.Activation.NONE if raw else (asked if asked is not None else self.function)
        if "top_k" in fields:
            top_k = fields["top_k"]
            if top_k is not None and not (type(top_k) is int and 1 <= top_k <= labels):
                given = json.dumps(top_k) if isinstance(top_k, (int, float)) and not isinstance(top_k, bool) else json_kind(top_k)
                raise bad(
                    f"`top_k` must be a whole number from 1 to {labels} (the model's labels) or null for all, not {given}"
                )
            self.top_k = top_k
        threshold = fields.get("threshold")
        if threshold is not None:
            if not self.multi_label:
                raise bad("`threshold` applies to multi-label models only; this model predicts one label per text")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise bad(f"`threshold` must be a number, not {json_kind(threshold)}")
            self.threshold = float(threshold)

    def scores(self, logits) -> list:
        """A row of logits as scores."""
        return apply(self.function, logits)

    def predicted(self, scores, labels):
        """The prediction from a row of scores: the top label, or for a multi-label model every
        label over the threshold, highest first."""
        if self.multi_label:
            return [labels[i] for i in ranked(scores) if scores[i] > self.threshold]
        return labels[argmax(scores)]

    def top(self, scores, labels):
        """The sorted `scores` the request asked for with `top_k`, or None if it did not."""
        if self.top_k is ScoreOptions.ABSENT:
            return None
        order = ranked(scores)[: self.top_k]
        return [{"label": labels[i], "score": scores[i]} for i in order]


def ranked(scores) -> list:
    """The label indices, highest score first; ties in label order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def function_name(function) -> str:
    """A `types.Activation` as requests spell it."""
    return {types.Activation.SOFTMAX: "softmax", types.Activation.SIGMOID: "sigmoid"}.get(function, "none")


def apply(function, logits) -> list:
    """`function` (a `types.Activation`) applied to a row of logits."""
    if function == types.Activation.SOFTMAX:
        return softmax(logits)
    if function == types.Activation.SIGMOID:
        return [sigmoid(x) for x in logits]
    return list(logits)


def sigmoid(x: float) -> float:
    """The logistic function, without overflow at either end."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class Classified:
    """`texts` through the route's sequence-classification model in one `infer_texts` call (the
    host tokenizes them and batches their sequences, with other requests' too; no token crosses
    into the interpreter), each output scored (`ScoreOptions`: the model's function, or what the
    request's `fields` ask for, checked before the model is called), and the metadata every
    classifier reports. A host refusal raises the response it stands for. `started` is the
    request's `time.perf_counter()` at arrival; `host`: the host's imports (the warm-up's
    stand-in)."""

    def __init__(self, texts: list, started: float, host=host, fields=None):
        self.started = started
        self.info = host.model()
        self.labels = self.info.labels
        self.options = ScoreOptions(host.model_scoring(), fields, len(self.labels))
        self.total_words = sum(len(text.split()) for text in texts)
        self.computed = host_call(host.infer_texts, texts)
        self.probabilities = [self.options.scores(t.data) for t in self.computed.inference.outputs]
        self.predictions = [self.options.predicted(p, self.labels) for p in self.probabilities]

    def answer(self, **counts) -> dict:
        """The classifier's answer: `probabilities` (the scores), `labels`, `predictions`, `scores`
        when the request asked for `top_k`, and `metadata` with `counts` (call it last)."""
        answer = {"probabilities": self.probabilities, "labels": self.labels, "predictions": self.predictions}
        if self.options.top_k is not ScoreOptions.ABSENT:
            answer["scores"] = [self.options.top(p, self.labels) for p in self.probabilities]
        answer["metadata"] = self.metadata(**counts)
        return answer

    def metadata(self, **counts) -> dict:
        """The response's `metadata`, with `counts` (e.g. `num_sentences=3`) after the token count.
        Call it last: its processing time ends now."""
        computed, inference = self.computed, self.computed.inference
        tokenize_ms = computed.tokenize_us / 1e3
        queue_ms, compute_ms = inference.queue_us / 1e3, inference.compute_us / 1e3
        total_ms = ms(self.started)
        return {
            "processing_time_ms": round_ms(total_ms),
            "total_words": self.total_words,
            "total_tokens": sum(computed.tokens),
            **counts,
            "model_version": self.info.version,
            "truncated": list(computed.truncated),
            "forward_passes": inference.forward_passes,
            "batch_ids": list(inference.batch_ids),
            "breakdown_ms": {
                "tokenize": round_ms(tokenize_ms),
                "queue": round_ms(queue_ms),
                "inference": round_ms(compute_ms),
                # Everything that was not the host's work: parsing, softmax, the plugin's own
                # work, and the crossing of the boundary.
                "plugin": round_ms(max(total_ms - tokenize_ms - queue_ms - compute_ms, 0.0)),
            },
        }


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


# The warm-up (see the module's docs).

# Enough runs for CPython to specialise each instruction on the paths taken (it does after two or
# so), and to settle those it had to respecialise.
WARM_TIMES = 50


def warm(function, times: int = WARM_TIMES) -> None:
    """Runs `function()` `times` times, at module level, so that the snapshot componentize-py takes
    after importing the plugin has its code warm. `function` must not call the host (its imports
    trap at build time) nor change state a request would see. A `Respond` it raises is expected:
    error paths warm too."""
    for _ in range(times):
        try:
            function()
        except Respond:
            pass


def _warm_up() -> None:
    """The SDK's pure paths, on samples and a stand-in host, with state of their own."""
    labels = ["sports", "politics", "business"]
    stand_in = SimpleNamespace(
        model=lambda: types.ModelInfo("warm-up", "0", types.Task.SEQUENCE_CLASSIFICATION, labels, 16),
        model_scoring=lambda: types.Scoring(types.Activation.SOFTMAX, False),
        infer_texts=lambda texts: types.TextInference(
            types.Inference([types.Tensor([0.5, -1.25, 2.0], [3])] * len(texts), 10, 20, 1, [1]),
            [3] * len(texts),
            [0] if texts else [],
            30,
        ),
    )
    sentences = TextList("sentences", "sentence", max_items=3, max_chars=40)
    bodies = [
        b'{"sentences": ["The match ended in a draw.", "Shares rose 3% on Monday."]}',
        b'["The vote is on Tuesday."]',
        b"",
        b"{not json",
        b'["\xff"]',
        b'\xef\xbb\xbf["a"]',
        b'["\\ud800"]',
        b'["\\ud83d\\ude00 ok"]',
        b"[" * NESTING_LIMIT,
        b'["a", NaN]',
        b"[1e400]",
        b"null",
        b'{"texts": ["a"]}',
        b'{"sentences": ["a"], "extra": 1}',
        b'{"sentences": "a"}',
        b'["a", 3]',
        b'["a", " \\t "]',
        b'["a", "b", "c", "d"]',
        b'["' + b"x" * 41 + b'"]',
        b'{"sentences": ["a"], "function_to_apply": "sigmoid", "top_k": 2}',
        b'{"sentences": ["a"], "raw_scores": true, "top_k": null}',
        b'{"sentences": ["a"], "function_to_apply": "tanh"}',
        b'{"sentences": ["a"], "top_k": 0}',
        b'{"sentences": ["a"], "threshold": 0.2}',
    ]

    def classify(body):
        texts, fields = sentences.parse_with(body, SCORE_FIELDS)
        result = Classified(texts, time.perf_counter(), stand_in, fields)
        return json_response(200, result.answer(num_sentences=len(texts)))

    multi_label = ScoreOptions(types.Scoring(types.Activation.SIGMOID, True), {"threshold": 0.4}, 3)

    def configure(config):
        try:
            Settings(max_sentences=1000, max_sentence_chars=10_000).configure(
                config, types.Task.SEQUENCE_CLASSIFICATION, stand_in
            )
        except Err:
            pass

    def refused(failure):
        def call():
            raise Err(failure)

        host_call(call)

    failures = [
        types.Error_InvalidInput("x"),
        types.Error_TooLarge("x"),
        types.Error_QuotaExceeded(types.QuotaError("tokens", "x")),
        types.Error_Overloaded("x"),
        types.Error_TimedOut("x"),
        types.Error_Internal("x"),
    ]
    for body in bodies:
        warm(lambda: classify(body))
    for config in ["{}", '{"max_sentences": 3}', '{"max_sentences": "3"}', '{"other": 1}', "[]", "{"]:
        warm(lambda: configure(config))
    for failure in failures:
        warm(lambda: refused(failure))
    for method in ["POST", "GET"]:
        warm(lambda: require_method(Request(method, "/", "", [], b""), "POST"))
    warm(lambda: Settings()["unset"])
    warm(lambda: (argmax(softmax([0.1, 2.0, -3.0])), argmax([]), json_kind(1.5), json_kind({})))
    warm(lambda: multi_label.predicted(multi_label.scores([0.1, 2.0, -3.0]), labels))


_warm_up()
