"""convert(): every weight carried over, context extension, clear errors before any write, atomic output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import batch_with_padding, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, GenerationConfig

import hf_attn_variants as hv
from hf_attn_variants.cli import main as cli_main
from hf_attn_variants.conversion import ConversionError, extend_position_embeddings


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def folder_snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "qwen2", "mistral"])
@pytest.mark.parametrize("variant", ["performer", "lsh"])
def test_every_source_weight_is_carried_over_unchanged(family, variant, saved_models, tmp_path):
    before = folder_snapshot(saved_models[family])
    hv.convert(saved_models[family], attention=variant, output_dir=tmp_path / "out")
    source, converted = tensors(saved_models[family]), tensors(tmp_path / "out")
    for key, value in source.items():
        assert key in converted, f"{key} dropped"
        assert torch.equal(converted[key], value), f"{key} changed"
    new = set(converted) - set(source)
    assert new and all(".attn_variant." in key for key in new), new
    assert folder_snapshot(saved_models[family]) == before, "the source folder was modified"


def test_tokenizer_and_generation_config_are_carried_over(gpt2_with_tokenizer, tmp_path):
    out = tmp_path / "gpt2-performer"
    hv.convert(gpt2_with_tokenizer, attention="performer", output_dir=out)
    source_tok, tok = AutoTokenizer.from_pretrained(gpt2_with_tokenizer), AutoTokenizer.from_pretrained(out)
    text = "Sparse attention keeps a window"
    assert tok(text)["input_ids"] == source_tok(text)["input_ids"]
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.max_new_tokens == 7


def test_bert_tokenizer_is_carried_over(bert_with_tokenizer, tmp_path):
    hv.convert(bert_with_tokenizer, attention="linformer", output_dir=tmp_path / "o", k=16)
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok.convert_ids_to_tokens(tok("the lazy dog")["input_ids"]) == ["[CLS]", "the", "lazy", "dog", "[SEP]"]


def test_extend_position_embeddings_tiles_rows():
    weight = torch.arange(10.0).view(5, 2)
    out = extend_position_embeddings(weight, 12, keep_front=0)
    assert torch.equal(out[:5], weight) and torch.equal(out[5:10], weight) and torch.equal(out[10:], weight[:2])
    roberta = extend_position_embeddings(weight, 9, keep_front=2)  # rows 0-1 (padding) stay; 2..4 are tiled
    assert torch.equal(roberta[:5], weight) and torch.equal(roberta[5:8], weight[2:5])
    assert torch.equal(roberta[8], weight[2])


@pytest.mark.parametrize("family,key", [
    ("bert", "bert.embeddings.position_embeddings.weight"),
    ("roberta", "roberta.embeddings.position_embeddings.weight"),
    ("gpt2", "transformer.wpe.weight"),
])
def test_context_extension_tiles_learned_positions(family, key, saved_models, tmp_path):
    source = tiny_model(family)
    old = source.state_dict()[key]
    model = hv.convert(saved_models[family], attention="performer", max_position_embeddings=512,
                       output_dir=tmp_path / "o")
    new = model.state_dict()[key]
    front = 2 if family == "roberta" else 0
    period = old.shape[0] - front
    assert new.shape[0] == 512  # the config value (RoBERTa keeps padding_idx + 1 rows in front of its positions)
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.equal(new[front + period : front + 2 * period], old[front:])
    ids = torch.randint(3, 96, (1, 500))
    reloaded = (AutoModelForCausalLM if family == "gpt2" else AutoModelForMaskedLM).from_pretrained(tmp_path / "o")
    assert reloaded(input_ids=ids).logits.shape[1] == 500


def test_short_inputs_of_an_extended_model_match_the_source():
    source = tiny_model("bert")
    ids, mask = batch_with_padding()
    model = hv.convert(source, attention="full", max_position_embeddings=1024)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   source(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_rope_models_keep_their_weights_when_extended():
    source = tiny_model("llama")
    model = hv.convert(source, attention="performer", max_position_embeddings=4096)
    assert model.config.max_position_embeddings == 4096
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


# --- errors: named problem and fix, raised before anything is written ---------------------------------------

ERRORS = [
    (dict(attention="longformer"), "unknown attention variant 'longformer'"),
    (dict(attention="performer", k=64), "It is a setting of linformer"),
    (dict(attention="performer", num_features=0), "num_features=0 must be a positive integer"),
    (dict(attention="bigbird", block_size=2.5), "block_size=2.5 must be a positive integer"),
    (dict(attention="lsh", num_hashes=-1), "num_hashes=-1 must be a positive integer"),
    (dict(attention="lsh", num_buckets=3), "must be 1 or even"),
    (dict(attention="performer", kernel="tanh"), "kernel='tanh' is not one of"),
    (dict(attention="performer", max_position_embeddings=64), "smaller than the source's 128"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_bad_requests_fail_clearly_before_writing(kwargs, message, saved_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        hv.convert(saved_models["bert"], output_dir=out, **kwargs)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_linformer_on_a_decoder_is_refused(saved_models, tmp_path):
    with pytest.raises(ConversionError, match="'linformer' is not causal"):
        hv.convert(saved_models["gpt2"], attention="linformer", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unsupported_family_is_refused(tmp_path):
    from transformers import T5Config, T5Model

    config = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=20, num_layers=1, num_heads=2)
    T5Model(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConversionError, match="model type 't5' is not supported"):
        hv.convert(tmp_path / "t5", attention="performer", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(saved_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        hv.convert(saved_models["bert"], attention="performer", output_dir=out)
    assert (out / "keep.txt").read_text() == "mine"
    hv.convert(saved_models["bert"], attention="performer", output_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"], "temporary folders left behind"


def test_pickled_only_or_missing_weights_are_refused(tmp_path):
    model = tiny_model("bert")
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="only pickled weights"):
        hv.convert(pickled, attention="performer")
    empty = tmp_path / "empty"
    model.config.save_pretrained(empty)
    with pytest.raises(ConversionError, match="no model weights"):
        hv.convert(empty, attention="performer")


def test_a_failure_while_saving_leaves_no_output(saved_models, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, *args, **kwargs):
        Path(args[0], "partial.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        hv.convert(saved_models["bert"], attention="performer", output_dir=tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_convert_with_settings(saved_models, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["convert", saved_models["bert"], str(out), "--attention", "linformer", "--set", "k=32",
                     "--set", "sharing=kv", "--set", "window=16", "--max-positions", "256"])
    assert code == 0
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.attention_settings == {"k": 32, "max_length": None, "sharing": "kv", "exact_first": 1,
                                               "window": 16}
    assert model.config.max_position_embeddings == 256
    state = model.bert.encoder.layer[0].attention.self.attn_variant
    assert state.proj_k.shape == (1, 32, 256) and state.proj_v is None


def test_cli_reports_bad_input_in_one_line(saved_models, tmp_path, capsys):
    code = cli_main(["convert", saved_models["bert"], str(tmp_path / "o"), "--attention", "bigbird", "--set", "k=3"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown setting 'k' for attention 'bigbird'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_converted_model_converts_to_every_other_variant_as_its_source_would(family, saved_models, tmp_path):
    """Variant -> variant (and back to full), from folders: every base weight survives, the old variant's state is
    dropped, and the result equals converting the stock checkpoint directly (bit for bit)."""
    variants = ["full", "performer", "bigbird", "lsh"] + (["linformer"] if family == "bert" else [])
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    stock = load_file(f"{saved_models[family]}/model.safetensors")
    for first in variants:
        hv.convert(saved_models[family], attention=first, output_dir=tmp_path / first, max_position_embeddings=256)
        for second in variants:
            again = hv.convert(str(tmp_path / first), attention=second)
            direct = hv.convert(saved_models[family], attention=second, max_position_embeddings=256)
            weights = again.state_dict()
            assert not any(".attn_variant." in k for k in weights) or second != "full"
            for key, tensor in stock.items():
                if "position" not in key:
                    assert torch.equal(weights[key], tensor), (first, second, key)
            with torch.no_grad():
                assert torch.equal(again(ids).logits, direct(ids).logits), (first, second)


def test_a_truncated_weight_file_gets_one_line_naming_it(saved_models, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_models["bert"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 3000])
    code = cli_main(["convert", str(broken), str(tmp_path / "out"), "--attention", "performer"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.safetensors cannot be read as safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_conversion_keeps_ties_and_never_touches_an_in_memory_source(saved_models):
    """Built on the meta device and loaded by assignment: tied output embeddings stay tied (the same parameter),
    and a source passed as a model keeps its own tensors (training the conversion leaves it unchanged)."""
    source = tiny_model("gpt2")
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = hv.convert(source, attention="performer")
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for key, value in source.state_dict().items():
        assert torch.equal(value, before[key]), key
    from_folder = hv.convert(saved_models["gpt2"], attention="lsh")
    assert from_folder.lm_head.weight is from_folder.transformer.wte.weight
    assert not any(t.is_meta for t in [*from_folder.parameters(), *from_folder.buffers()])
