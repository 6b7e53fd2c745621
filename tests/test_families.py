"""Family configs and models: conversion to 'full' is lossless, reloads are bit-identical, Auto classes resolve."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from conftest import CAUSAL_EFFICIENT, DECODER_FAMILIES, EFFICIENT, FAMILIES, batch_with_padding, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, BigBirdConfig

import hf_attn_variants as hv
from hf_attn_variants.modeling import VARIANT_CONFIGS, VARIANT_MODELS
from hf_attn_variants.modeling.families import FAMILIES as FAMILY_TABLE


def variants_for(family):
    return ("full", *(EFFICIENT if family not in DECODER_FAMILIES else CAUSAL_EFFICIENT))


FAMILY_VARIANTS = [(family, variant) for family in FAMILIES for variant in variants_for(family)]


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_conversion_equals_source(family):
    source = tiny_model(family)
    ids, mask = batch_with_padding()
    converted = hv.convert(source, attention="full")
    real = mask.bool()
    diff = (logits(converted, ids, mask) - logits(source, ids, mask))[real].abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family,variant", FAMILY_VARIANTS)
def test_saved_variant_reloads_as_same_class_with_identical_outputs(family, variant, tmp_path):
    model = hv.convert(tiny_model(family), attention=variant)
    ids, mask = batch_with_padding(length=40)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    auto = AutoModelForCausalLM if family in DECODER_FAMILIES else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.attention_type == variant
    assert reloaded.config._attn_implementation == variant
    assert torch.equal(logits(reloaded, ids, mask), before)
    assert torch.isfinite(before).all()


@pytest.mark.parametrize("family,variant", [(f, v) for f, v in FAMILY_VARIANTS if v != "full"])
def test_variant_state_is_deterministic_when_a_stock_checkpoint_is_loaded_into_a_variant_class(
    family, variant, saved_models
):
    """transformers builds on the meta device: new state must be initialised from the seed, not left as garbage."""
    source_config = AutoConfig.from_pretrained(saved_models[family])
    fields = {k: v for k, v in source_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    config = VARIANT_CONFIGS[family](attention_type=variant, **fields)
    model_class = VARIANT_MODELS[family][source_config.architectures[0]]
    first = model_class.from_pretrained(saved_models[family], config=config)
    second = hv.convert(saved_models[family], attention=variant)
    states_a, states_b = first.variant_states(), second.variant_states()
    assert states_a and states_a.keys() == states_b.keys()
    for name in states_a:
        tensors_b = states_b[name].state_dict()
        for key, a in states_a[name].state_dict().items():
            b = tensors_b[key]
            assert torch.equal(a, b), f"{name}.{key}"
            assert a.abs().max() < 100, f"{name}.{key} looks uninitialised"


def test_every_family_head_resolves_through_the_auto_classes():
    registered = 0
    for family, classes in VARIANT_MODELS.items():
        config = VARIANT_CONFIGS[family](num_hidden_layers=1)
        assert type(AutoConfig.for_model(config.model_type)) is VARIANT_CONFIGS[family]
        for base_name, model_class in classes.items():
            for auto_name in FAMILY_TABLE[family].head_classes[base_name]:
                auto = getattr(transformers, auto_name)
                assert auto._model_mapping[VARIANT_CONFIGS[family]] is model_class
                registered += 1
    assert registered >= 33


@pytest.mark.parametrize("variant", ["performer", "bigbird", "lsh"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_parameter_free_variants_run_on_stock_checkpoints(family, variant, tmp_path):
    tiny_model(family, max_positions=640).base_model.save_pretrained(tmp_path)
    stock = AutoModel.from_pretrained(tmp_path, attn_implementation=variant).eval()
    ids, mask = batch_with_padding(length=600, pad=50)  # long enough for BigBird's defaults to be sparse
    exact_model = AutoModel.from_pretrained(tmp_path).eval()
    converted = hv.convert(exact_model, attention=variant)
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        b = converted(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = exact_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same default state from the same seed
    assert not torch.allclose(a, exact, atol=1e-4), "the variant did not run"


def test_linformer_on_a_stock_checkpoint_says_to_convert(saved_models):
    model = AutoModel.from_pretrained(saved_models["bert"], attn_implementation="linformer")
    with pytest.raises(ValueError, match="Convert the model first"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))


def test_model_without_attention_interface_gets_a_clear_error():
    config = BigBirdConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, sep_token_id=1)
    with pytest.raises(ValueError, match="does not route its attention"):
        AutoModel.from_config(config, attn_implementation="performer")


def test_switching_a_converted_model_to_another_variant_is_refused():
    model = hv.convert(tiny_model("bert"), attention="performer")
    model.set_attn_implementation("lsh")
    with pytest.raises(ValueError, match="converted for attention 'performer'"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))


def test_converted_model_can_be_compared_against_full_attention():
    source = tiny_model("bert")
    model = hv.convert(source, attention="performer")
    ids, mask = batch_with_padding()
    model.set_attn_implementation("full")
    torch.testing.assert_close(logits(model, ids, mask), logits(source, ids, mask), atol=1e-5, rtol=0)


def test_the_model_classes_file_is_what_the_family_table_generates():
    """model_classes.py is written out (findable by name) but generated: it must match the table."""
    from pathlib import Path

    from hf_attn_variants.modeling.families import render_model_classes

    generated = Path(hv.__file__).parent / "modeling" / "model_classes.py"
    assert generated.read_text() == render_model_classes(), "run: python scripts/generate_model_classes.py"
    text = generated.read_text()
    for family, classes in VARIANT_MODELS.items():
        for base_name, model_class in classes.items():
            assert f"class AttnVariant{base_name}(AttentionVariantMixin, {base_name}):" in text
            assert model_class.family == family and model_class.__module__.endswith("model_classes")


def test_every_family_table_path_resolves_on_a_real_model():
    """Each dotted path of the table names a module of the family's models (a typo would only show when pruning)."""
    for name, family in FAMILY_TABLE.items():
        model = hv.convert(tiny_model(name), attention="full")
        block = family.blocks_of(model)[0]
        attention = block.get_submodule(family.attention)
        assert family.is_variant_attention(attention)
        for path in (family.attention_output, *family.ffn_inputs, family.ffn_output):
            assert isinstance(block.get_submodule(path), torch.nn.Module)
        for projection in family.projections:
            assert attention.get_submodule(projection).weight.dim() == 2
        for attribute, _ in family.head_attributes:
            assert isinstance(getattr(attention, attribute), int)
        keys = model.state_dict().keys()
        assert (family.position_key is None) or any(k.endswith(family.position_key) for k in keys)
        assert family.causal == model.config.is_causal_family()
