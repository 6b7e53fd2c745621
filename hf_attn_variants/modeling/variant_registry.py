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


@dataclasses.dataclass(frozen=True)
class Variant:
    """One attention variant: its interface function, mask builder, settings and state classes."""

    name: str
    forward: Callable
    mask: Callable
    settings: type[SettingsBase]
    state: type[VariantState] | None
    causal: bool
    learned: bool


# Linear-memory variants get padding_mask: a 2-D [B, Lk] padding mask (None without padding), never N x N.
VARIANTS: dict[str, Variant] = {
    "full": Variant("full", full_attention_forward, full_attention_mask, FullSettings, None, True, False),
    "linformer": Variant(
        "linformer", linformer_attention_forward, padding_mask, LinformerSettings, LinformerState, False, True
    ),
    "performer": Variant(
        "performer", performer_attention_forward, padding_mask, PerformerSettings, PerformerState, True, False
    ),
    "bigbird": Variant(
        "bigbird", bigbird_attention_forward, padding_mask, BigBirdSettings, BigBirdState, True, False
    ),
    "lsh": Variant("lsh", lsh_attention_forward, padding_mask, LSHSettings, LSHState, True, False),
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
