"""Performer decoders generate in recurrent form: a cache of running sums (constant size), the same tokens and
logits as the parallel pass, left-padded batches and beam search as with a key/value cache. LSH decodes through its
bucket index, BigBird through a key/value cache that appends without copying the context."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, tiny_model

import hf_attn_variants as hv
from hf_attn_variants.modeling.decoding_caches import BucketIndexCache, GrowingCache, RecurrentStateCache

SETTINGS = {"num_features": 32, "chunk_size": 8}  # a 20-token prompt spans several chunks
PROMPT = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(11))


def _generate(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
                              max_new_tokens=10, min_new_tokens=10, pad_token_id=2, **kwargs)


LSH = {"bucket_size": 4, "num_buckets": 4, "num_hashes": 2}  # a 20-token prompt: windows and buckets both used
CASES = [(family, "performer", SETTINGS, RecurrentStateCache) for family in DECODER_FAMILIES]
CASES += [(family, "lsh", LSH, BucketIndexCache) for family in ("llama", "gpt2")]
BIGBIRD = {"block_size": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1}  # 20-30 tokens: sparse
CASES += [(family, "bigbird", BIGBIRD, GrowingCache) for family in ("llama", "gpt2")]


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


def left_padded_batch():
    """(the short prompt, a batch of PROMPT and the short prompt left-padded by 6, its attention mask)."""
    short = PROMPT[:, 6:]
    batch = torch.cat([PROMPT, torch.cat([torch.full((1, 6), 2), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    return short, batch, mask


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = hv.convert(tiny_model("llama"), attention="performer", **SETTINGS)
    short, batch, mask = left_padded_batch()
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


def test_growing_cache_appends_in_place_and_survives_crop_and_reordering():
    from transformers.cache_utils import DynamicLayer

    from hf_attn_variants.modeling.decoding_caches import GrowingLayer

    torch.manual_seed(0)
    growing, reference = GrowingLayer(), DynamicLayer()
    chunks = [torch.randn(3, 2, n, 4) for n in (20, 1, 1, 1)]

    def step(chunk):
        out = growing.update(chunk, chunk * 2)
        expected = reference.update(chunk, chunk * 2)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])

    step(chunks[0])
    buffer = growing.key_buffer.data_ptr()
    for chunk in chunks[1:]:
        step(chunk)
    assert growing.key_buffer.data_ptr() == buffer  # single tokens were written into spare capacity: no copy
    assert growing.key_buffer.shape[2] > growing.get_seq_length() == 23
    for layer in (growing, reference):
        layer.crop(-2)
    step(torch.randn(3, 2, 1, 4))  # overwrites the cropped rows
    beams = torch.tensor([2, 0, 0])
    for layer in (growing, reference):
        layer.reorder_cache(beams)
    step(torch.randn(3, 2, 1, 4))  # the reordered views are copied into fresh buffers
    step(torch.randn(3, 2, 200, 4))  # past the capacity: the buffers grow
    assert growing.get_seq_length() == reference.get_seq_length() == 223


def test_growing_cache_falls_back_to_concatenation_under_autograd():
    from hf_attn_variants.modeling.decoding_caches import GrowingLayer

    layer = GrowingLayer()
    key = torch.randn(1, 2, 5, 4, requires_grad=True)
    keys, _ = layer.update(key, key)
    keys.sum().backward()
    assert layer.key_buffer is None and torch.equal(key.grad, torch.ones_like(key))


def test_bigbird_cached_steps_equal_the_parallel_pass_with_left_padding():
    model = hv.convert(tiny_model("llama"), attention="bigbird", **BIGBIRD)
    short, batch, mask = left_padded_batch()
    together = _generate(model, batch, mask, return_dict_in_generate=True)
    assert isinstance(together.past_key_values, GrowingCache)
    assert torch.equal(together.sequences[0], _generate(model, PROMPT)[0])
    assert torch.equal(together.sequences[1, 6:], _generate(model, short)[0])
    assert torch.equal(together.sequences, _generate(model, batch, mask, use_cache=False))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("new_key", ["raises the running max", "stays below it"])
@pytest.mark.parametrize("per_head", [True, False], ids=["features per head", "features shared"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd on", "autograd off: state extended in place"])
def test_the_one_token_recurrent_step_equals_the_general_recurrence(kernel, new_key, per_head, grad):
    from hf_attn_variants.modeling import performer_attention as pa

    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 16, 8, generator=generator)
    if not per_head:  # every head gets head 0's features, in the [m, D] shape the step then takes
        features = features[:1].expand(3, 16, 8).contiguous()
    q, k, v = (torch.randn(2, 3, 1, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    # The key w / sqrt(scaling) has the largest logit feature w can give, |w|^2 / 2: for each head's longest w it
    # tops the prompt's keys. A near-zero key has logits near 0, below the prompt's max.
    longest = features.gather(1, features.norm(dim=-1).argmax(1)[:, None, None].expand(3, 1, 8)).double()
    k = longest.expand(2, 3, 1, 8) / 0.35**0.5 if new_key == "raises the running max" else k * 1e-3
    valid = torch.tensor([[True], [False]])  # the second row's new token is padding: the state must not move
    prompt = [torch.randn(2, 3, 9, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    _, state, shift = pa.continue_causal_favor(*prompt, features, None, 0.35, kernel, 4, None, None)
    with torch.set_grad_enabled(grad):
        step = pa.recurrent_step(q, k, v, features[0].double() if not per_head else features.double(),
                                 valid[:, None, :, None], 0.35, kernel, state.clone(), shift)
    qs, ks, v1 = pa._scaled_inputs(q, k, v, 0.35)
    run = pa.causal_pass(qs, ks, v1, pa.FeatureMap(features.double(), kernel), valid[:, None, :, None],
                         pa.causal_key_spans(1, 1, 4), state, shift)
    for got, expected in zip(step, (run.out, run.state, run.shift), strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if kernel == "softmax":  # both branches of the step's rescaling run
        assert bool((step[2] > shift).any()) == (new_key == "raises the running max")
    rescale = 1.0 if kernel == "relu" else torch.exp(shift[1] - step[2][1])
    torch.testing.assert_close(step[1][1], state[1] * rescale)  # padding added nothing


def test_a_finished_bucket_index_cache_is_freed_without_the_cyclic_collector():
    import gc
    import weakref

    model = hv.convert(tiny_model("llama"), attention="lsh", **LSH)
    cache = BucketIndexCache()
    with torch.no_grad():
        model(PROMPT, cache=cache, use_cache=True)
    gc.disable()
    try:
        layer = weakref.ref(cache.layers[0])
        del cache
        assert layer() is None  # no reference cycle holds the layer (and its keys) alive
    finally:
        gc.enable()
