"""Regression tests for the defects transformers' own model tests found (static cache, half-precision builds,
meta-device init, padding-dependent sparse patterns, an explicit attn_implementation).

Every shape here runs the approximate path: BigBird with more key blocks than its pattern covers, LSH with more
tokens than one bucket window, Performer with several chunks, Linformer with k below the length.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, EFFICIENT, tiny_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_attn_variants as hv
from hf_attn_variants.modeling.attention_common import VariantState

SMALL = {
    "linformer": {"k": 8},
    "performer": {"num_features": 64, "chunk_size": 8},
    "bigbird": {"block_size": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1},
    "lsh": {"bucket_size": 4, "num_buckets": 4, "num_hashes": 2},
}
CAUSAL = ("performer", "bigbird", "lsh")
LENGTH = 40  # BigBird: 10 blocks of 4 > the 4-5 its pattern covers; LSH: 40 tokens >> c = 4


def test_shapes_reach_the_approximate_paths():
    settings = hv.modeling.resolve_settings("bigbird", SMALL["bigbird"])
    assert LENGTH // 4 > settings.dense_below(True) and LENGTH // 4 > settings.dense_below(False)
    assert LENGTH > 2 * SMALL["lsh"]["bucket_size"] and LENGTH > SMALL["linformer"]["k"]


def _generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=2, **kwargs)


@pytest.mark.parametrize("variant", CAUSAL)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_cache_generates_what_the_dynamic_cache_does(family, variant):
    model = hv.convert(tiny_model(family), attention=variant, **SMALL[variant])
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    dynamic = _generate(model, ids, mask)
    static = _generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_static_cache_step_logits_match_the_full_pass():
    """Beyond equal tokens: with a preallocated cache, every decoding step equals the uncached forward."""
    from transformers import StaticCache

    model = hv.convert(tiny_model("llama"), attention="bigbird", **SMALL["bigbird"])
    tokens = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens).logits
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(tokens[:, :20], past_key_values=cache, use_cache=True)
        for position in range(20, 30):
            step = model(tokens[:, position : position + 1], past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([position]))
            torch.testing.assert_close(step.logits[:, -1], full[:, position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", EFFICIENT)
def test_half_precision_build_draws_the_float32_state(variant, dtype):
    family = "bert" if variant == "linformer" else "llama"
    reference = hv.convert(tiny_model(family), attention=variant, **SMALL[variant])
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    half = auto.from_config(reference.config, dtype=dtype)
    assert half.dtype == dtype
    states, expected = _states(half), _states(reference)
    assert states.keys() == expected.keys() and states
    for name, tensor in states.items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def _states(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": tensor for name, module in model.named_modules() if isinstance(module, VariantState)
            for key, tensor in module.state_dict().items()}


@pytest.mark.parametrize("variant", EFFICIENT)
def test_init_weights_after_a_meta_device_build_initialises_the_state(variant):
    """accelerate/FSDP build on the meta device, then to_empty() + init_weights(): the state must come out as the
    seed draws it, also in head classes whose inner base model is a stock transformers model."""
    family = "bert" if variant == "linformer" else "llama"
    reference = hv.convert(tiny_model(family), attention=variant, **SMALL[variant])
    for auto in (AutoModelForSequenceClassification, AutoModelForCausalLM if family == "llama" else None):
        if auto is None:
            continue
        with torch.device("meta"):
            model = auto.from_config(reference.config)
        model.to_empty(device="cpu")
        for tensor in _states(model).values():  # make garbage visible whatever to_empty left
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)
        model.init_weights()
        states, expected = _states(model), _states(reference)
        assert states.keys() == expected.keys() and states
        for name, tensor in states.items():
            assert torch.equal(tensor, expected[name]), f"{auto.__name__}: {name}"


def _encoder(variant, **extra):
    return hv.convert(tiny_model("bert"), attention=variant, **SMALL[variant], **extra)


@pytest.mark.parametrize(("variant", "extra"), [(v, {}) for v in EFFICIENT] + [("linformer", {"window": 4})])
def test_right_padding_amount_leaves_encoder_outputs_unchanged(variant, extra):
    model = _encoder(variant, **extra)
    ids = torch.randint(3, 96, (1, LENGTH), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = model(ids).logits
        for pad in (1, 3, 9):
            padded = torch.cat([ids, torch.full((1, pad), 0)], dim=1)
            mask = torch.ones_like(padded)
            mask[:, LENGTH:] = 0
            out = model(padded, attention_mask=mask).logits[:, :LENGTH]
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5, msg=f"right padding {pad}")


@pytest.mark.parametrize("variant", CAUSAL)
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_left_padding_amount_leaves_decoder_logits_unchanged(family, variant):
    model = hv.convert(tiny_model(family), attention=variant, **SMALL[variant])
    ids = torch.randint(3, 96, (1, LENGTH), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        alone = model(ids).logits[:, -1]
        for pad in (1, 3, 9):
            padded = torch.cat([torch.full((1, pad), 2), ids], dim=1)
            mask = torch.ones_like(padded)
            mask[:, :pad] = 0
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5, msg=f"left padding {pad}")


@pytest.mark.parametrize("variant", EFFICIENT)
def test_explicit_attn_implementation_wins_over_the_saved_variant(tmp_path, variant):
    source = tiny_model("bert")
    hv.convert(source, attention=variant, output_dir=tmp_path / "m", **SMALL[variant])
    from transformers import AutoModelForMaskedLM

    saved = AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    assert saved.config._attn_implementation == variant
    eager = AutoModelForMaskedLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    ids = torch.randint(3, 96, (1, LENGTH), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
        expected = source(ids).logits
    assert out.attentions is not None and out.attentions[0].shape[-1] == LENGTH
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)  # the base weights, exact attention


@pytest.mark.parametrize("variant", CAUSAL)
def test_is_causal_keyword_overrides_the_module_flag(variant):
    """transformers' SDPA honours an ``is_causal`` keyword; the variants do too."""
    from hf_attn_variants.modeling import get_variant

    model = hv.convert(tiny_model("llama"), attention=variant, **SMALL[variant])
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, LENGTH, 8, generator=generator)
    k, v = (torch.randn(1, 2, LENGTH, 8, generator=generator) for _ in range(2))  # 2 KV heads (GQA)
    forward = get_variant(variant).forward
    causal, _ = forward(module, q, k, v, None)
    forced, _ = forward(module, q, k, v, None, is_causal=False)
    assert not torch.allclose(causal, forced)
    module.is_causal = False
    try:
        bidirectional, _ = forward(module, q, k, v, None)
    finally:
        module.is_causal = True
    torch.testing.assert_close(forced, bidirectional)


