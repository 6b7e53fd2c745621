"""LSH attention, Reformer-style (Kitaev et al. 2020), for the separate Q and K of converted models.

Angular LSH: bucket(x) = argmax([xR, -xR]) with random rotations R [D, n_buckets/2] per hash round, applied to
queries and keys alike. Keys are sorted by (bucket, position). Each query attends to the 2c keys of its own bucket
around its position in that order (when causal: the 2c most recent ones; c = bucket_size), plus its own key. This
is Reformer's "own chunk + previous chunk" with a sliding instead of a fixed chunk boundary: fixed boundaries move
when later tokens arrive, so past outputs would depend on the future; here a query's keys depend only on keys at
allowed positions. Rounds are combined by log-sum-exp. Padded keys get a bucket past all real ones, so padding never
moves real tokens. Queries are processed in slices with activation checkpointing: memory O(N c), never N x N.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_common import (
    SettingsBase,
    VariantState,
    expand_kv_heads,
    key_padding_mask,
    log_sum_exp_combine,
    masked_fill_value,
    state_for_module,
)

QUERY_SLICE = 512  # queries per checkpointed slice: bounds the gathered [slice, 2c + 1, D] keys and values


@dataclasses.dataclass
class LSHSettings(SettingsBase):
    """bucket_size: c (each query sees 2c same-bucket keys); num_hashes: hash rounds; num_buckets: buckets per
    round (1, or even)."""

    variant = "lsh"
    bucket_size: int = dataclasses.field(default=64, metadata={"positive_int": True})
    num_hashes: int = dataclasses.field(default=2, metadata={"positive_int": True})
    num_buckets: int = dataclasses.field(default=16, metadata={"positive_int": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_buckets > 1 and self.num_buckets % 2:
            raise ValueError(
                f"lsh setting num_buckets={self.num_buckets} must be 1 or even (angular LSH hashes to +-R x); "
                f"pass num_buckets={self.num_buckets + 1}."
            )


class LSHState(VariantState):
    """rotations: [num_hashes, D, max(num_buckets // 2, 1)] Gaussian (buffer, saved with the weights)."""

    settings_class = LSHSettings

    def __init__(self, settings: LSHSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        shape = (settings.num_hashes, head_dim, max(settings.num_buckets // 2, 1))
        self.register_buffer("rotations", torch.empty(shape))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        values = torch.randn(self.rotations.shape, generator=self.generator())
        self.rotations.copy_(values.to(self.rotations.device))


def hash_buckets(x: torch.Tensor, rotation: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Angular LSH bucket ids. x [B, H, L, D], rotation [D, n/2] -> [B, H, L] int64 in [0, num_buckets)."""
    if num_buckets == 1:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    projected = torch.matmul(x.float(), rotation.float())
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


def _attend_slice(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_index: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, n, D]; key/value [B, H, Lk, D]; key_index/allowed [B, H, n, K].
    Returns (softmax output [B, H, n, D], log-normaliser [B, H, n])."""
    bsz, heads, n, width = key_index.shape
    dim = key.shape[-1]
    flat = key_index.reshape(bsz, heads, n * width, 1).expand(-1, -1, -1, dim)
    keys = key.gather(2, flat).view(bsz, heads, n, width, dim)
    values = value.gather(2, flat).view(bsz, heads, n, width, dim)
    scores = torch.einsum("bhnd,bhnkd->bhnk", query, keys).float() * scaling
    scores = scores.masked_fill(~allowed, masked_fill_value(scores.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(query.dtype)
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout)
    return torch.einsum("bhnk,bhnkd->bhnd", probs, values), lse


def lsh_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rotations: torch.Tensor,
    key_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    settings: LSHSettings,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D] at positions Lk-Lq..; key/value [B, H, Lk, D]; rotations
    [R, D, n/2]; key_mask [B, Lk] bool or None. Returns [B, H, Lq, D]."""
    bsz, heads, lq, _ = query.shape
    lk = key.shape[2]
    device = query.device
    c = settings.bucket_size
    q_pos = torch.arange(lk - lq, lk, device=device)
    width = torch.arange(2 * c, device=device)
    outputs, lses = [], []
    for rotation in rotations:
        key_bucket = hash_buckets(key, rotation, settings.num_buckets)
        if key_mask is not None:
            key_bucket = key_bucket.masked_fill(~key_mask[:, None, :], settings.num_buckets)
        codes, order = (key_bucket * lk + torch.arange(lk, device=device)).sort(dim=-1)
        query_bucket = hash_buckets(query, rotation, settings.num_buckets)
        bucket_start = torch.searchsorted(codes, query_bucket * lk)
        bucket_end = torch.searchsorted(codes, (query_bucket + 1) * lk)
        insert = torch.searchsorted(codes, query_bucket * lk + q_pos, right=True)  # keys at positions <= query
        first = insert - (2 * c if is_causal else c)
        sorted_index = first.unsqueeze(-1) + width  # (B, H, Lq, 2c)
        in_window = (sorted_index >= bucket_start.unsqueeze(-1)) & (sorted_index < bucket_end.unsqueeze(-1))
        if is_causal:
            in_window = in_window & (sorted_index < insert.unsqueeze(-1))
        key_index = order.gather(-1, sorted_index.clamp(0, lk - 1).flatten(2)).view_as(sorted_index)
        # Each query also sees its own position's key unless the window already holds it.
        own = q_pos.expand(bsz, heads, lq)
        own_ok = ~(in_window & (key_index == own.unsqueeze(-1))).any(-1)
        if key_mask is not None:
            own_ok = own_ok & key_mask[:, None, q_pos]
        key_index = torch.cat([key_index, own.unsqueeze(-1)], dim=-1)
        allowed = torch.cat([in_window, own_ok.unsqueeze(-1)], dim=-1)
        slice_outputs, slice_lses = [], []
        for lo in range(0, lq, QUERY_SLICE):
            parts = (query[:, :, lo : lo + QUERY_SLICE], key, value)
            index_part = key_index[:, :, lo : lo + QUERY_SLICE]
            allowed_part = allowed[:, :, lo : lo + QUERY_SLICE]
            if torch.is_grad_enabled() and lq > QUERY_SLICE:
                out, lse = checkpoint(
                    _attend_slice, *parts, index_part, allowed_part, scaling, dropout, use_reentrant=False
                )
            else:
                out, lse = _attend_slice(*parts, index_part, allowed_part, scaling, dropout)
            slice_outputs.append(out)
            slice_lses.append(lse)
        outputs.append(torch.cat(slice_outputs, dim=2))
        lses.append(torch.cat(slice_lses, dim=2))
    if len(outputs) == 1:
        return outputs[0]
    return log_sum_exp_combine(outputs, lses).to(query.dtype)


def lsh_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q/k/v [B, H, L, D] -> ([B, Lq, H, D], None)."""
    state = state_for_module(module, LSHState, query)
    key, value = expand_kv_heads(module, key, value)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = lsh_attention(
        query,
        key,
        value,
        state.rotations,
        key_padding_mask(attention_mask, key),
        bool(getattr(module, "is_causal", False)),
        scaling,
        state.settings,
        dropout,
    )
    return out.transpose(1, 2).contiguous(), None
