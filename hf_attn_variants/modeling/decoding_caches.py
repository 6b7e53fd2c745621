"""transformers ``Cache`` classes that make decoding with the efficient variants cheaper than with exact attention.

``RecurrentStateCache`` (Performer) keeps running sums instead of keys and values. ``BucketIndexCache`` (LSH) keeps
keys and values plus, per hash round and bucket, the positions of the most recent keys, so a new token finds its
bucket's keys without re-hashing or re-sorting the context. Both it and ``GrowingCache`` (BigBird) append keys into
spare capacity rather than concatenating, so a step does not copy the whole cache.

Performer:

Causal FAVOR+ attention is a recurrence: out_t = phi(q_t) S_t / phi(q_t) z_t with S_t = sum_{s<=t} phi(k_s) v_s^T and
z_t = sum phi(k_s). Per layer this cache holds (S, z) as one [B, H, m, D + 1] state and the stabiliser (the running
max of the key feature logits), so each new token costs O(m D) and reads nothing of the past: constant time and
memory in the context length. ``generate`` gets it automatically for Performer decoders (see
``AttentionVariantMixin._prepare_cache_for_generation``); pass ``cache=RecurrentStateCache()`` to ``forward`` to
use it by hand.

How the attention function finds its layer: the attention module calls ``cache.update(key, value, layer_idx)``
before the attention function; this layer returns the new tokens' key/value with itself attached to the key tensor
(``DECODING_LAYER_ATTRIBUTE``), and ``performer_attention_forward`` continues the recurrence from its state.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

DECODING_LAYER_ATTRIBUTE = "hf_attn_variants_decoding_layer"


class RecurrentStateLayer(CacheLayerMixin):
    """One layer's running Performer state: ``state`` [B, H, m, D + 1] (sum phi(k) [v, 1]^T, relative to exp(shift))
    and ``shift`` [B, H, 1, 1] (None for the ReLU kernel), over ``length`` tokens."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new tokens and hand them on, tagged with this layer; nothing of them is stored here."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        setattr(key_states, DECODING_LAYER_ATTRIBUTE, self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held (constant in the context length)."""
        return sum(t.numel() * t.element_size() for t in (self.state, self.shift) if t is not None)

    def reset(self) -> None:
        self.state, self.shift, self.length = None, None, 0
        self.is_initialized = False

    def _apply(self, function) -> None:
        self.state = None if self.state is None else function(self.state)
        self.shift = None if self.shift is None else function(self.shift)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._apply(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                "the Performer's recurrent cache keeps running sums, not past keys, so it cannot drop tokens (as "
                "assisted or speculative decoding asks). Pass cache_implementation='dynamic' to generate() to decode "
                "with a key/value cache instead."
            )


class RecurrentStateCache(Cache):
    """A cache of ``RecurrentStateLayer``s, one created per attention layer as decoding reaches it."""

    def __init__(self, **kwargs):
        super().__init__(layer_class_to_replicate=RecurrentStateLayer)

    def nbytes(self) -> int:
        """Bytes held by every layer's state (constant in the context length)."""
        return sum(layer.nbytes() for layer in self.layers)


class GrowingLayer(DynamicLayer):
    """A key/value cache layer that appends into spare capacity instead of ``torch.cat``-ing the whole cache.

    transformers' ``DynamicLayer`` copies every cached key and value at each step (O(context) per token). For the
    sparse variants, whose attention reads O(1) keys per token, that copy is most of a decoding step. Here the keys
    and values live in buffers [B, H, capacity, D] grown by half again when full (amortised O(1) per token);
    ``keys``/``values`` are views of the first ``length`` rows, so everything ``DynamicLayer`` does (crop, beam
    reordering, batch selection) still works: a method that replaces the views with new tensors makes the next
    update copy them into fresh buffers. With autograd recording (training with ``use_cache=True``) it falls back to
    concatenation, as in-place writes would break the graph."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self.key_buffer = self.value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._views_fit(key_states, value_states, length + new):
            capacity = (length + new) * 3 // 2 + 64
            self.key_buffer = self._grown(self.keys, key_states, length, capacity)
            self.value_buffer = self._grown(self.values, value_states, length, capacity)
        self.key_buffer[:, :, length : length + new].copy_(key_states)
        self.value_buffer[:, :, length : length + new].copy_(value_states)
        self.keys = self.key_buffer[:, :, : length + new]
        self.values = self.value_buffer[:, :, : length + new]
        return self.keys, self.values

    def _views_fit(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int) -> bool:
        """Whether ``keys``/``values`` are still the leading rows of the buffers and ``length`` rows fit."""
        buffers = (self.key_buffer, self.value_buffer)
        if any(b is None for b in buffers) or length > self.key_buffer.shape[2]:
            return False
        return all(
            b.shape[:2] == new.shape[:2] and b.shape[3] == new.shape[3] and b.dtype == new.dtype
            and (old.numel() == 0 or (old.data_ptr() == b.data_ptr() and old.stride() == b.stride()))
            for b, old, new in zip(buffers, (self.keys, self.values), (key_states, value_states), strict=True)
        )

    @staticmethod
    def _grown(old: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(new.shape[:2] + (capacity, new.shape[3]))
        if length:
            buffer[:, :, :length].copy_(old)
        return buffer

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None

    def nbytes(self) -> int:
        """Bytes held: the buffers with their spare capacity (or the concatenated keys and values under autograd)."""
        held = (self.key_buffer, self.value_buffer) if self.key_buffer is not None else (self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


class GrowingCache(Cache):
    """A cache of ``GrowingLayer``s: a key/value cache whose per-token cost does not grow with the context."""

    def __init__(self, **kwargs):
        super().__init__(layer_class_to_replicate=GrowingLayer)


class BucketIndexLayer(GrowingLayer):
    """A key/value cache layer plus LSH's bucket index: ``recent`` [B, H, rounds, buckets, c] holds, per hash round
    and bucket, the positions of the c most recent keys hashed there (-1 = empty), oldest first. The index is built
    by the attention function at prefill and extended one key at a time while decoding; anything that rewrites the
    cache (crop) drops it and the next step rebuilds it from the keys."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.recent: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        # Tag a new view, not the tensor this layer holds: tagging that would make a reference cycle (layer ->
        # keys -> layer) that keeps the whole cache alive after its last use, until the cyclic collector runs.
        keys = keys.view_as(keys)
        setattr(keys, DECODING_LAYER_ATTRIBUTE, self)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.recent = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.recent = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.recent is not None:
            self.recent = self.recent.index_select(0, beam_idx.to(self.recent.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.recent is not None:
            self.recent = self.recent.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.recent is not None:
            self.recent = self.recent[indices]


class BucketIndexCache(Cache):
    """A cache of ``BucketIndexLayer``s, one created per attention layer as decoding reaches it."""

    def __init__(self, **kwargs):
        super().__init__(layer_class_to_replicate=BucketIndexLayer)


def decoding_layer(key: torch.Tensor):
    """The decoding cache layer (RecurrentStateLayer, BucketIndexLayer) the key tensor came from, or None."""
    return getattr(key, DECODING_LAYER_ATTRIBUTE, None)
