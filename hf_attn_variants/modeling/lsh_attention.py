"""LSH attention, Reformer-style (Kitaev et al. 2020), for the separate Q and K of converted models.

Angular LSH: bucket(x) = argmax([xR, -xR]) with random rotations R [D, n_buckets/2] per hash round, applied to
queries and keys alike. Keys are sorted by (bucket, position). Each query attends to 2c keys (c = bucket_size,
Reformer's "own chunk + previous chunk"): the c keys of its own bucket nearest to it in that order (when causal:
the c most recent ones), and the c keys nearest in position (when causal: the c most recent, itself included).
Sliding windows replace Reformer's fixed chunk boundaries, which move when later tokens arrive (past outputs would
depend on the future); the positional window keeps inputs of N <= c tokens exact and
guarantees every query a key. Rounds are combined by log-sum-exp. Padded keys get a bucket past all real ones, so
padding never moves real tokens. Queries are processed in slices (checkpointed when training): memory O(N c).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_common import (
    SettingsBase,
    VariantState,
    exact_attention,
    expand_kv_heads,
    key_padding_mask,
    log_sum_exp_combine,
    masked_fill_value,
    state_for_module,
)

GATHER_BUDGET = 1 << 24  # elements of gathered keys per query slice ([B, H, slice, 2c, D]): 64 MiB in fp32


@dataclasses.dataclass
class LSHSettings(SettingsBase):
    """bucket_size: c (each query sees c same-bucket keys and c positional neighbours);
    num_hashes: hash rounds; num_buckets: buckets per round (1, or even)."""

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
    """query [B, H, n, D]; key/value [B, H, Lk, D]; key_index/allowed [B, H, n, K] (key positions).
    Returns (softmax output [B, H, n, D], log-normaliser [B, H, n])."""
    bsz, heads, n, width = key_index.shape
    lk, dim = key.shape[2], key.shape[3]
    # Row gather on the flattened keys: ((b * H + h) * Lk + index) picks key rows without expanding over D.
    base = torch.arange(bsz * heads, device=key.device).view(bsz, heads, 1, 1) * lk
    rows = (key_index + base).reshape(-1)
    keys = key.reshape(-1, dim)[rows].view(bsz, heads, n, width, dim)
    values = value.reshape(-1, dim)[rows].view(bsz, heads, n, width, dim)
    scores = torch.matmul(keys, query.unsqueeze(-1)).squeeze(-1).float() * scaling  # (B, H, n, K)
    scores = scores.masked_fill(~allowed, masked_fill_value(scores.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(query.dtype)
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs.unsqueeze(-2), values).squeeze(-2), lse


def local_window(
    q_pos: torch.Tensor, key_mask: torch.Tensor | None, lk: int, width: int, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of each query's positional window and their validity, both [B or 1, Lq, width].

    Causal: the ``width`` positions ending at the query. Otherwise centred on the query, then shifted to lie inside
    the span of real keys (so width >= real length covers every key, and padding never shifts a window).
    """
    if is_causal:
        first = (q_pos - width + 1).unsqueeze(0)
    else:
        if key_mask is None:
            lo = torch.zeros(1, dtype=torch.long, device=q_pos.device)
            hi = torch.full((1,), lk, dtype=torch.long, device=q_pos.device)
        else:
            positions = torch.arange(lk, device=q_pos.device)
            lo = torch.where(key_mask, positions, lk).amin(-1)
            hi = torch.where(key_mask, positions + 1, 0).amax(-1)
        upper = torch.maximum(hi - width, lo).unsqueeze(-1)
        first = torch.maximum(torch.minimum(q_pos - width // 2, upper), lo.unsqueeze(-1))
    index = first.unsqueeze(-1) + torch.arange(width, device=q_pos.device)
    valid = (index >= 0) & (index < lk)
    index = index.clamp(0, lk - 1)
    if key_mask is not None:
        valid = valid & key_mask.gather(-1, index.expand(key_mask.shape[0], -1, -1).flatten(1)).view(
            key_mask.shape[0], *index.shape[1:]
        )
    return index, valid


def bucket_window(
    query_bucket: torch.Tensor,
    key_bucket: torch.Tensor,
    q_pos: torch.Tensor,
    width: int,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of the ``width`` same-bucket keys nearest each query in (bucket, position) order.

    query_bucket [B, H, Lq], key_bucket [B, H, Lk]. Returns (positions [B, H, Lq, width], valid [B, H, Lq, width]).
    """
    lk = key_bucket.shape[-1]
    codes, order = (key_bucket * lk + torch.arange(lk, device=key_bucket.device)).sort(dim=-1)
    bucket_start = torch.searchsorted(codes, query_bucket * lk)
    bucket_end = torch.searchsorted(codes, (query_bucket + 1) * lk)
    insert = torch.searchsorted(codes, query_bucket * lk + q_pos, right=True)  # past keys of the bucket end here
    if is_causal:
        first = insert - width
    else:  # centred, then shifted to stay inside the bucket where it can
        first = torch.maximum(torch.minimum(insert - width // 2, bucket_end - width), bucket_start)
    sorted_index = first.unsqueeze(-1) + torch.arange(width, device=codes.device)
    valid = (sorted_index >= bucket_start.unsqueeze(-1)) & (sorted_index < bucket_end.unsqueeze(-1))
    if is_causal:
        valid = valid & (sorted_index < insert.unsqueeze(-1))
    index = sorted_index.clamp(0, lk - 1)
    positions = order.gather(-1, index.flatten(2)).view_as(index)
    return positions, valid


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
    lk = key.shape[2]
    if lk <= settings.bucket_size:  # the positional window alone covers every key: this *is* exact attention
        return exact_attention(query, key, value, key_mask, is_causal, scaling, dropout)
    return windowed_lsh_attention(query, key, value, rotations, key_mask, is_causal, scaling, settings, dropout)


def windowed_lsh_attention(
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
    """The windows themselves (lsh_attention minus its exact short-input path); same arguments and result."""
    bsz, heads, lq, _ = query.shape
    lk = key.shape[2]
    q_pos = torch.arange(lk - lq, lk, device=query.device)
    width = min(settings.bucket_size, lk)
    local_index, local_valid = local_window(q_pos, key_mask, lk, width, is_causal)  # (B or 1, Lq, w)
    local_lo, local_hi = local_index[:, None, :, :1], local_index[:, None, :, -1:]  # span, to skip duplicates
    local_index = local_index.unsqueeze(1).expand(bsz, heads, lq, width)
    local_valid = local_valid.unsqueeze(1).expand(bsz, heads, lq, width)
    outputs, lses = [], []
    for rotation in rotations:
        key_bucket = hash_buckets(key, rotation, settings.num_buckets)
        if key_mask is not None:  # padded keys sort after every real one and match no query
            key_bucket = key_bucket.masked_fill(~key_mask[:, None, :], settings.num_buckets)
        query_bucket = hash_buckets(query, rotation, settings.num_buckets)
        bucket_index, bucket_valid = bucket_window(query_bucket, key_bucket, q_pos, width, is_causal)
        in_local = (bucket_index >= local_lo) & (bucket_index <= local_hi)
        key_index = torch.cat([local_index, bucket_index], dim=-1)
        allowed = torch.cat([local_valid, bucket_valid & ~in_local], dim=-1)
        slice_outputs, slice_lses = [], []
        step = max(1, GATHER_BUDGET // (bsz * heads * 2 * width * query.shape[-1]))
        for lo in range(0, lq, step):
            part = slice(lo, lo + step)
            args = (query[:, :, part], key, value, key_index[:, :, part], allowed[:, :, part], scaling, dropout)
            if torch.is_grad_enabled() and lq > step:
                out, lse = checkpoint(_attend_slice, *args, use_reentrant=False)
            else:
                out, lse = _attend_slice(*args)
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
