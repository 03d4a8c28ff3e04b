#!/usr/bin/env python3
"""Batch invariance over HTTP: how far each fixture sentence's probabilities move between its own
one-sentence request and its row in the 120-sentence request (already answered, in BATCH_FILE).

    tools/alone_vs_batch.py SERVER BATCH_FILE [--sentences N] [--path /api/v1/predict/sentences]

Prints one JSON object: sentences compared, the largest |difference| in any probability, which
sentence it was, and how many top labels differ. Used by tools/bench_serving.sh (ALONE=N).
"""

import argparse
import json
import urllib.request
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests/fixtures/test_120_sentences.json"


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server")
    parser.add_argument("batch_file", type=Path)
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--path", default="/api/v1/predict/sentences")
    args = parser.parse_args()
    sentences = json.loads(FIXTURE.read_text())["sentences"][: args.sentences]
    batch = json.loads(args.batch_file.read_text())
    worst, worst_at, flips = 0.0, None, 0
    for i, sentence in enumerate(sentences):
        alone = post(args.server + args.path, {"sentences": [sentence]})
        moved = max(abs(a - b) for a, b in zip(alone["probabilities"][0], batch["probabilities"][i]))
        if moved > worst:
            worst, worst_at = moved, i
        flips += alone["predictions"][0] != batch["predictions"][i]
    print(json.dumps({"sentences": len(sentences), "max_abs_diff": worst, "at": worst_at, "top_label_flips": flips}))


if __name__ == "__main__":
    main()
