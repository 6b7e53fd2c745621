"""Helpers shared by the attention variants.

Notation used in every variant module: B batch, H query heads, Lq query length, Lk key/value length, D head dim.
Query i sits at absolute position ``Lk - Lq + i`` (decoding with a KV cache gives Lq < Lk).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import flash_attention_mask

__all__ = [
    "SettingsBase",
    "expand_kv_heads",
    "key_padding_mask",
    "exact_attention",
    "masked_fill_value",
    "padding_mask",
    "per_unpadded_row",
]


@dataclasses.dataclass
class SettingsBase:
    """Base of each variant's settings: typed fields, validated on construction."""

    variant = "base"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("positive_int") and not _is_positive_int(value):
                raise ValueError(
                    f"{self.variant} setting {field.name}={value!r} must be a positive integer; "
                    f"pass e.g. {field.name}={field.default}."
                )
            if field.metadata.get("non_negative_int") and not (_is_int(value) and value >= 0):
                raise ValueError(
                    f"{self.variant} setting {field.name}={value!r} must be an integer >= 0; "
                    f"pass e.g. {field.name}={field.default}."
                )
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(
                    f"{self.variant} setting {field.name}={value!r} is not one of {list(choices)}."
                )

    def keys_attended(self, length: int, causal: bool) -> float:
        """The FLOP model: how many key rows each query's attention costs at ``length`` tokens (the width that
        scales the attention core's 4 N keys D FLOPs; the benchmark's floor)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (what the config stores)."""
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def expand_kv_heads(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor):
    """Repeat grouped key/value heads (GQA) to the query head count: [B, Hkv, Lk, D] -> [B, H, Lk, D]."""
    groups = getattr(module, "num_key_value_groups", 1)
    return repeat_kv(key, groups), repeat_kv(value, groups)


def key_padding_mask(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """Normalise the mask a variant receives into a boolean key mask [B, Lk] (True = real token), or None.

    The variants are registered with a 2-D padding mask function, so ``attention_mask`` is None or [B, >= Lk].
    A 4-D (N x N) mask means a caller built one by hand: that defeats linear memory, so it is refused.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"hf_attn_variants' efficient attention takes a 2-D padding mask [batch, length], got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Pass the tokenizer's "
            "attention_mask (1 = token, 0 = padding) instead of a prepared 4-D mask."
        )
    mask = attention_mask[:, -key.shape[2] :]
    if mask.dtype != torch.bool:
        mask = mask > 0
    # padding_mask says once per forward whether there is padding; only masks from elsewhere need a look (a host
    # sync) to find out.
    has_padding = getattr(attention_mask, HAS_PADDING_ATTRIBUTE, None)
    if has_padding is False or (has_padding is None and bool(mask.all())):
        return None
    return mask


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask the linear-memory variants get (registered in AttentionMaskInterface): a 2-D [B, filled] bool key
    mask, None when every key is a real token. Never N x N.

    transformers' ``flash_attention_mask`` plus one case it leaves out: a preallocated (static) cache passes
    ``kv_length`` = its capacity while only ``q_offset + q_length`` slots are filled. The mask's length then says
    how many keys are real, even without padding, and the variants drop the unfilled slots (``prepare_call``).
    """
    filled = int(q_offset) + q_length  # a tensor for static caches: one host read per forward, not per layer
    if filled < kv_length:
        if attention_mask is None:
            return _tagged(torch.ones(batch_size, filled, dtype=torch.bool, device=device), False)
        mask = attention_mask[:, -filled:].bool()
        return _tagged(mask, not bool(mask.all()))  # one host read per forward
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask)
    if mask is not None and mask.shape[1] == kv_length:  # transformers returned it because something is padding
        _tagged(mask, True)
    return mask


HAS_PADDING_ATTRIBUTE = "hf_attn_variants_has_padding"
"""Set by ``padding_mask`` on the mask it returns, so the layers need not look at the mask to know."""


