/**
 * `POST /api/v1/predict/sentences` in JavaScript: the Rust sentence-classifier's API, errors and
 * metadata, on the JavaScript SDK (plugins/js/batchbox_sdk.js).
 */

import { Classified, SCORE_FIELDS, Settings, TextList, jsonResponse, openapi, requireMethod, respond } from "../batchbox_sdk.js";

const SETTINGS = new Settings({ max_sentences: 1000, max_sentence_chars: 10_000 });

/** The route, its body with the configured limits, and its answers: as the Rust plugin's. */
export const api = {
  describe() {
    const config = SETTINGS.get();
    const operation = openapi.operation(
      "Classify sentences",
      "The scores of each sentence, in input order (softmax probabilities for a single-label model; " +
        "a sigmoid per label for a multi-label or one-label model; the logits for regression; or the " +
        "function_to_apply asked for), its prediction, and timing metadata. An empty list gives empty " +
        "results.",
      "Sentences",
      "Prediction",
      "The predictions",
      openapi.classifiedErrors("too_many_sentences, sentence_too_long"),
    );
    const sentences = openapi.textList(
      "sentences",
      config.max_sentences,
      config.max_sentence_chars,
      openapi.scoreOptions(),
    );
    const schemas = { Sentences: sentences, Prediction: openapi.predictionSchema(), Error: openapi.errorSchema() };
    return JSON.stringify({ paths: { "/": { post: operation } }, components: { schemas } });
  },
};

export const handler = {
  configure: (config) => SETTINGS.configure(config, "sequence-classification"),
  handle: (request) => respond(() => classify(request)),
};

function classify(request) {
  const started = performance.now();
  requireMethod(request, "POST");
  const config = SETTINGS.get();
  const [sentences, fields] = new TextList({
    field: "sentences",
    item: "sentence",
    maxItems: config.max_sentences,
    maxChars: config.max_sentence_chars,
  }).parseWith(request.body, SCORE_FIELDS);
  const result = new Classified(sentences, started, undefined, fields);
  return jsonResponse(200, result.answer({ num_sentences: sentences.length }));
}
