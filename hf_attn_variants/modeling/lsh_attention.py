"""LSH attention, Reformer-style (Kitaev et al. 2020), for the separate Q and K of converted models.

Angular LSH: bucket(x) = argmax([xR, -xR]) with random rotations R [D, n_buckets/2] per hash round, applied to
queries and keys alike (non-causal keys centred first: ``centred_keys``). Keys are sorted by (bucket, position).
Each query attends to 2c keys (c = bucket_size, Reformer's "own chunk + previous chunk"): the c keys of its own
bucket nearest to it in that order (when causal: the c most recent ones), and the c keys nearest in position (when
causal: the c most recent, itself included). Sliding windows replace Reformer's fixed chunk boundaries, which move
when later tokens arrive (past outputs would depend on the future); the positional window keeps inputs of N <= c
tokens exact and guarantees every query a key. Encoders (non-causal) also attend their first real token(s)
exactly (``exact_first``; [CLS] is an attention sink that hashing finds only by chance): on all-MiniLM-L6-v2 at
512 tokens, 2 hashes, 0.928 -> 0.947 mean embedding cosine; 4 hashes 0.949 -> 0.956. Rounds are combined by
log-sum-exp. Padded keys get a bucket past all real ones, so padding never moves real tokens. Both windows are
computed by blocks of queries against contiguous key spans (positional, and in hash-sorted order): memory O(N c),
matrix products instead of per-query gathers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .attention_common import (
    SettingsBase,
    VariantState,
    compute_dtype,
    exact_attention,
    interface_output,
    leading_positions,
    log_sum_exp_combine,
    per_unpadded_row,
    prepare_call,
)
from .decoding_caches import BucketIndexLayer, decoding_layer
from .gathered_attention import GROUP_ELEMENTS, NO_KEY_LSE, KeyPass, multi_pass_attention

# Queries per block of the bucket window = bucket_size // BUCKET_BLOCK_DIVISOR (lsh_attention's default). A block's
# span holds 2 * bucket_size sorted keys. Queries and keys are hashed apart, so a bucket can hold several times more
# keys than queries, and the windows of consecutive queries then move fast: at 16K tokens (one BERT-base layer,
# random weights) 6.5% of queries overrun their block's span with half blocks. bucket_pass then takes the block plan
# with fewer blocks (overflow_blocks or chunk_blocks, prefer_chunk_blocks).
BUCKET_BLOCK_DIVISOR = 2


@dataclasses.dataclass
class LSHSettings(SettingsBase):
    """bucket_size: c (each query sees c same-bucket keys and c positional neighbours);
    num_hashes: hash rounds; num_buckets: buckets per round (1, or even);
    exact_first: in non-causal layers, the first real tokens every query attends besides its windows ([CLS] /
    <s>: 10-21% of the attention in MiniLM's middle layers, found by a bucket only by chance); they are hashed
    into no bucket. Causal layers (decoders) do not use it."""

    variant = "lsh"
    bucket_size: int = dataclasses.field(default=64, metadata={"positive_int": True})
    num_hashes: int = dataclasses.field(default=2, metadata={"positive_int": True})
    num_buckets: int = dataclasses.field(default=16, metadata={"positive_int": True})
    exact_first: int = dataclasses.field(default=1, metadata={"non_negative_int": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_buckets > 1 and self.num_buckets % 2:
            raise ValueError(
                f"lsh setting num_buckets={self.num_buckets} must be 1 or even (angular LSH hashes to +-R x); "
                f"pass num_buckets={self.num_buckets + 1}."
            )

    def keys_attended(self, length: int, causal: bool) -> float:
        """c positional neighbours plus c same-bucket keys per hash round (plus the exact first keys)."""
        return min(length, self.bucket_size * (1 + self.num_hashes) + (0 if causal else self.exact_first))


class LSHState(VariantState):
    """rotations: [num_hashes, D, max(num_buckets // 2, 1)] Gaussian (buffer, saved with the weights)."""

    settings_class = LSHSettings

    def __init__(self, settings: LSHSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        shape = (settings.num_hashes, head_dim, max(settings.num_buckets // 2, 1))
        self.register_buffer("rotations", torch.empty(shape))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        values = torch.randn(self.rotations.shape, generator=self.generator(), dtype=torch.float32)
        self.rotations.copy_(values.to(self.rotations.device, self.rotations.dtype))


def hash_buckets(x: torch.Tensor, rotation: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Angular LSH bucket ids. x [B, H, L, D], rotation [D, n/2] -> [B, H, L] int64 in [0, num_buckets)."""
    if num_buckets == 1:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    projected = torch.matmul(x.to(compute_dtype(x.dtype)), rotation.to(compute_dtype(x.dtype)))
    return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)


def centred_keys(key: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """key [B, H, Lk, D] minus its mean over the real keys, for hashing only. Softmax attention is unchanged by
    a shift of every key (it adds q . shift to all of a query's logits), but the shared part of a converted model's
    keys (biases, the mean token) points every key the same way and crowds them into few buckets. On
    all-MiniLM-L6-v2 at 512 tokens it raises the pooled cosine to the original from 0.914 to 0.928. Causal layers
    hash raw keys: their mean would include future keys."""
    if key_mask is None:
        return key - key.mean(2, keepdim=True)
    weights = key_mask[:, None, :, None].to(key.dtype)
    return key - (key * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True).clamp_min(1.0)


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


def local_pass(query, lk: int, key_mask, start, width: int, first: int, log_weight: float = 0.0
               ) -> tuple[KeyPass, torch.Tensor | None]:
    """Each query's positional window [start, start + width) and, with ``first`` > 0, the first ``first`` real keys
    where that window does not hold them, as one KeyPass: query blocks of ``width`` against the 2 * width - 1 keys
    from the block's first window start (window starts grow by at most 1 per position, so the block's last window
    ends inside that span), the first keys as leading columns, every score raised by ``log_weight``. query
    [B, H, Lq, D]; start [B or 1, Lq]. Returns
    (the pass, the real keys left to hash [B or 1, Lk] bool: all but padding and the first keys; None when
    key_mask is None and first = 0)."""
    bsz, heads, lq, _ = query.shape
    device = query.device
    nb = -(-lq // width)
    slots = torch.arange(nb * width, device=device)
    query_index = slots.masked_fill(slots >= lq, lq).view(1, 1, nb, width).expand(bsz, heads, nb, width)
    starts = _blocks(start.unsqueeze(1), width).squeeze(1)  # (B or 1, nb, w); padding rows start at 0
    span = starts[:, :, :1] + torch.arange(2 * width - (1 if first else 0), device=device)  # (B or 1, nb, K)
    span_ok = (span >= 0) & (span < lk)
    span = span.clamp(0, lk - 1)
    if key_mask is not None:
        span_ok = span_ok & key_mask.gather(1, span.flatten(1)).view_as(span)
    hashable = key_mask
    if first:
        position, exists = leading_positions(key_mask, lk, first, device)  # (B or 1, first)
        span = torch.cat([position.unsqueeze(1).expand(-1, nb, -1), span], -1)
        span_ok = torch.cat([exists.unsqueeze(1).expand(-1, nb, -1), span_ok], -1)
        if key_mask is None:
            hashable = (torch.arange(lk, device=device) >= first).unsqueeze(0)
        else:
            hashable = key_mask & (key_mask.cumsum(-1) > first)

    def allowed(lo: int, hi: int) -> torch.Tensor:  # (B or 1, 1, G, w, K)
        keys, window_first = span[:, lo:hi, None, :], starts[:, lo:hi, :, None]
        in_window = (keys >= window_first) & (keys < window_first + width)
        if first:  # the first keys' columns count where the window does not hold them
            in_window = torch.cat([~in_window[..., :first], in_window[..., first:]], -1)
        return (in_window & span_ok[:, lo:hi, None, :]).unsqueeze(1)

    return KeyPass(span.unsqueeze(1), allowed, query_index, log_weight), hashable


def bucket_windows(query_bucket, key_bucket, q_pos, width: int, is_causal: bool, lk: int):
    """Each query's bucket window in (bucket, position) order: the ``width`` same-bucket keys nearest it (causal:
    the most recent ones). Returns (order [B, H, Lk]: key positions by (bucket, position); lower, upper
    [B, H, Lq]: the window as indices into that order, [lower, upper))."""
    device = query_bucket.device
    codes, order = (key_bucket * lk + torch.arange(lk, device=device)).sort(dim=-1)
    bucket_start = torch.searchsorted(codes, query_bucket * lk)
    bucket_end = torch.searchsorted(codes, (query_bucket + 1) * lk)
    insert = torch.searchsorted(codes, query_bucket * lk + q_pos, right=True)  # same-bucket keys at <= query
    if is_causal:
        first, upper = insert - width, insert
    else:  # centred, then shifted to stay inside the bucket where it can
        first = torch.maximum(torch.minimum(insert - width // 2, bucket_end - width), bucket_start)
        upper = bucket_end
    return order, torch.maximum(first, bucket_start), torch.minimum(first + width, upper)


def bucket_pass(query, query_bucket, key_bucket, q_pos, local_start, width: int, is_causal: bool, lk: int,
                bucket_block_divisor: int = BUCKET_BLOCK_DIVISOR) -> KeyPass:
    """Each query's bucket window (``bucket_windows``) minus keys already in its positional window, as a KeyPass.

    Queries are sorted by where their window starts and handled in blocks of width / ``bucket_block_divisor``
    against the 2 * width sorted keys from the block's first window; a query whose window reaches past that span
    gets a block of its own (``overflow_blocks``). Where that takes more blocks than grouping the queries by the key
    chunk their window starts in (``chunk_blocks``, which no window overruns), the chunk plan is used instead.
    """
    bsz, heads, lq, _ = query.shape
    device = query.device
    order, lower, upper = bucket_windows(query_bucket, key_bucket, q_pos, width, is_causal, lk)
    local = local_start.expand(bsz, lq).unsqueeze(1).expand(bsz, heads, lq)

    rows = max(width // bucket_block_divisor, 1)
    query_order = (lower.clamp_min(0) * lq + torch.arange(lq, device=device)).argsort(dim=-1)
    per_query = torch.stack([lower, upper, local], dim=-1).gather(2, query_order.unsqueeze(-1).expand(-1, -1, -1, 3))
    nb = -(-lq // rows)
    per_query = _blocks(per_query, rows)  # (B, H, nb, rows, 3); padding rows have lower = upper = 0: all masked
    s_lower, s_upper, s_local = per_query.unbind(-1)
    last_start = max(lk - 2 * width, 0)
    span_start = s_lower[:, :, :, 0].clamp(0, last_start)  # (B, H, nb)
    # Each block slot names its query (Lq: an empty slot past the end); results come back in query order.
    query_rows = torch.nn.functional.pad(query_order, (0, nb * rows - lq), value=lq).view(bsz, heads, nb, rows)
    overflow = s_upper > (span_start + 2 * width).unsqueeze(-1)  # windows that run past their block's span
    if bool(overflow.any()):
        extra = int(overflow.flatten(2).sum(-1).max())
        chunked = chunk_blocks(lower, upper, local, lk, width, rows)
        if prefer_chunk_blocks(chunked[0].shape[2], nb + extra):
            query_rows, s_lower, s_upper, s_local, span_start = chunked
        else:
            query_rows, s_lower, s_upper, s_local = overflow_blocks(overflow, lq, query_rows, s_lower, s_upper,
                                                                    s_local)
            span_start = torch.cat([span_start, s_lower[:, :, nb:, 0].clamp(0, last_start)], dim=2)
    raw_span = span_start.unsqueeze(-1) + torch.arange(2 * width, device=device)  # (B, H, blocks, 2w) sorted indices
    span = raw_span.clamp_max(lk - 1)
    span_pos = order.gather(-1, span.flatten(2)).view_as(span)  # key positions of the span

    def allowed(lo: int, hi: int) -> torch.Tensor:  # (B, H, G, w, 2w)
        idx = raw_span[:, :, lo:hi].unsqueeze(-2)  # past-the-end slots exceed every upper bound
        pos = span_pos[:, :, lo:hi].unsqueeze(-2)
        local_first = s_local[:, :, lo:hi].unsqueeze(-1)
        ok = (idx >= s_lower[:, :, lo:hi].unsqueeze(-1)) & (idx < s_upper[:, :, lo:hi].unsqueeze(-1))
        return ok & ((pos < local_first) | (pos >= local_first + width))

    return KeyPass(span_pos, allowed, query_rows)


def prefer_chunk_blocks(chunk_block_count: int, overflow_block_count: int) -> bool:
    """Whether chunk_blocks' plan is taken over overflow_blocks' (the same result): when it has fewer blocks. A
    BERT-base-shaped model on real token ids overran so often that each LSH layer ran ~5x the blocks it needed (a
    2-layer model's forward at 4096 tokens: 1.34 s with overflow blocks only, 0.95 s with this choice; full
    attention 0.90 s). Where overruns are rare the overflow plan has fewer blocks and is kept."""
    return chunk_block_count < overflow_block_count


def chunk_blocks(lower, upper, local, lk: int, width: int, rows: int) -> tuple[torch.Tensor, ...]:
    """Blocks of queries that never overflow: a window that starts in the j-th chunk of ``width`` sorted keys needs
    only chunks j and j + 1, so each chunk's queries (lower, upper, local [B, H, Lq]: their windows), in blocks of
    ``rows``, attend the 2 * width keys from the chunk's start. At most Lq / rows + Lk / width blocks per head
    (partly filled ones at chunk ends), however unevenly queries and keys fill the buckets. Returns query_rows,
    lower, upper, local per slot [B, H, nb, rows] (empty slots: query Lq, lower = upper = 0) and span_start
    [B, H, nb]."""
    bsz, heads, lq = lower.shape
    device = lower.device
    chunk = lower.clamp(0, lk - 1) // width
    query_order = (chunk * lq + torch.arange(lq, device=device)).argsort(dim=-1)
    chunk = chunk.gather(2, query_order)  # ascending
    counts = torch.zeros(bsz, heads, -(-lk // width), dtype=torch.long, device=device)
    counts.scatter_add_(2, chunk, torch.ones_like(chunk))
    blocks = -(-counts // rows)
    rank = torch.arange(lq, device=device) - (counts.cumsum(-1) - counts).gather(2, chunk)  # within its chunk
    slot = ((blocks.cumsum(-1) - blocks).gather(2, chunk) + rank // rows) * rows + rank % rows
    nb = int(blocks.sum(-1).max())

    def placed(x: torch.Tensor, fill: int) -> torch.Tensor:  # per sorted query [B, H, Lq] -> [B, H, nb, rows]
        return x.new_full((bsz, heads, nb * rows), fill).scatter_(2, slot, x).view(bsz, heads, nb, rows)

    per_slot = [placed(x.gather(2, query_order), 0) for x in (lower, upper, local)]
    span_chunk = chunk.new_zeros(bsz, heads, nb).scatter_(2, slot // rows, chunk)
    span_start = (span_chunk * width).clamp(0, max(lk - 2 * width, 0))
    return (placed(query_order, lq), *per_slot, span_start)


def overflow_blocks(overflow: torch.Tensor, lq: int, query_rows: torch.Tensor, *per_slot: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
    """Move each query whose bucket window runs past its block's span (``overflow`` [B, H, nb, rows] bool; rare)
    into slot 0 of a block of its own, appended after the others (as many per head as the head with the most),
    whose span starts at its window. Its old slot becomes empty (Lq). query_rows and each of ``per_slot`` (the
    slots' lower, upper, local: [B, H, nb, rows]) come back with the new blocks appended; unused slots of the new
    blocks are empty, with lower = upper = 0."""
    bsz, heads, _, rows = overflow.shape
    flat = overflow.flatten(2)
    extra = int(flat.sum(-1).max())
    b, h, slot = flat.nonzero(as_tuple=True)
    block = (flat.cumsum(-1) - 1)[b, h, slot]  # the query's rank among its head's overflows

    def appended(x: torch.Tensor, fill: int) -> torch.Tensor:
        new = x.new_full((bsz, heads, extra, rows), fill)
        new[b, h, block, 0] = x.flatten(2)[b, h, slot]
        return torch.cat([x, new], dim=2)

    moved = appended(query_rows, lq)
    moved[:, :, : overflow.shape[2]].masked_fill_(overflow, lq)
    return (moved, *(appended(x, 0) for x in per_slot))


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
    group_elements: int = GROUP_ELEMENTS,
    bucket_block_divisor: int = BUCKET_BLOCK_DIVISOR,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D] at positions Lk-Lq..; key/value [B, H, Lk, D]; rotations
    [R, D, n/2]; key_mask [B, Lk] bool or None. Returns [B, H, Lq, D].

    exact_when_covered: inputs of at most bucket_size keys, which the positional window alone covers, go straight
    to exact attention (the same result, computed densely); False forces the windows (for tests).
    group_elements, bucket_block_divisor: tuning of the blocked computation (see gathered_attention and
    BUCKET_BLOCK_DIVISOR); the result does not depend on them.
    """
    lk = key.shape[2]
    if exact_when_covered and lk <= settings.bucket_size:
        return exact_attention(query, key, value, key_mask, is_causal, scaling, dropout)
    width = min(settings.bucket_size, lk)
    out_dtype, dtype = query.dtype, compute_dtype(query.dtype)
    # Contiguous once here: every round gathers rows from their flat views (a strided view would be copied per round).
    query, key, value = (x.to(dtype).contiguous() for x in (query, key, value))
    q_pos = torch.arange(lk - query.shape[2], lk, device=query.device)
    local_start = local_window_start(q_pos, key_mask, lk, width, is_causal)
    first = 0 if is_causal else min(settings.exact_first, lk)
    # One softmax over every round's keys: each round is the softmax over (positional window + first keys + its
    # bucket window), rounds combined by log-sum-exp, so the positional window and the first keys count once per
    # round (their pass's log_weight).
    local, hashable = local_pass(query, lk, key_mask, local_start, width, first, math.log(len(rotations)))
    passes = [local]
    hashed_keys = key if is_causal else centred_keys(key, key_mask)
    for rotation in rotations:
        key_bucket = hash_buckets(hashed_keys, rotation, settings.num_buckets)
        if hashable is not None:  # padding and the first keys sort after every real one and match no query
            key_bucket = key_bucket.masked_fill(~hashable[:, None, :], settings.num_buckets)
        query_bucket = hash_buckets(query, rotation, settings.num_buckets)
        passes.append(bucket_pass(query, query_bucket, key_bucket, q_pos, local_start, width, is_causal, lk,
                                  bucket_block_divisor))
    out, _ = multi_pass_attention(query, key, value, passes, scaling, dropout, group_elements)
    return out.to(out_dtype)


def hash_rounds(x: torch.Tensor, rotations: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket ids of every round at once: x [B, H, L, D], rotations [R, D, n/2] -> [B, H, R, L]."""
    return torch.stack([hash_buckets(x, rotation, num_buckets) for rotation in rotations], dim=2)


def build_bucket_index(key_bucket: torch.Tensor, num_buckets: int, width: int) -> torch.Tensor:
    """Positions of the ``width`` most recent keys of each bucket, oldest first, -1 where a bucket has fewer.

    key_bucket [B, H, R, L] -> [B, H, R, num_buckets, width] (int64)."""
    lk = key_bucket.shape[-1]
    codes, order = (key_bucket * lk + torch.arange(lk, device=key_bucket.device)).sort(dim=-1)
    bounds = torch.arange(num_buckets + 1, device=key_bucket.device) * lk
    edges = torch.searchsorted(codes, bounds.expand(*codes.shape[:-1], -1).contiguous())  # [B, H, R, n + 1]
    starts, ends = edges[..., :-1], edges[..., 1:]
    index = ends.unsqueeze(-1) - width + torch.arange(width, device=key_bucket.device)
    positions = order.gather(-1, index.clamp_min(0).flatten(-2)).view_as(index)
    return positions.masked_fill(index < starts.unsqueeze(-1), -1)


def append_to_bucket_index(recent: torch.Tensor, bucket: torch.Tensor, position: int) -> None:
    """Record a key at ``position`` hashed to ``bucket`` [B, H, R] in ``recent`` [B, H, R, n, width] (in place)."""
    slot = bucket[..., None, None].expand(*bucket.shape, 1, recent.shape[-1])
    row = recent.gather(3, slot)
    recent.scatter_(3, slot, torch.cat([row[..., 1:], torch.full_like(row[..., :1], position)], dim=-1))


def lsh_decode_step(query, key, value, rotations, settings: LSHSettings, scaling: float, recent: torch.Tensor):
    """One causal decoding step in O(rounds x c): the last query [B, H, 1, D] against its positional window (the
    last c keys) and, per round, the c most recent keys of its bucket from the index (``recent``, which already
    holds the new key), minus those in the window. The same result as ``lsh_attention`` for that query, without
    re-hashing or re-sorting the context. key/value [B, H, Lk, D] with Lk > c. Returns [B, H, 1, D]."""
    width, lk = settings.bucket_size, key.shape[2]
    dtype = compute_dtype(query.dtype)
    q = query.to(dtype)
    local_keys, local_values = key[:, :, -width:].to(dtype), value[:, :, -width:].to(dtype)
    local_scores = torch.matmul(q, local_keys.transpose(-1, -2)) * scaling  # [B, H, 1, c]
    local_lse = torch.logsumexp(local_scores, dim=-1)  # [B, H, 1]
    outputs = [torch.matmul(torch.exp(local_scores - local_lse.unsqueeze(-1)), local_values)]
    lses = [local_lse + math.log(len(rotations))]
    query_bucket = hash_rounds(q, rotations, settings.num_buckets)[..., 0]  # [B, H, R]
    slot = query_bucket[..., None, None].expand(*query_bucket.shape, 1, width)
    positions = recent.gather(3, slot).squeeze(3)  # [B, H, R, c]
    allowed = (positions >= 0) & (positions < lk - width)  # same bucket, outside the positional window
    # torch.gather reads the cache where it lies (a growing cache's keys are a strided view: no copy of them).
    index = positions.clamp_min(0).flatten(2).unsqueeze(-1).expand(-1, -1, -1, key.shape[-1])
    keys = key.gather(2, index).view(*positions.shape, -1).to(dtype)
    values = value.gather(2, index).view(*positions.shape, -1).to(dtype)
    scores = (keys @ q.transpose(-1, -2).unsqueeze(2)).squeeze(-1) * scaling  # [B, H, R, c]
    scores = scores.masked_fill(~allowed, float("-inf"))
    round_lse = torch.logsumexp(scores, dim=-1).clamp_min(NO_KEY_LSE)  # [B, H, R]
    round_out = torch.matmul(torch.exp(scores - round_lse.unsqueeze(-1)).unsqueeze(-2), values).squeeze(-2)
    for r in range(len(rotations)):
        outputs.append(round_out[:, :, r : r + 1])
        lses.append(round_lse[:, :, r : r + 1])
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
    layer = decoding_layer(key)
    call = prepare_call(module, LSHState, query, key, value, attention_mask, scaling, kwargs.get("is_causal"))
    settings = call.state.settings
    indexed = isinstance(layer, BucketIndexLayer) and call.is_causal and call.key_mask is None
    if indexed and query.shape[2] == 1 and layer.recent is not None and call.key.shape[2] > settings.bucket_size:
        new_key = hash_rounds(call.key[:, :, -1:], call.state.rotations, settings.num_buckets)[..., 0]
        append_to_bucket_index(layer.recent, new_key, call.key.shape[2] - 1)
        out = lsh_decode_step(query, call.key, call.value, call.state.rotations, settings, call.scaling, layer.recent)
        return interface_output(out)
    if indexed:  # prefill (or a step after the index was dropped): index every cached key for the steps to come
        key_bucket = hash_rounds(call.key, call.state.rotations, settings.num_buckets)
        layer.recent = build_bucket_index(key_bucket, settings.num_buckets, settings.bucket_size)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # one row, no padding
        return lsh_attention(q, k, v, call.state.rotations, None, call.is_causal, call.scaling, call.state.settings,
                             dropout)

    # Positional windows count real tokens only: left padding cannot shorten a decoder's window.
    return interface_output(per_unpadded_row(attend, query, call.key, call.value, call.key_mask))
