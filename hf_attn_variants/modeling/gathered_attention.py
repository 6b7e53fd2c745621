"""Softmax attention in which each block of queries attends its own gathered set of keys, with a hand-written
backward. BigBird's block pattern and LSH's positional and bucket windows all run on it.

Query blocks are processed a group at a time: a group's keys are gathered, its scores built, used and dropped.
The backward recomputes them from the saved log-sum-exp (as flash attention does). Nothing of size
N x keys-per-query is kept between the forward and the backward, and no autograd graph is built per block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .attention_common import masked_fill_value, spans

# Elements of one group's score tensor [*, G, w, K]: small enough that a group's gathered keys and values (8 MB each
# for LSH's bucket blocks) come from the allocator's reused memory, large enough for fast matmuls. At 1 << 22 they
# were 33 MB, which glibc maps fresh for every allocation: page faults made each gather run at ~1 GB/s (one BERT-base
# layer at 16K, fwd+bwd: LSH 3.88 -> 3.35 s, LSH-1 2.61-2.74 -> 2.49 s, BigBird 2.80-2.95 -> 2.71-2.82 s).
GROUP_ELEMENTS = 1 << 20

# The lse of a row with no allowed key: finite (so exp(-inf - lse) = 0, not NaN) and negligible in any
# log-sum-exp combination.
NO_KEY_LSE = masked_fill_value(torch.float32)

MaskFunction = Callable[[int, int], torch.Tensor]
"""mask(lo, hi): which keys the queries of blocks lo..hi-1 may attend, bool broadcastable to [*, hi - lo, w, K]."""


@dataclasses.dataclass
class KeyPass:
    """One set of keys for each block of queries, a part of one softmax (see GatheredAttention).

    key_index [* or 1.., nb, K]: rows of key/value per query block; mask: MaskFunction; query_index [*, nb, w]: the
    rows of query [*, Lq, D] in each block (each row at most once, Lq marks an empty slot), or None when query is
    itself in blocks [*, nb, w, D] (then this is the only pass); log_weight: added to every score of the pass (the
    log of how many times its keys count in the softmax)."""

    key_index: torch.Tensor
    mask: MaskFunction
    query_index: torch.Tensor | None = None
    log_weight: float = 0.0


class GatheredAttention(torch.autograd.Function):
    """out, lse = softmax over the keys of every pass (q k^T * scale + the pass's log_weight + mask) v, per query.

    query [*, Lq, D] (or [*, nb, w, D] for one pass without query_index); key/value [*, Lk, D]; passes: KeyPass list.
    A query's keys are the union of its keys in every pass (a key in two passes counts twice). Returns out
    [*, Lq, D] and lse [*, Lq] in query's own order ([*, nb, w, D] / [*, nb, w] for blocked queries), both
    differentiable. A row with no allowed key gets out = 0 and lse = NO_KEY_LSE: it weighs nothing when partial
    results are combined. The passes' partial results are merged as they come (online softmax), so one output,
    one log-sum-exp and one set of gradient buffers serve them all. Dropout masks are drawn from a seed taken from
    torch's generator; the backward regenerates the same masks.
    """

    @staticmethod
    def forward(ctx, query, key, value, passes, scaling, dropout, group_elements):
        if len(passes) > 1 and any(key_pass.query_index is None for key_pass in passes):
            raise ValueError("several KeyPasses need query_index each: blocked queries allow one pass")
        key, value = key.contiguous(), value.contiguous()  # rows are gathered from their flat views
        if passes[0].query_index is not None:  # so is the query: a strided one would be copied whole by every read
            query = query.contiguous()
        first = QuerySlots(query, passes[0].query_index)
        out, lse = first.empty(per_row=False), first.empty(per_row=True)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0.0 else 0
        for number, (slots, key_pass) in enumerate(pass_slots(query, passes)):
            for lo, hi in group_spans(slots.blocked_shape, key_pass.key_index.shape[-1], group_elements):
                index = flat_index(key_pass.key_index, key, lo, hi)
                keys, values = gather_rows(key, index), gather_rows(value, index)
                scores = pass_scores(slots, key_pass, slots.read(query, lo, hi), keys, scaling, lo, hi)
                group_lse = torch.logsumexp(scores, dim=-1, keepdim=True).clamp_min_(NO_KEY_LSE)
                probs = scores.sub_(group_lse).exp_()
                if dropout > 0.0:
                    probs.mul_(dropout_factors(probs, pass_seed(seed, number), lo, dropout))
                if number == 0:
                    slots.write(out, torch.matmul(probs, values), lo, hi)
                    slots.write(lse, group_lse.squeeze(-1), lo, hi)
                else:
                    slots.merge(out, lse, torch.matmul(probs, values), group_lse.squeeze(-1), lo, hi)
        out, lse = first.finish(out, per_row=False), first.finish(lse, per_row=True)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.settings = (passes, scaling, dropout, seed, group_elements)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises instead of going wrong
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        passes, scaling, dropout, seed, group_elements = ctx.settings
        if passes[0].query_index is not None:
            grad_out = grad_out.contiguous()
        first = QuerySlots(query, passes[0].query_index)
        grad_query = first.empty(per_row=False)
        grad_key = torch.zeros(key.shape, dtype=key.dtype, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
        # d scores = P * (dP - rowsum(dO * O) + d lse), P the probabilities of the whole softmax
        delta = (grad_out * out).sum(-1, keepdim=True) - grad_lse.unsqueeze(-1)
        for number, (slots, key_pass) in enumerate(pass_slots(query, passes)):
            for lo, hi in group_spans(slots.blocked_shape, key_pass.key_index.shape[-1], group_elements):
                index = flat_index(key_pass.key_index, key, lo, hi)
                keys, values = gather_rows(key, index), gather_rows(value, index)
                queries, grads = slots.read(query, lo, hi), slots.read(grad_out, lo, hi)
                group_lse, group_delta = slots.read(lse.unsqueeze(-1), lo, hi), slots.read(delta, lo, hi)
                probs = pass_scores(slots, key_pass, queries, keys, scaling, lo, hi).sub_(group_lse).exp_()
                kept, grad_scores = softmax_block_backward(probs, grads, values, group_delta, dropout,
                                                           pass_seed(seed, number), lo)
                scatter_add_rows(grad_value, index, torch.matmul(kept.transpose(-1, -2), grads))
                grad_scores.mul_(scaling)
                slots.add(grad_query, torch.matmul(grad_scores, keys), lo, hi)
                scatter_add_rows(grad_key, index, torch.matmul(grad_scores.transpose(-1, -2), queries))
        return first.finish(grad_query, per_row=False), grad_key, grad_value, None, None, None, None


def pass_slots(query: torch.Tensor, passes: list[KeyPass]):
    """(QuerySlots, KeyPass) for each pass, in order."""
    return ((QuerySlots(query, key_pass.query_index), key_pass) for key_pass in passes)


def pass_seed(seed: int, number: int) -> int:
    """The dropout seed of pass ``number``: passes draw their masks from streams of their own."""
    return seed + (number << 40)


def pass_scores(slots, key_pass: KeyPass, queries, keys, scaling: float, lo: int, hi: int) -> torch.Tensor:
    """Masked scores [*, G, w, K] of query blocks lo..hi-1 (queries [*, G, w, D]) against their gathered keys
    [*, G, K, D], plus the pass's weight."""
    scores = masked_scores(queries, keys, slots.allowed(key_pass.mask, lo, hi), scaling)
    return scores.add_(key_pass.log_weight) if key_pass.log_weight else scores


class QuerySlots:
    """Where GatheredAttention's query blocks come from and where their results go: query itself, already in
    blocks [*, nb, w, D] (query_index None), or the rows of query [*, Lq, D] that query_index [*, nb, w] names,
    Lq marking an empty slot. Results of empty slots land in one spare row per leading index, dropped by
    ``finish``."""

    def __init__(self, query: torch.Tensor, query_index: torch.Tensor | None):
        self.index, self.like = query_index, query
        if query_index is None:
            self.blocked_shape = query.shape
            return
        self.rows = query.shape[-2]
        self.blocked_shape = (*query_index.shape, query.shape[-1])
        offsets = row_offsets(query, 2)  # leading index x Lq
        self.read_rows = query_index.clamp_max(self.rows - 1) + offsets  # empty slots read any row
        self.write_rows = query_index + offsets // self.rows * (self.rows + 1)  # buffers have a spare row

    def empty(self, per_row: bool) -> torch.Tensor:
        """A buffer for outputs [..., D] (per_row False) or per-row values such as the lse (True). Rows that no
        slot names keep 0 (outputs, gradients) or NO_KEY_LSE."""
        if self.index is None:
            return self.like.new_empty(self.blocked_shape[:-1] if per_row else self.blocked_shape)
        shape = (*self.like.shape[:-2], self.rows + 1)
        return self.like.new_full(shape, NO_KEY_LSE) if per_row else self.like.new_zeros(*shape, self.like.shape[-1])

    def read(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Blocks lo..hi-1 of x, shaped like query with a last dim D (or 1, for per-row values): [*, G, w, D]."""
        if self.index is None:
            return x[..., lo:hi, :, :]
        return gather_rows(x, self.read_rows[..., lo:hi, :])

    def allowed(self, mask: MaskFunction, lo: int, hi: int) -> torch.Tensor:
        """mask(lo, hi), with empty slots allowed no key."""
        if self.index is None:
            return mask(lo, hi)
        return mask(lo, hi) & (self.index[..., lo:hi, :] < self.rows).unsqueeze(-1)

    def write(self, buffer: torch.Tensor, values: torch.Tensor, lo: int, hi: int) -> None:
        """Blocks lo..hi-1 of ``buffer`` (from ``empty``) = values ([*, G, w, D], or [*, G, w] per row)."""
        per_row = values.dim() < len(self.blocked_shape)
        if self.index is None:
            if per_row:
                buffer[..., lo:hi, :] = values
            else:
                buffer[..., lo:hi, :, :] = values
            return
        rows = self.write_rows[..., lo:hi, :].reshape(-1)
        if per_row:
            buffer.view(-1).index_copy_(0, rows, values.reshape(-1))
        else:
            buffer.view(-1, buffer.shape[-1]).index_copy_(0, rows, values.reshape(-1, buffer.shape[-1]))

    def merge(self, out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor, lo: int,
              hi: int) -> None:
        """Fold one more pass's softmax (part [*, G, w, D], part_lse [*, G, w]) over blocks lo..hi-1 into the
        buffers ``out``/``lse`` (from ``empty``; indexed queries only): one softmax over both sets of keys."""
        rows = self.write_rows[..., lo:hi, :].reshape(-1)
        flat_out, flat_lse = out.view(-1, out.shape[-1]), lse.view(-1)
        old_lse, part_lse = flat_lse.index_select(0, rows), part_lse.reshape(-1)
        total = torch.logaddexp(old_lse, part_lse)
        merged = flat_out.index_select(0, rows).mul_(torch.exp(old_lse - total).unsqueeze(-1))
        merged.add_(part.reshape(-1, out.shape[-1]) * torch.exp(part_lse - total).unsqueeze(-1))
        flat_out.index_copy_(0, rows, merged)
        flat_lse.index_copy_(0, rows, total)

    def add(self, buffer: torch.Tensor, values: torch.Tensor, lo: int, hi: int) -> None:
        """Blocks lo..hi-1 of ``buffer`` (from ``empty``) += values [*, G, w, D] (blocked queries: = values; a
        blocked query is in one pass only)."""
        if self.index is None:
            buffer[..., lo:hi, :, :] = values
            return
        rows = self.write_rows[..., lo:hi, :].reshape(-1)
        buffer.view(-1, buffer.shape[-1]).index_add_(0, rows, values.reshape(-1, buffer.shape[-1]))

    def finish(self, buffer: torch.Tensor, per_row: bool) -> torch.Tensor:
        """``buffer`` without its spare rows."""
        if self.index is None:
            return buffer
        return buffer[..., : self.rows] if per_row else buffer[..., : self.rows, :]


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_index: torch.Tensor,
    mask: MaskFunction,
    scaling: float,
    dropout: float = 0.0,
    group_elements: int = GROUP_ELEMENTS,
    query_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over one KeyPass (see GatheredAttention for shapes): (out [*, nb, w, D], lse [*, nb, w]), or with
    query_index (out [*, Lq, D], lse [*, Lq]) in query's order. group_elements: about how many scores one group of
    query blocks holds (memory per step; the result does not depend on it)."""
    return multi_pass_attention(query, key, value, [KeyPass(key_index, mask, query_index)], scaling, dropout,
                                group_elements)


def multi_pass_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    passes: list[KeyPass],
    scaling: float,
    dropout: float = 0.0,
    group_elements: int = GROUP_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the keys of several passes (GatheredAttention.apply): (out, lse) as gathered_attention."""
    return GatheredAttention.apply(query, key, value, passes, scaling, dropout, group_elements)


def group_spans(blocked_shape: tuple[int, ...], keys_per_query: int, group_elements: int = GROUP_ELEMENTS
                ) -> list[tuple[int, int]]:
    """Ranges of query blocks (of blocked_shape [*, nb, w, D]) processed together (each group's scores hold about
    ``group_elements`` numbers)."""
    *lead, blocks, width, _ = blocked_shape
    size = max(1, group_elements // (math.prod(lead) * width * keys_per_query))
    return spans(blocks, size)


def flat_index(key_index: torch.Tensor, key: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows of key.reshape(-1, D) that the query blocks lo..hi-1 gather: [*, G, K]."""
    return key_index[..., lo:hi, :] + row_offsets(key, 2)


def row_offsets(x: torch.Tensor, trailing: int) -> torch.Tensor:
    """The first row of each leading index of x [*, L, D] in x.reshape(-1, D), shaped [*, 1 (x trailing)]: added to
    positions along L, it gives flat rows."""
    lead = x.shape[:-2]
    return torch.arange(math.prod(lead), device=x.device).view(*lead, *([1] * trailing)) * x.shape[-2]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [*, L, D] at flat rows index [*, G, K] -> [*, G, K, D]."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index.reshape(-1)).view(*index.shape, x.shape[-1])


def scatter_add_rows(grad: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """grad [*, L, D] += rows [*, G, K, D] at flat rows index [*, G, K] (repeated rows add up)."""
    grad.view(-1, grad.shape[-1]).index_add_(0, index.reshape(-1), rows.reshape(-1, grad.shape[-1]))


def masked_scores(queries, keys, allowed, scaling) -> torch.Tensor:
    """Scores [*, G, w, K] with disallowed keys at -inf (exp(-inf) = 0 is fast; exp of a huge finite negative
    number takes libm's slow underflow path, 10-20x slower)."""
    scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scaling)
    return scores.masked_fill_(~allowed, float("-inf"))


def softmax_block_backward(probs, grads, values, delta, dropout: float, seed: int, block_start: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of out = dropout(probs) values for one block: probs [*, w, K] recomputed from the saved lse,
    grads [*, w, D] (d out), values [*, K, D], delta [*, w, 1] = rowsum(d out * out). Returns (the probabilities
    as the forward used them, dropout applied: d values = kept^T grads; d scores = P * (dP - delta), before the
    scale)."""
    grad_probs = torch.matmul(grads, values.transpose(-1, -2))
    kept = probs
    if dropout > 0.0:
        keep = dropout_factors(probs, seed, block_start, dropout)
        grad_probs.mul_(keep)
        kept = probs * keep
    return kept, grad_probs.sub_(delta).mul_(probs)


def dropout_factors(probs: torch.Tensor, seed: int, group_start: int, dropout: float) -> torch.Tensor:
    """Inverted-dropout factors (0 or 1 / (1 - p)) of a group, the same in the forward and the backward."""
    generator = torch.Generator(device=probs.device).manual_seed(seed + group_start)
    keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout
    return keep.to(probs.dtype).div_(1.0 - dropout)