def _tagged(mask: torch.Tensor, has_padding: bool) -> torch.Tensor:
    setattr(mask, HAS_PADDING_ATTRIBUTE, has_padding)
    return mask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax/feature arithmetic runs in: at least fp32 (bf16/fp16 are upcast), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def masked_fill_value(dtype: torch.dtype) -> float:
    """A large finite negative logit: fully masked rows give a uniform softmax instead of NaN."""
    return torch.finfo(dtype).min / 2


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Exact softmax attention through SDPA (used for short inputs only: it builds an Lq x Lk mask).

    query [B, H, Lq, D], key/value [B, H, Lk, D], key_mask [B, Lk] bool or None. Returns [B, H, Lq, D].
    """
    lq, lk = query.shape[2], key.shape[2]
    allowed = None
    if is_causal:
        q_pos = torch.arange(lk - lq, lk, device=query.device)
        allowed = (torch.arange(lk, device=query.device)[None, :] <= q_pos[:, None])[None, None]
    if key_mask is not None:
        pad = key_mask[:, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    bias = None
    if allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~allowed, masked_fill_value(query.dtype))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)


STATE_ATTRIBUTE = "attn_variant"
"""Name of the submodule holding a variant's parameters/buffers on each attention module (PEFT's modules_to_save)."""

DEFAULT_STATE_ATTRIBUTE = "attn_variant_default"
"""Submodule name of the state a stock model builds for ``attn_implementation=NAME``: registered (so ``.to()``,
``.half()`` and device moves find it) but not persistent (saving the stock model is unchanged)."""


class VariantState(torch.nn.Module):
    """Parameters/buffers one variant keeps on one attention module; rebuilt identically from (settings, seed)."""

    settings_class: type[SettingsBase] = SettingsBase

    def __init__(self, settings: SettingsBase, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__()
        self.settings = settings
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.seed = seed

    @classmethod
    def for_stock_model(
        cls, settings: SettingsBase, num_heads: int, head_dim: int, max_positions: int, seed: int
    ) -> VariantState:
        """State for a stock model run with ``attn_implementation=NAME`` (no conversion)."""
        return cls(settings, num_heads, head_dim, max_positions, seed)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from this module's seed, so draws are identical on every device and reload."""
        return torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + salt)

    def reset_parameters(self) -> None:
        """(Re)initialise the state deterministically from the seed."""

    def prune_heads(self, keep_heads: list[int]) -> None:
        """Keep only the heads ``keep_heads`` (per-head state is sliced; shared state is unchanged)."""
        self.num_heads = len(keep_heads)

    def extra_repr(self) -> str:
        return f"{self.settings}, heads={self.num_heads}, head_dim={self.head_dim}, seed={self.seed}"


def settings_from_config(config: Any, settings_class: type[SettingsBase]) -> SettingsBase:
    """The variant's settings stored on a variant config, or the defaults for a stock config."""
    if getattr(config, "attention_type", None) == settings_class.variant:
        return settings_class(**(config.attention_settings or {}))
    return settings_class()


def attention_shape(config: Any) -> tuple[int, int]:
    """(num_heads, head_dim) of a transformers text config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def state_for_module(module: torch.nn.Module, state_class: type[VariantState], like: torch.Tensor) -> VariantState:
    """The variant state of an attention module.

    Converted models carry it as ``module.attn_variant`` (saved with the weights). A stock model loaded with
    ``attn_implementation=NAME`` has none: a parameter-free variant then builds its default state from the seed
    (kept outside the state dict, so saving the stock model is unchanged); a learned one raises.
    """
    state = unwrap_trainable_copy(getattr(module, STATE_ATTRIBUTE, None))
    if state is not None:
        if not isinstance(state, state_class):
            raise ValueError(
                f"This model was converted for attention '{type(state).settings_class.variant}' but is running "
                f"'{state_class.settings_class.variant}'. Load it without attn_implementation, or convert it again "
                f"with hf_attn_variants.convert(model, attention='{state_class.settings_class.variant}')."
            )
        return state
    state = getattr(module, DEFAULT_STATE_ATTRIBUTE, None)
    if not isinstance(state, state_class):
        config = module.config
        heads, head_dim = attention_shape(config)
        settings = settings_from_config(config, state_class.settings_class)
        seed = getattr(config, "attention_seed", 0) + (getattr(module, "layer_idx", None) or 0)
        max_positions = getattr(config, "max_position_embeddings", like.shape[2])
        state = state_class.for_stock_model(settings, heads, head_dim, max_positions, seed)
        state.reset_parameters()
        for submodule in state.modules():  # not saved: the stock checkpoint stays as it was
            submodule._non_persistent_buffers_set.update(submodule._buffers)
        state.to(like.device)
        module.add_module(DEFAULT_STATE_ATTRIBUTE, state)
    return state


def unwrap_trainable_copy(state: torch.nn.Module | None) -> torch.nn.Module | None:
    """The state module to compute with when PEFT wrapped it (LoRA with ``modules_to_save=["attn_variant"]``):
    the active adapter's trainable copy, or the original when adapters are disabled. Duck-typed: no peft import."""
    copies = getattr(state, "modules_to_save", None)
    if copies is None:
        return state
    active = [name for name in getattr(state, "active_adapters", []) if name in copies]
    if getattr(state, "disable_adapters", False) or not active:
        return state.original_module
    return copies[active[0]]


