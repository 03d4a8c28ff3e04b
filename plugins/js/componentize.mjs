// Builds one JavaScript plugin into a component:
//
//     node plugins/js/componentize.mjs plugins/js/<name>/app.js plugins/target/js/<name>.wasm
//
// It calls componentize-js's API rather than `jco componentize`, which fails here with "failed to
// get path metadata".
//
// Modules: an app imports the SDK by a relative path (`../batchbox_sdk.js`, or
// `../../plugins/js/batchbox_sdk.js` from examples/plugin-echo-js), and nothing is bundled.
// componentize-js evaluates the module graph at build time (a Wizer snapshot of SpiderMonkey)
// with the current directory mapped to `/`, reading each imported file from there, so this script
// runs from the repository root: an app and the modules it imports must lie inside it.
//
// Features: `http` and `fetch-event` are off, so the component does not import wasi:http, which
// the host does not offer (plugins have no network). stdio (console, to the host's log), clocks
// (`performance.now`) and random stay.

import { rename, writeFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { componentize } from "@bytecodealliance/componentize-js";

const [source, output] = process.argv.slice(2);
if (!source || !output) {
  console.error("usage: node componentize.mjs <app.js> <out.wasm>");
  process.exit(2);
}
const sourcePath = resolve(source);
const out = resolve(output);
process.chdir(resolve(dirname(fileURLToPath(import.meta.url)), "../.."));

const { component } = await componentize({
  sourcePath,
  witPath: resolve("wit/batchbox.wit"),
  worldName: "described-plugin",
  disableFeatures: ["http", "fetch-event"],
});
// Written whole or not at all: make must not take a half-written file for a built one.
await writeFile(`${out}.tmp`, component);
await rename(`${out}.tmp`, out);
