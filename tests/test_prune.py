"""Pruning: heads and FFN neurons are removed physically (exactly when they contribute nothing), importance finds
the useless ones, the variant's per-head state follows, and the Auto classes reload the pruned shape."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, batch_with_padding, tiny_model
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hf_attn_variants as hv
from hf_attn_variants.cli import main as cli_main
from hf_attn_variants.modeling.pruned_shapes import layers
from hf_attn_variants.prune import importance_scores, magnitude_prune, prune_model


def output_projection(layer, family):
    if family in ("bert", "roberta"):
        return layer.attention.output.dense.weight  # [hidden, heads*d]: columns per head
    if family == "gpt2":
        return layer.attn.c_proj.weight.T  # Conv1D stores [in, out]
    return layer.self_attn.o_proj.weight


def ffn_output(layer, family):
    if family in ("bert", "roberta"):
        return layer.output.dense.weight
    if family == "gpt2":
        return layer.mlp.c_proj.weight.T
    return layer.mlp.down_proj.weight


def silence(model, family, layer_index, heads, neurons):
    """Zero the output columns of some heads and FFN neurons of a layer: they then contribute nothing."""
    d = 8
    with torch.no_grad():
        layer = layers(model, family)[layer_index]
        for h in heads:
            output_projection(layer, family)[:, h * d:(h + 1) * d] = 0
        ffn_output(layer, family)[:, neurons] = 0


@pytest.mark.parametrize("family,variant", [("bert", "linformer"), ("roberta", "performer"), ("gpt2", "bigbird"),
                                            ("llama", "lsh"), ("qwen2", "performer")])
def test_removing_silent_heads_and_neurons_is_exact_and_reloads(family, variant, tmp_path):
    settings = {"k": 16, "sharing": "none"} if variant == "linformer" else {}
    model = hv.convert(tiny_model(family), attention=variant, **settings)
    gqa = family in ("llama", "qwen2")  # 4 query heads share 2 key/value heads: groups {0, 1} and {2, 3}
    silent_heads = [2, 3] if gqa else [1, 3]
    silence(model, family, 0, silent_heads, neurons=[0, 5, 7])
    silence(model, family, 1, [], neurons=[1, 2, 30])  # FFN pruning takes the same share from every layer
    ids, mask = batch_with_padding()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    scores, neurons = importance_scores(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    assert all(scores[0, h] < 1e-6 for h in silent_heads) and all(neurons[0][n] < 1e-6 for n in (0, 5, 7))
    assert all(scores[0, h] > 1e-3 for h in range(4) if h not in silent_heads)
    parameters = sum(p.numel() for p in model.parameters())
    width = ffn_output(layers(model, family)[0], family).shape[1]  # 40 (GPT-2: 4 x hidden = 128)
    removed = prune_model(model, scores, neurons, head_fraction=0.25, ffn_fraction=3 / width)
    assert sorted(removed[0]) == silent_heads
    assert model.config.heads_per_layer[0] == 2 and model.config.intermediate_per_layer == [width - 3] * 2
    assert sum(p.numel() for p in model.parameters()) < parameters
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    if variant == "linformer":
        assert model.bert.encoder.layer[0].attention.self.attn_variant.proj_k.shape[0] == 2
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if family in DECODER_FAMILIES else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, after)


def test_every_layer_keeps_at_least_one_head():
    model = hv.convert(tiny_model("bert"), attention="performer")
    scores = torch.rand(2, 4)
    prune_model(model, scores, None, head_fraction=0.9)
    assert min(model.config.heads_per_layer) >= 1


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_magnitude_pruning_zeroes_the_smallest_weights(family):
    """Half of each projection's weights, exactly the smallest in magnitude; embeddings (and an output layer tied
    to them) and the output layer are left alone."""
    model = hv.convert(tiny_model(family), attention="full")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    zeroed = magnitude_prune(model, 0.5)
    pruned = 0
    for name, param in model.named_parameters():
        original, now = before[name], param.detach()
        if "emb" in name or name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")) or param.dim() != 2:
            assert torch.equal(now, original), f"{name} should be untouched"
            continue
        gone = now == 0
        assert abs(gone.float().mean().item() - 0.5) < 0.01, name
        assert original[gone].abs().max() <= original[~gone].abs().min(), f"{name}: a larger weight was zeroed"
        assert torch.equal(now[~gone], original[~gone])
        pruned += int(gone.sum())
    assert zeroed == pruned > 0


def test_bad_fractions_are_refused():
    model = hv.convert(tiny_model("bert"), attention="performer")
    with pytest.raises(ValueError, match="head_fraction=1.5 must be in"):
        prune_model(model, None, None, head_fraction=1.5)


def test_cli_prune_writes_a_smaller_model_with_a_card(bert_with_tokenizer, tmp_path, capsys):
    hv.convert(bert_with_tokenizer, attention="lsh", output_dir=tmp_path / "src")
    assert cli_main(["prune", str(tmp_path / "src"), str(tmp_path / "pruned"), "--heads", "0.25", "--ffn", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "forward_seconds" in out
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "pruned")
    assert sum(model.config.heads_per_layer) == 6 and model.config.intermediate_per_layer == [20, 20]
    assert "pruned 2 attention heads" in (tmp_path / "pruned" / "README.md").read_text()
    assert cli_main(["prune", str(tmp_path / "src"), str(tmp_path / "pruned"), "--heads", "0.25"]) == 2


def test_cli_prune_a_classifier_with_labelled_csv(bert_with_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    source = tmp_path / "src"
    converted = hv.convert(bert_with_tokenizer, attention="performer")
    converted.config.num_labels = 2
    classifier = AutoModelForSequenceClassification.from_config(converted.config)
    classifier.save_pretrained(source)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(bert_with_tokenizer).save_pretrained(source)
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"the lazy dog {i},{i % 2}\n" for i in range(12)))
    assert cli_main(["prune", str(source), str(tmp_path / "out"), "--heads", "0.5", "--data", str(data)]) == 0
    pruned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert sum(pruned.config.heads_per_layer) == 4
