"""The mixin that makes a transformers model class run an attention variant.

Nothing of transformers' modeling code is copied: each variant class is ``(AttentionVariantMixin, <transformers
class>)``, written out per family and head in model_classes.py (generated from the family table). The mixin
(1) sets the attention implementation from ``config.attention_type`` (transformers does not save
``attn_implementation``), (2) puts the variant's state (``attn_variant``) on every self-attention module, and
(3) initialises that state deterministically when a checkpoint lacks it (transformers builds on the meta device,
so new state would otherwise be uninitialised memory).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .atomic_io import atomic_save_dir
from .attention_common import STATE_ATTRIBUTE, VariantState, attention_shape
from .decoding_caches import BucketIndexCache, GrowingCache, RecurrentStateCache
from .families import FAMILIES, family_auto_map
from .pruned_shapes import apply_config_shapes
from .variant_registry import get_variant


def install_variant_states(model: torch.nn.Module, family: str) -> None:
    """Attach the variant's state (``attn_variant``) to every self-attention module of ``model``."""
    config = model.config
    is_variant_attention = FAMILIES[family].is_variant_attention
    variant = get_variant(config.attention_type)
    settings = variant.settings(**config.attention_settings)
    heads, head_dim = attention_shape(config)
    for module in model.modules():
        if not is_variant_attention(module):
            continue
        if variant.state is None:
            if hasattr(module, STATE_ATTRIBUTE):
                delattr(module, STATE_ATTRIBUTE)
            continue
        seed = config.attention_seed + (module.layer_idx or 0)
        state = variant.state(settings, heads, head_dim, config.max_position_embeddings, seed)
        if not any(t.is_meta for t in state.state_dict().values()):
            state.reset_parameters()
        setattr(module, STATE_ATTRIBUTE, state)


def _length_error(length: int, limit: int) -> ValueError:
    return ValueError(
        f"the input needs {length} positions, but this model has learned positions for {limit} only. Truncate the "
        "input, or lengthen the context: hf_attn_variants.convert(model, ..., max_position_embeddings=N) tiles "
        "the learned positions."
    )


def _check_embedding_length(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on BERT/RoBERTa embeddings: a clear error instead of a shape error deep in torch."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or kwargs.get("position_ids") is not None:
        return
    length = tokens.shape[1] + int(kwargs.get("past_key_values_length", 0) or 0)
    table = module.position_embeddings.num_embeddings
    limit = table - (module.padding_idx + 1 if hasattr(module, "create_position_ids_from_input_ids") else 0)
    if length > min(limit, module.token_type_ids.shape[1] if hasattr(module, "token_type_ids") else limit):
        raise _length_error(length, limit)


def _check_position_ids(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook on GPT-2's position embedding: a clear error instead of an index error deep in torch."""
    position_ids = args[0]
    if position_ids.numel() and int(position_ids.max()) >= module.num_embeddings:
        raise _length_error(int(position_ids.max()) + 1, module.num_embeddings)


def install_length_checks(model: torch.nn.Module, family: str) -> None:
    """Make inputs longer than the learned absolute positions fail with a message naming the fix."""
    position_key = FAMILIES[family].position_key
    if position_key is None:  # rotary positions: any length runs
        return
    if position_key.startswith("embeddings."):  # BERT-style: the embeddings block builds the position ids
        model.base_model.embeddings.register_forward_pre_hook(_check_embedding_length, with_kwargs=True)
    else:  # GPT-2: position ids go into the table
        table = model.base_model.get_submodule(position_key.removesuffix(".weight"))
        table.register_forward_pre_hook(_check_position_ids)


def decoding_cache(config):
    """A new cache of the kind this model decodes best with, or None for transformers' own choice."""
    if uses_recurrent_decoding(config):
        return RecurrentStateCache()
    if config.attention_type == "lsh" and config.is_causal_family():
        return BucketIndexCache()
    if config.attention_type == "bigbird" and config.is_causal_family():
        return GrowingCache()
    return None


def uses_recurrent_decoding(config) -> bool:
    """Whether ``generate`` decodes this model with the Performer's recurrent state cache."""
    return (config.attention_type == "performer" and config.is_causal_family()
            and not (config.attention_settings or {}).get("window"))


def _step_variant_states(model: torch.nn.Module, args) -> None:
    """Forward pre-hook: count one model forward on every variant state that counts them (Performer's redraw).
    Only training forwards count, so inference (a decoding step) skips the walk over the modules."""
    if not model.training:
        return
    for module in model.modules():
        if isinstance(module, VariantState) and hasattr(module, "step"):
            module.step(model.training)


def _tensors_loaded(state: VariantState) -> bool:
    return all(getattr(t, "_is_hf_initialized", False) for t in state.state_dict(keep_vars=True).values())


class AttentionVariantMixin:
    """Mixed in before a transformers model class; see the module docstring."""

    family: str = ""

    def __init__(self, config, *args, **kwargs):
        if config._attn_implementation_internal is None:  # an explicit attn_implementation wins, as in transformers
            config._attn_implementation_internal = config.attention_type
        super().__init__(config, *args, **kwargs)
        install_variant_states(self, self.family)
        if config.heads_per_layer is not None or config.intermediate_per_layer is not None:
            apply_config_shapes(self, self.family)
        install_length_checks(self, self.family)
        self.register_forward_pre_hook(_step_variant_states)

    def initialize_weights(self) -> None:
        """transformers' initialisation, plus every variant state whose tensors were not loaded or initialised.

        It runs for missing keys in ``from_pretrained`` and for ``init_weights()`` after a meta-device build and
        ``to_empty()``. Done here rather than in ``_init_weights`` alone: transformers dispatches the inner base model's
        modules to that stock model's own ``_init_weights``, which does not know the variant state.
        """
        fresh = [m for m in self.modules() if isinstance(m, VariantState) and not _tensors_loaded(m)]
        super().initialize_weights()
        for state in fresh:
            state.reset_parameters()
            for tensor in state.state_dict(keep_vars=True).values():
                tensor._is_hf_initialized = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VariantState):
            module.reset_parameters()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """transformers' cache choice, except where a variant decodes cheaper with its own cache (when no cache
        implementation was asked for): a causal Performer without an exact window with the recurrent state cache
        (constant time and memory per token), LSH with the bucket index cache (no re-hashing per token), BigBird with a
        key/value cache that appends without copying the context (see decoding_caches.GrowingLayer)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        replacement = decoding_cache(self.config)  # (an empty Cache is falsy: compare with None)
        if type(cache) is DynamicCache and generation_config.cache_implementation is None and replacement is not None:
            model_kwargs["cache"] = replacement

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus the modeling code (this flat folder) and a complete ``auto_map``, so
        the folder loads with ``trust_remote_code=True`` where hf_attn_variants is not installed. Written to a
        temporary folder first and moved into place (see atomic_io.atomic_save_dir): never half-written."""
        self.config.auto_map = family_auto_map(FAMILIES[self.family])
        with atomic_save_dir(save_directory) as tmp:
            return super().save_pretrained(tmp, *args, **kwargs)

    def variant_states(self) -> dict[str, VariantState]:
        """Qualified name -> variant state module, for every attention layer."""
        return {name: m for name, m in self.named_modules() if isinstance(m, VariantState)}
