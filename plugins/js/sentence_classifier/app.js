/**
 * `POST /api/v1/predict/sentences` in JavaScript: the Rust sentence-classifier's API, errors and
 * metadata, on the JavaScript SDK (plugins/js/batchbox_sdk.js).
 */

import { Classified, Settings, TextList, jsonResponse, openapi, requireMethod, respond } from "../batchbox_sdk.js";

const SETTINGS = new Settings({ max_sentences: 1000, max_sentence_chars: 10_000 });

/** The route, its body with the configured limits, and its answers: as the Rust plugin's. */
export const api = {
  describe() {
    const config = SETTINGS.get();
    const operation = openapi.operation(
      "Classify sentences",
      "One row of probabilities (softmax over the labels) per sentence, in input order, the top " +
        "label of each, and timing metadata. An empty list gives empty results.",
      "Sentences",
      "Prediction",
      "The predictions",
      openapi.classifiedErrors("too_many_sentences, sentence_too_long"),
    );
    const sentences = openapi.textList("sentences", config.max_sentences, config.max_sentence_chars);
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
  const sentences = new TextList({
    field: "sentences",
    item: "sentence",
    maxItems: config.max_sentences,
    maxChars: config.max_sentence_chars,
  }).parse(request.body);
  const result = new Classified(sentences, started);
  return jsonResponse(200, {
    probabilities: result.probabilities,
    labels: result.labels,
    predictions: result.predictions,
    metadata: result.metadata({ num_sentences: sentences.length }),
  });
}