@dataclasses.dataclass
class AttentionCall:
    """What every variant's interface function derives from its arguments before the computation."""

    state: VariantState
    key: torch.Tensor  # [B, H, Lk, D], key/value heads repeated for GQA
    value: torch.Tensor
    key_mask: torch.Tensor | None  # [B, Lk] bool, None without padding
    is_causal: bool
    scaling: float


def prepare_call(
    module: torch.nn.Module,
    state_class: type[VariantState],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None = None,
) -> AttentionCall:
    """The state, GQA-expanded key/value, boolean padding mask, causality and scale of an interface call.

    Causality is ``is_causal`` when the caller passes it (as transformers' SDPA honours), else ``module.is_causal``.
    """
    state = state_for_module(module, state_class, query)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < key.shape[2]:
        # A static cache: key slots past the mask are preallocated but not yet written (see padding_mask).
        key, value = key[:, :, : attention_mask.shape[1]], value[:, :, : attention_mask.shape[1]]
    key, value = expand_kv_heads(module, key, value)
    return AttentionCall(
        state=state,
        key=key,
        value=value,
        key_mask=key_padding_mask(attention_mask, key),
        is_causal=bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)),
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
    )


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of ``size`` rows covering ``length``."""
    return [(lo, min(lo + size, length)) for lo in range(0, length, size)]


def per_unpadded_row(attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_mask: torch.Tensor | None) -> torch.Tensor:
    """Run ``attend(query, key, value)`` on each batch row with its padding removed, so a position-dependent pattern
    (BigBird's block grid, LSH's positional window) counts real tokens only and the padding amount cannot move a
    real output. query [B, H, Lq, D] (query i at key position Lk - Lq + i), key/value [B, H, Lk, D], key_mask
    [B, Lk] bool or None. Padded query rows get zeros. Returns [B, H, Lq, D].
    """
    if key_mask is None:
        return attend(query, key, value)
    lq, lk = query.shape[2], key.shape[2]
    rows = []
    for b in range(query.shape[0]):
        real = key_mask[b].nonzero().squeeze(1)  # real keys, in order; the real queries are the last of them
        real_queries = real[real >= lk - lq] - (lk - lq)
        out = query.new_zeros(1, *query.shape[1:])
        if real_queries.numel():  # a row whose queries are all padding keeps zeros
            part = attend(query[b : b + 1].index_select(2, real_queries), key[b : b + 1].index_select(2, real),
                          value[b : b + 1].index_select(2, real))
            out = out.index_copy(2, real_queries, part.to(out.dtype))
        rows.append(out)
    return torch.cat(rows)


def leading_positions(key_mask: torch.Tensor | None, key_length: int, count: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first ``count`` real keys of each row and which exist ([B or 1, count] each; a row with
    fewer real keys has padding there)."""
    if key_mask is None:
        position = torch.arange(count, device=device).unsqueeze(0)
        return position, position < key_length
    rank = key_mask.cumsum(-1) - 1
    firsts = [(key_mask & (rank == j)) for j in range(count)]
    return torch.stack([f.int().argmax(-1) for f in firsts], -1), torch.stack([f.any(-1) for f in firsts], -1)


def leading_keys(key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None,
                 count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``count`` real keys and values of each row, [B, H, count, D] each, their positions and which
    exist ([B or 1, count] each; see leading_positions)."""
    position, exists = leading_positions(key_mask, key.shape[2], count, key.device)
    if key_mask is None:
        return key[:, :, :count], value[:, :, :count], position, exists
    index = position[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
    return key.gather(2, index), value.gather(2, index), position, exists


def interface_output(out: torch.Tensor) -> tuple[torch.Tensor, None]:
    """[B, H, Lq, D] -> the interface's ([B, Lq, H, D], None)."""
    return out.transpose(1, 2).contiguous(), None


def log_sum_exp_combine(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine partial softmax outputs [B, H, L, D] weighted by their log-normalisers [B, H, L].

    A running sum rather than one stacked product: autograd then keeps only the small weights (the outputs are
    alive anyway), not an R x [B, H, L, D] stack.
    """
    total = torch.logsumexp(torch.stack(lses), dim=0)
    combined = None
    for out, lse in zip(outputs, lses, strict=True):
        part = out * torch.exp(lse - total).unsqueeze(-1)
        combined = part if combined is None else combined + part
    return combined
