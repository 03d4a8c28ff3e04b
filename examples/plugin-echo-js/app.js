/**
 * The smallest batchbox plugin, in JavaScript: examples/plugin-echo's twin. It answers each
 * request with the request itself, and with the token ids the tenant's model gives its body, to
 * show a call to the host. Built by `make plugins` (componentize-js) to
 * plugins/target/js/plugin_echo.wasm.
 */

import { log, tokenize } from "batchbox:plugin/host@0.1.3";
import { hostCall, jsonResponse, respond } from "../../plugins/js/batchbox_sdk.js";

// Bytes that are not UTF-8 become U+FFFD, and a leading byte order mark stays, as in the Rust echo.
const UTF8 = new TextDecoder("utf-8", { ignoreBOM: true });

// The component's `batchbox:plugin/api` export: nothing for GET /openapi.json beyond the routes.
export const api = { describe: () => "" };

// The component's `batchbox:plugin/handler` export.
export const handler = {
  // The tenant's `config` from the server's YAML, as JSON. Echo has no settings; a plugin that has
  // some parses them here (the SDK's `Settings`), so that a bad config stops startup.
  configure: (_config) => ({ tag: "ok" }),

  // `respond` answers with the response a failed host call throws (a tenant quota, say).
  handle: (request) =>
    respond(() => {
      const text = UTF8.decode(request.body);
      // A host call, with a batch of one text.
      const [{ ids }] = hostCall(tokenize, [text]);
      // One line in the host's log, which tags it with the tenant and the request's id.
      log("info", `echoing ${request.body.length} bytes as ${ids.length} tokens`);
      return jsonResponse(200, {
        method: request.method,
        path: request.path,
        query: request.query,
        headers: request.headers,
        body: text,
        ids: Array.from(ids), // a Uint32Array, which JSON would write as an object
      });
    }),
};
