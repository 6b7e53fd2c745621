"""LSH attention, Reformer-style (Kitaev et al. 2020), for the separate Q and K of converted models.

Angular LSH: bucket(x) = argmax([xR, -xR]) with random rotations R [D, n_buckets/2] per hash round, applied to
queries and keys alike. Keys are sorted by (bucket, position). Each query attends to 2c keys (c = bucket_size,
Reformer's "own chunk + previous chunk"): the c keys of its own bucket nearest to it in that order (when causal:
the c most recent ones), and the c keys nearest in position (when causal: the c most recent, itself included).
Sliding windows replace Reformer's fixed chunk boundaries, which move when later tokens arrive (past outputs would
depend on the future); the positional window keeps inputs of N <= c tokens exact and
guarantees every query a key. Rounds are combined by log-sum-exp. Padded keys get a bucket past all real ones, so
padding never moves real tokens. Both windows are computed by blocks of queries against contiguous key spans
(positional, and in hash-sorted order): memory O(N c), matrix products instead of per-query gathers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .attention_common import (
    SettingsBase,
    VariantState,
    compute_dtype,
    exact_attention,
    interface_output,
    log_sum_exp_combine,
    masked_fill_value,
    prepare_call,
)


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
    projected = torch.matmul(x.to(compute_dtype(x.dtype)), rotation.to(compute_dtype(x.dtype)))
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype, dropout: float):
    """Masked softmax over the last dim of scores [..., K]; returns (probabilities in ``dtype``, lse [...])."""
    scores = scores.to(compute_dtype(scores.dtype))
    scores = scores.masked_fill(~allowed, masked_fill_value(scores.dtype))
    lse = torch.logsumexp(scores, dim=-1)
    probs = (torch.exp(scores - lse.unsqueeze(-1)) * allowed).to(dtype)  # a row with no allowed key gives 0
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout)
    return probs, lse


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], index [B, H, ...] of positions along L -> [B, H, ..., D] (row gather, no expand over D)."""
    bsz, heads, length, dim = x.shape
    base = torch.arange(bsz * heads, device=x.device).view(bsz, heads, *([1] * (index.dim() - 2))) * length
    return x.reshape(-1, dim)[(index + base).reshape(-1)].view(*index.shape, dim)