@pytest.mark.parametrize("variant", ["performer", "bigbird", "lsh"])
def test_a_stock_models_default_state_is_registered_moves_with_the_model_and_is_not_saved(tmp_path, variant):
    """attn_implementation=<variant> on a stock checkpoint: the state it builds is a submodule (so .to() and
    dtype moves find it) whose buffers stay out of the state dict (saving the stock model is unchanged)."""
    from transformers import AutoModel

    from hf_attn_variants.modeling.attention_common import DEFAULT_STATE_ATTRIBUTE

    tiny_model("bert", max_positions=640).base_model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation=variant).eval()
    ids = torch.randint(5, 90, (1, 600))  # long enough for every variant's approximate path
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state.double()
    states = [m for name, m in model.named_modules() if name.endswith(DEFAULT_STATE_ATTRIBUTE)]
    assert len(states) == model.config.num_hidden_layers
    assert not any("attn_variant" in key for key in model.state_dict())
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for s in states for t in s.buffers() if t.is_floating_point())
    with torch.no_grad():
        moved = model(input_ids=ids).last_hidden_state
    assert moved.dtype == torch.float64 and (moved - expected).abs().max() < 1e-4


def test_padding_mask_says_once_whether_there_is_padding_so_layers_need_not_look():
    from hf_attn_variants.modeling.attention_common import HAS_PADDING_ATTRIBUTE, key_padding_mask, padding_mask

    key = torch.zeros(2, 1, 6, 4)
    no_padding = torch.ones(2, 6, dtype=torch.long)
    assert padding_mask(2, 6, 6, attention_mask=no_padding) is None
    padded = no_padding.clone()
    padded[0, :2] = 0
    mask = padding_mask(2, 6, 6, attention_mask=padded)
    assert getattr(mask, HAS_PADDING_ATTRIBUTE) is True and torch.equal(key_padding_mask(mask, key), padded.bool())
    static = padding_mask(2, 2, 8, q_offset=4, attention_mask=None)  # a static cache: 6 of 8 slots filled
    assert static.shape == (2, 6) and getattr(static, HAS_PADDING_ATTRIBUTE) is False
    assert key_padding_mask(static, key) is None
    # A tag is believed without a look at the values (no host sync); untagged masks are looked at.
    fake = torch.zeros(2, 6, dtype=torch.bool)
    setattr(fake, HAS_PADDING_ATTRIBUTE, False)
    assert key_padding_mask(fake, key) is None
    assert key_padding_mask(torch.ones(2, 6, dtype=torch.bool), key) is None
