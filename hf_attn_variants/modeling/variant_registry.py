"""The table of attention variants and their registration with transformers' attention and mask interfaces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from .attention_common import SettingsBase, VariantState, padding_mask
from .bigbird_attention import BigBirdSettings, BigBirdState, bigbird_attention_forward
from .full_attention import FullSettings, full_attention_forward, full_attention_mask
from .linformer_attention import LinformerSettings, LinformerState, linformer_attention_forward
from .lsh_attention import LSHSettings, LSHState, lsh_attention_forward
from .performer_attention import PerformerSettings, PerformerState, performer_attention_forward


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One attention variant: its interface function, mask builder, settings and state classes, what it can do, and
    what its model card and the benchmark say of it. The settings class also carries the FLOP model
    (``settings.keys_attended(length, causal)``)."""

    name: str
    forward: Callable
    mask: Callable
    settings: type[SettingsBase]
    state: type[VariantState] | None
    causal: bool  # runs in decoders
    learned: bool  # its state has parameters that need training (LoRA puts them in modules_to_save)
    summary: str  # one line: what it computes
    new_state: str | None  # the state a conversion adds, as the model card lists it
    limitations: str
    peers: tuple[str, ...] = ()  # benchmark methods implementing the same idea elsewhere


# Linear-memory variants get padding_mask: a 2-D [B, Lk] padding mask (None without padding), never N x N.
VARIANTS: dict[str, Variant] = {
    "full": Variant(
        name="full", forward=full_attention_forward, mask=full_attention_mask, settings=FullSettings, state=None,
        causal=True, learned=False, summary="exact softmax attention through SDPA", new_state=None,
        limitations="Exact attention: quadratic memory in length, as the source.",
    ),
    "linformer": Variant(
        name="linformer", forward=linformer_attention_forward, mask=padding_mask, settings=LinformerSettings,
        state=LinformerState, causal=False, learned=True,
        summary="keys and values projected along the sequence to a fixed length k; linear in length",
        new_state="`attn_variant.proj_k`, `attn_variant.proj_v`: learned sequence projections",
        limitations="Not causal; inputs are limited to the projection's max length.",
        peers=("lucidrains-linformer",),
    ),
    "performer": Variant(
        name="performer", forward=performer_attention_forward, mask=padding_mask, settings=PerformerSettings,
        state=PerformerState, causal=True, learned=False,
        summary="FAVOR+ positive orthogonal random features for the softmax kernel; linear in length",
        new_state="`attn_variant.features`: the random feature matrix",
        limitations="Random-feature error grows with the size of the attention logits.",
        peers=("lucidrains-performer",),
    ),
    "bigbird": Variant(
        name="bigbird", forward=bigbird_attention_forward, mask=padding_mask, settings=BigBirdSettings,
        state=BigBirdState, causal=True, learned=False,
        summary="block-sparse: sliding window, global and random blocks; linear in length",
        new_state="`attn_variant.random_table`: the draws choosing random blocks",
        limitations="Exact only for inputs the block pattern covers; random blocks are shared by a layer's heads.",
        peers=("hf-bigbird",),
    ),
    "lsh": Variant(
        name="lsh", forward=lsh_attention_forward, mask=padding_mask, settings=LSHSettings, state=LSHState,
        causal=True, learned=False,
        summary="angular locality-sensitive hashing of queries and keys (Reformer-style); linear in length",
        new_state="`attn_variant.rotations`: the hashing rotations",
        limitations="Keys in other buckets and outside the positional window are not seen.",
        peers=("hf-reformer-1", "hf-reformer-2", "hf-reformer-4"),
    ),
}


def get_variant(name: str) -> Variant:
    """The variant called ``name``, or a ValueError listing the known ones."""
    if name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return VARIANTS[name]


def resolve_settings(name: str, settings: dict[str, Any] | None) -> SettingsBase:
    """Validated settings of variant ``name`` from a plain dict (defaults filled in).

    A key belonging to another variant gets an error that says so, instead of a bare 'unexpected keyword'.
    """
    variant = get_variant(name)
    settings = dict(settings or {})
    known = {f.name for f in dataclasses.fields(variant.settings)}
    for key in settings:
        if key in known:
            continue
        owners = [
            other.name
            for other in VARIANTS.values()
            if key in {f.name for f in dataclasses.fields(other.settings)}
        ]
        hint = f" It is a setting of {', '.join(owners)}." if owners else ""
        allowed = f"Settings of {name}: {sorted(known)}." if known else f"'{name}' takes no settings."
        raise ValueError(f"unknown setting {key!r} for attention '{name}'.{hint} {allowed}")
    return variant.settings(**settings)


def register_variants() -> None:
    """Register every variant under its name in AttentionInterface and AttentionMaskInterface (idempotent)."""
    for variant in VARIANTS.values():
        AttentionInterface.register(variant.name, variant.forward)
        AttentionMaskInterface.register(variant.name, variant.mask)


def install_backend_guard() -> None:
    """Make ``attn_implementation=<variant>`` fail clearly on models that do not call the attention interface.

    transformers accepts any registered name for any model; one whose attention does not go through
    AttentionInterface (BigBird, Reformer, ...) would silently keep its own attention. Idempotent.
    """
    original = PreTrainedModel.get_correct_attn_implementation
    if getattr(original, "_hf_attn_variants_guard", False):
        return

    def guarded(self, requested_attention, is_init_check=False):
        if requested_attention in VARIANTS and not self.is_backend_compatible():
            raise ValueError(
                f"{type(self).__name__} does not route its attention through transformers' AttentionInterface, "
                f"so attn_implementation='{requested_attention}' would be silently ignored. Use a model that does "
                "(BERT, RoBERTa, GPT-2, Llama, Qwen2, Mistral) or convert one with hf_attn_variants.convert()."
            )
        return original(self, requested_attention, is_init_check)

    guarded._hf_attn_variants_guard = True
    guarded.__doc__ = original.__doc__
    PreTrainedModel.get_correct_attn_implementation = guarded


register_variants()
install_backend_guard()