def _blocks(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, ...] -> [B, H, ceil(L / width), width, ...], zero-padded at the end."""
    pad = -x.shape[2] % width
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
    return x.view(*x.shape[:2], -1, width, *x.shape[3:])


def local_window_start(
    q_pos: torch.Tensor, key_mask: torch.Tensor | None, lk: int, width: int, is_causal: bool
) -> torch.Tensor:
    """First key position of each query's positional window [B or 1, Lq]; the window is [start, start + width).

    Causal: the ``width`` positions ending at the query. Otherwise centred on the query, then shifted to lie inside
    the span of real keys (so width >= real length covers every key, and padding never shifts a window).
    """
    if is_causal:
        return (q_pos - width + 1).unsqueeze(0)
    positions = torch.arange(lk, device=q_pos.device)
    if key_mask is None:
        lo, hi = positions.new_zeros(1), positions.new_full((1,), lk)
    else:
        lo = torch.where(key_mask, positions, lk).amin(-1)
        hi = torch.where(key_mask, positions + 1, 0).amax(-1)
    upper = torch.maximum(hi - width, lo).unsqueeze(-1)
    return torch.maximum(torch.minimum(q_pos - width // 2, upper), lo.unsqueeze(-1))


def local_attention(query, key, value, key_mask, q_pos, start, width, scaling, dropout):
    """Softmax over each query's positional window, computed by query blocks of ``width`` against the 3 * width
    keys around each block (every window lies in [p - width, p + width]). Returns (out [B, H, Lq, D], lse)."""
    bsz, heads, lq, _ = query.shape
    lk = key.shape[2]
    device = query.device
    q_blocks = _blocks(query, width)  # (B, H, nb, w, D)
    nb = q_blocks.shape[2]
    block_first = torch.cat([q_pos, q_pos.new_full((nb * width - lq,), lk)])[::width]  # first position per block
    span = block_first.unsqueeze(-1) - width + torch.arange(3 * width, device=device)  # (nb, 3w) key positions
    span_ok = (span >= 0) & (span < lk)
    span = span.clamp(0, lk - 1)
    keys = key[:, :, span]  # (B, H, nb, 3w, D)
    values = value[:, :, span]
    starts = _blocks(start.expand(bsz, lq).unsqueeze(1), width).squeeze(1)  # (B, nb, w)
    allowed = (span[None, :, None, :] >= starts.unsqueeze(-1)) & (span[None, :, None, :] < starts.unsqueeze(-1) + width)
    allowed = allowed & span_ok[None, :, None, :]
    if key_mask is not None:
        allowed = allowed & key_mask[:, span].unsqueeze(2)
    scores = torch.matmul(q_blocks, keys.transpose(-1, -2)) * scaling  # (B, H, nb, w, 3w)
    probs, lse = _masked_softmax(scores, allowed.unsqueeze(1), value.dtype, dropout)
    out = torch.matmul(probs, values)  # (B, H, nb, w, D)
    return out.reshape(bsz, heads, nb * width, -1)[:, :, :lq], lse.reshape(bsz, heads, nb * width)[:, :, :lq]


def bucket_attention(query, key, value, query_bucket, key_bucket, q_pos, local_start, width, is_causal, scaling,
                     dropout):
    """Softmax over each query's bucket window: the ``width`` same-bucket keys nearest it in (bucket, position)
    order (causal: the most recent ones), minus keys already in its positional window. Returns (out, lse).

    Queries are sorted by where their window starts and handled in blocks of ``width`` against the 2 * width sorted
    keys from the block's first window; the rare query whose window reaches past that span is computed alone.
    """
    bsz, heads, lq, dim = query.shape
    lk = key.shape[2]
    device = query.device
    codes, order = (key_bucket * lk + torch.arange(lk, device=device)).sort(dim=-1)
    bucket_start = torch.searchsorted(codes, query_bucket * lk)
    bucket_end = torch.searchsorted(codes, (query_bucket + 1) * lk)
    insert = torch.searchsorted(codes, query_bucket * lk + q_pos, right=True)  # same-bucket keys at <= query
    if is_causal:
        first = insert - width
        upper = insert
    else:  # centred, then shifted to stay inside the bucket where it can
        first = torch.maximum(torch.minimum(insert - width // 2, bucket_end - width), bucket_start)
        upper = bucket_end
    lower = torch.maximum(first, bucket_start)  # window: sorted index in [lower, upper_final)
    upper = torch.minimum(first + width, upper)
    local = local_start.expand(bsz, lq).unsqueeze(1).expand(bsz, heads, lq)

    # Sort queries by window start; blocks of `width` queries share a span of 2 * width sorted keys.
    query_order = (lower.clamp_min(0) * lq + torch.arange(lq, device=device)).argsort(dim=-1)
    per_query = torch.stack([lower, upper, local], dim=-1).gather(2, query_order.unsqueeze(-1).expand(-1, -1, -1, 3))
    nb = -(-lq // width)
    padded = nb * width
    per_query = _blocks(per_query, width)  # (B, H, nb, w, 3); padding rows have lower = upper = 0: all masked
    s_lower, s_upper, s_local = per_query.unbind(-1)
    span_start = s_lower[:, :, :, 0].clamp(0, max(lk - 2 * width, 0))  # (B, H, nb)
    raw_span = span_start.unsqueeze(-1) + torch.arange(2 * width, device=device)  # (B, H, nb, 2w) sorted indices
    span = raw_span.clamp_max(lk - 1)
    span_pos = order.gather(-1, span.flatten(2)).view_as(span)  # key positions of the span
    keys = _gather_rows(key, span_pos)  # (B, H, nb, 2w, D)
    values = _gather_rows(value, span_pos)
    q_sorted = _blocks(_gather_rows(query, query_order), width)  # (B, H, nb, w, D)
    idx = raw_span.unsqueeze(-2)  # (B, H, nb, 1, 2w); past-the-end slots exceed every upper bound
    pos = span_pos.unsqueeze(-2)
    allowed = (idx >= s_lower.unsqueeze(-1)) & (idx < s_upper.unsqueeze(-1))
    allowed = allowed & ((pos < s_local.unsqueeze(-1)) | (pos >= s_local.unsqueeze(-1) + width))
    scores = torch.matmul(q_sorted, keys.transpose(-1, -2)) * scaling  # (B, H, nb, w, 2w)
    probs, lse = _masked_softmax(scores, allowed, value.dtype, dropout)
    out = torch.matmul(probs, values)  # (B, H, nb, w, D)
    out, lse = out.reshape(bsz, heads, padded, dim)[:, :, :lq], lse.reshape(bsz, heads, padded)[:, :, :lq]

    # Queries whose window does not fit in their block's span: gather their own keys.
    span_end = (span_start + 2 * width).unsqueeze(-1).expand(-1, -1, -1, width).reshape(bsz, heads, padded)[:, :, :lq]
    overflow = s_upper.reshape(bsz, heads, padded)[:, :, :lq] > span_end
    if bool(overflow.any()):
        b, h, i = overflow.nonzero(as_tuple=True)
        lo_i = s_lower.reshape(bsz, heads, padded)[b, h, i]
        window = lo_i.unsqueeze(-1) + torch.arange(width, device=device)  # (n, w) sorted indices
        w_pos = order[b.unsqueeze(-1), h.unsqueeze(-1), window.clamp_max(lk - 1)]
        local_i = s_local.reshape(bsz, heads, padded)[b, h, i].unsqueeze(-1)
        ok = window < s_upper.reshape(bsz, heads, padded)[b, h, i].unsqueeze(-1)
        ok = ok & ((w_pos < local_i) | (w_pos >= local_i + width))
        q_i = _gather_rows(query, query_order)[b, h, i]  # (n, D)
        k_i, v_i = key[b.unsqueeze(-1), h.unsqueeze(-1), w_pos], value[b.unsqueeze(-1), h.unsqueeze(-1), w_pos]
        scores_i = torch.matmul(k_i, q_i.unsqueeze(-1)).squeeze(-1) * scaling
        probs_i, lse_i = _masked_softmax(scores_i, ok, value.dtype, dropout)
        out_i = torch.matmul(probs_i.unsqueeze(-2), v_i).squeeze(-2)
        out = out.index_put((b, h, i), out_i)
        lse = lse.index_put((b, h, i), lse_i)
    inverse = query_order.argsort(dim=-1)
    return _gather_rows(out, inverse), lse.gather(-1, inverse)


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
    exact_when_covered: bool = True,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D] at positions Lk-Lq..; key/value [B, H, Lk, D]; rotations
    [R, D, n/2]; key_mask [B, Lk] bool or None. Returns [B, H, Lq, D].

    exact_when_covered: inputs of at most bucket_size keys, which the positional window alone covers, go straight
    to exact attention (the same result, computed densely); False forces the windows (for tests).
    """
    lk = key.shape[2]
    if exact_when_covered and lk <= settings.bucket_size:
        return exact_attention(query, key, value, key_mask, is_causal, scaling, dropout)
    width = min(settings.bucket_size, lk)
    q_pos = torch.arange(lk - query.shape[2], lk, device=query.device)
    local_start = local_window_start(q_pos, key_mask, lk, width, is_causal)
    out_local, lse_local = local_attention(query, key, value, key_mask, q_pos, local_start, width, scaling, dropout)
    outputs, lses = [], []
    for rotation in rotations:
        key_bucket = hash_buckets(key, rotation, settings.num_buckets)
        if key_mask is not None:  # padded keys sort after every real one and match no query
            key_bucket = key_bucket.masked_fill(~key_mask[:, None, :], settings.num_buckets)
        query_bucket = hash_buckets(query, rotation, settings.num_buckets)
        out_bucket, lse_bucket = bucket_attention(
            query, key, value, query_bucket, key_bucket, q_pos, local_start, width, is_causal, scaling, dropout
        )
        outputs.append(log_sum_exp_combine([out_local, out_bucket], [lse_local, lse_bucket]))
        lses.append(torch.logaddexp(lse_local, lse_bucket))
    if len(outputs) == 1:
        return outputs[0].to(query.dtype)
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
    call = prepare_call(module, LSHState, query, key, value, attention_mask, scaling)
    out = lsh_attention(query, call.key, call.value, call.state.rotations, call.key_mask, call.is_causal,
                        call.scaling, call.state.settings, dropout)
    return interface_output(out)
