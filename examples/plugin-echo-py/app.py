"""The smallest batchbox plugin, in Python: examples/plugin-echo's twin. It answers each request
with the request itself, and with the token ids the tenant's model gives its body, to show a call
to the host. Built by `make plugins` (componentize-py) to plugins/target/python/plugin_echo.wasm."""

import wit_world
from batchbox_sdk import Respond, host_call, json_response
from wit_world.imports import host, types


# componentize-py exports the class named `Handler` as the component's `batchbox:plugin/handler`.
class Api(wit_world.exports.Api):
    # Nothing for GET /openapi.json beyond the tenant's routes.
    def describe(self) -> str:
        return ""


class Handler(wit_world.exports.Handler):
    # The tenant's `config` from the server's YAML, as JSON. Echo has no settings; a plugin that
    # has some parses them here (the SDK's `Settings`), so that a bad config stops startup.
    def configure(self, config: str) -> None:
        pass

    def handle(self, request):
        # The body arrives as bytes; the tokenizer takes text (bytes that are not UTF-8 become
        # U+FFFD, as in the Rust echo).
        text = request.body.decode("utf-8", "replace")
        try:
            # A host call, with a batch of one text; a refusal (a tenant quota, say) raises
            # `Respond` with the HTTP answer it stands for.
            ids = host_call(host.tokenize, [text])[0].ids
        except Respond as answer:
            return answer.response
        # One line in the host's log, which tags it with the tenant and the request's id.
        host.log(types.Level.INFO, f"echoing {len(request.body)} bytes as {len(ids)} tokens")
        return json_response(200, {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": text,
            "ids": ids,
        })
