"""Performer decoders generate in recurrent form: a cache of running sums (constant size), the same tokens and
logits as the parallel pass, left-padded batches and beam search as with a key/value cache."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, tiny_model

import hf_attn_variants as hv
from hf_attn_variants.modeling.decoding_caches import BucketIndexCache, RecurrentStateCache

SETTINGS = {"num_features": 32, "chunk_size": 8}  # a 20-token prompt spans several chunks
PROMPT = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(11))


def _generate(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
                              max_new_tokens=10, min_new_tokens=10, pad_token_id=2, **kwargs)


LSH = {"bucket_size": 4, "num_buckets": 4, "num_hashes": 2}  # a 20-token prompt: windows and buckets both used
CASES = [(family, "performer", SETTINGS, RecurrentStateCache) for family in DECODER_FAMILIES]
CASES += [(family, "lsh", LSH, BucketIndexCache) for family in ("llama", "gpt2")]


@pytest.mark.parametrize("family,variant,settings,cache_class", CASES)
def test_generate_uses_the_variants_cache_and_matches_uncached_decoding(family, variant, settings, cache_class):
    model = hv.convert(tiny_model(family), attention=variant, **settings)
    out = _generate(model, PROMPT, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, cache_class)
    assert torch.equal(out.sequences, _generate(model, PROMPT, use_cache=False))


def test_recurrent_steps_equal_the_parallel_pass_and_the_cache_does_not_grow():
    model = hv.convert(tiny_model("llama"), attention="performer", **SETTINGS)
    tokens = torch.randint(3, 96, (2, 60), generator=torch.Generator().manual_seed(12))
    sizes = {}
    with torch.no_grad():
        full = model(tokens).logits
        cache = RecurrentStateCache()
        prefill = model(tokens[:, :20], cache=cache, use_cache=True).logits
        torch.testing.assert_close(prefill, full[:, :20], atol=1e-5, rtol=1e-5)
        for position in range(20, 60):
            step = model(tokens[:, position : position + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(step[:, -1], full[:, position], atol=1e-4, rtol=1e-4)
            sizes[position] = cache.nbytes()
    assert cache.get_seq_length() == 60
    assert sizes[20] == sizes[59] > 0  # running sums: the same bytes at 21 and 60 tokens of context


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = hv.convert(tiny_model("llama"), attention="performer", **SETTINGS)
    short = PROMPT[:, 6:]
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 6), 2), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    together = _generate(model, batch, mask)
    assert torch.equal(together[0], _generate(model, PROMPT)[0])
    assert torch.equal(together[1, 6:], _generate(model, short)[0])


def test_beam_search_with_the_recurrent_cache_equals_the_key_value_cache():
    model = hv.convert(tiny_model("llama"), attention="performer", **SETTINGS)
    recurrent = _generate(model, PROMPT, num_beams=3, num_return_sequences=2)
    key_value = _generate(model, PROMPT, num_beams=3, num_return_sequences=2, cache_implementation="dynamic")
    assert torch.equal(recurrent, key_value)


def test_the_recurrent_cache_refuses_to_drop_tokens_with_a_clear_error():
    model = hv.convert(tiny_model("llama"), attention="performer", **SETTINGS)
    cache = RecurrentStateCache()
    with torch.no_grad():
        model(PROMPT, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cannot drop tokens"):
        cache.crop(-2)


def test_windowed_performer_decodes_with_a_key_value_cache():
    model = hv.convert(tiny_model("llama"), attention="performer", kernel="learned", num_features=16, window=4)
    out = _generate(model, PROMPT, return_dict_in_generate=True)
    assert not isinstance(out.past_key_values, RecurrentStateCache)
    assert torch.equal(out.sequences, _generate(model, PROMPT, use_cache=False))


def test_lsh_indexed_steps_equal_the_parallel_pass_and_the_index_stays_exact():
    from hf_attn_variants.modeling.lsh_attention import build_bucket_index, hash_rounds

    model = hv.convert(tiny_model("llama"), attention="lsh", **LSH)
    tokens = torch.randint(3, 96, (2, 50), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(tokens).logits
        cache = BucketIndexCache()
        model(tokens[:, :20], cache=cache, use_cache=True)
        for position in range(20, 50):
            step = model(tokens[:, position : position + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(step[:, -1], full[:, position], atol=1e-4, rtol=1e-4)
    layer, attention = cache.layers[1], model.model.layers[1].self_attn
    keys = layer.keys.repeat_interleave(2, dim=1)  # GQA: 2 query heads per key head
    rebuilt = build_bucket_index(hash_rounds(keys, attention.attn_variant.rotations, 4), 4, 4)
    assert torch.equal(layer.recent, rebuilt)  # appended one key at a time = built from all 50 at once


def test_lsh_beam_search_with_the_index_equals_the_key_value_cache():
    model = hv.convert(tiny_model("llama"), attention="lsh", **LSH)
    indexed = _generate(model, PROMPT, num_beams=3, num_return_sequences=2)
    assert torch.equal(indexed, _generate(model, PROMPT, num_beams=3, num_return_sequences=2,
                                          cache_implementation="dynamic"))
