// @huggingface/inference's textClassification against a batchbox route, as a Node user calls it:
//   node text_classification.mjs REQUEST_JSON
// REQUEST_JSON: {"endpointUrl", "token" (or null), "texts": [...], "parameters" (or null)}.
// Prints {"answers": [<one list of {label, score} per text>]}, or {"error", "status"} when the
// client throws.
import { InferenceClient } from "@huggingface/inference";

const request = JSON.parse(process.argv[2]);
const client = new InferenceClient(request.token ?? undefined, { endpointUrl: request.endpointUrl });
try {
  const answers = [];
  for (const inputs of request.texts) {
    answers.push(await client.textClassification({ inputs, parameters: request.parameters ?? undefined }));
  }
  console.log(JSON.stringify({ answers }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error?.message ?? error), status: error?.httpResponse?.status ?? null }));
}
