"""generate() on converted decoders: the KV cache changes nothing, and 'full' generates what the source does."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, tiny_model

import hf_attn_variants as hv

# Settings small enough that a 20-token prompt already runs the sparse/hashed paths.
SMALL = {
    "performer": {"num_features": 64, "chunk_size": 8},
    "bigbird": {"block_size": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1},
    "lsh": {"bucket_size": 4, "num_buckets": 4, "num_hashes": 2},
}


def greedy(model, prompt, use_cache, new_tokens=12):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=use_cache, pad_token_id=0,
        )


PROMPT = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", sorted(SMALL))
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_cached_and_uncached_greedy_generation_agree(family, variant):
    model = hv.convert(tiny_model(family), attention=variant, **SMALL[variant])
    cached = greedy(model, PROMPT, use_cache=True)
    uncached = greedy(model, PROMPT, use_cache=False)
    assert cached.shape[1] == PROMPT.shape[1] + 12
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", sorted(SMALL))
def test_cached_decoding_logits_match_the_full_pass(variant):
    """Stronger than equal tokens: every decoding step's logits equal the uncached forward's last row."""
    model = hv.convert(tiny_model("llama"), attention=variant, **SMALL[variant])
    tokens = greedy(model, PROMPT, use_cache=True)
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :20], use_cache=True)
        cache = out.past_key_values
        for position in range(20, tokens.shape[1]):
            step = model(tokens[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, -1], full[:, position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_full_variant_generates_exactly_what_the_source_generates(family):
    source = tiny_model(family)
    converted = hv.convert(source, attention="full")
    assert torch.equal(greedy(converted, PROMPT, True), greedy(source, PROMPT, True))


def test_padded_batch_generation_matches_single_rows():
    """Left-padded batches: each row generates what it generates alone."""
    model = hv.convert(tiny_model("llama"), attention="performer", **SMALL["performer"])
    short = PROMPT[:, 5:]
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 5), 2), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    alone = greedy(model, short, use_cache=True, new_tokens=6)
    assert torch.equal(together[1, 5:], alone[0])


HYBRID = {"kernel": "learned", "num_features": 16, "window": 4}  # 20-token prompt: 5 windows, linear part used


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hybrid_performer_cached_generation_matches_uncached(family):
    model = hv.convert(tiny_model(family), attention="performer", **HYBRID)
    assert torch.equal(greedy(model, PROMPT, use_cache=True), greedy(model, PROMPT, use_cache=False))


def test_hybrid_performer_left_padding_amount_leaves_logits_unchanged():
    model = hv.convert(tiny_model("llama"), attention="performer", **HYBRID)
    with torch.no_grad():
        alone = model(PROMPT).logits[:, -1]
        for pad in (1, 3):
            padded = torch.cat([torch.full((1, pad), 2), PROMPT], dim=1)
            mask = torch.ones_like(padded)
            mask[:, :pad] = 0
            out = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
