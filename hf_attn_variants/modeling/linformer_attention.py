"""Linformer attention (Wang et al. 2020): keys and values projected along the sequence to length k.

softmax(Q (E K)^T * scale) (F V), with E, F: [k, max_length] learned. O(N k) time and memory.
E and F describe *relative* positions: for a row of n real keys they are resampled to n columns (column i averages
E's columns over the span [i, i + 1) * max_length / n), so one E serves every length, and padding (on either side)
cannot move a real output. Padded keys/values get zero columns, so their content never reaches real tokens. The
projection is length-normalised (see ``linformer_attention``). The method mixes all positions into each projected
key, so it has no causal form: a causal model gets a clear error.

Initialisation (for converting a trained model): E = F = "block pooling", row j pooling the contiguous positions
floor(i k / max_length) = j, so an input of n tokens pools runs of n / k neighbours; inputs of at most k tokens
are computed exactly by the module. Measured on the real all-MiniLM-L6-v2, k = 256, mean embedding cosine to the
original on held-out Wikipedia passages of ~300 / 512 tokens, before training: block pooling 0.832 / 0.810, and
with the first token exact (``exact_first=1``, the default) 0.862 at 512; the earlier fixed E, folding positions
i = j (mod k) and cut to the input's length, 0.81 / 0.719; the paper's random N(0, 1/k) projection ~0.08 at 512.
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
    leading_keys,
    masked_fill_value,
    per_unpadded_row,
    prepare_call,
    spans,
)
from .gathered_attention import (
    GROUP_ELEMENTS,
    NO_KEY_LSE,
    dropout_factors,
    gathered_attention,
    softmax_block_backward,
)

SHARING_CHOICES = ("headwise", "kv", "none")
# The attended rows (exact first keys + k projected ones) are padded with masked rows to a multiple of this: the
# score and output matmuls of k + 1 = 257 rows ran ~1.4x slower than of 256 or 272 (BLAS remainder paths).
ROW_ALIGNMENT = 16


@dataclasses.dataclass
class LinformerSettings(SettingsBase):
    """k: projected length; max_length: longest input (None = the model's max positions);
    sharing: 'headwise' (E, F shared by the heads of a layer), 'kv' (one E = F per layer), 'none' (per head);
    exact_first: the first real tokens every query attends exactly, outside the projection ([CLS] / <s>, which
    draw 10-21% of the attention in MiniLM's middle layers; pooled with a neighbour their key would be lost);
    window: 0, or w: keys are cut into blocks of w tokens and a query in block i attends the keys of blocks i-1, i,
    i+1 exactly, in place of the projected rows pooled from them (a long-short hybrid, as Transformer-LS: the
    neighbours that draw much of a trained model's attention are not pooled)."""

    variant = "linformer"
    k: int = dataclasses.field(default=256, metadata={"positive_int": True})
    max_length: int | None = dataclasses.field(default=None)
    sharing: str = dataclasses.field(default="headwise", metadata={"choices": SHARING_CHOICES})
    exact_first: int = dataclasses.field(default=1, metadata={"non_negative_int": True})
    window: int = dataclasses.field(default=0, metadata={"non_negative_int": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.exact_first >= self.k:
            raise ValueError(
                f"linformer setting exact_first={self.exact_first} must be below k={self.k} (inputs of at most k "
                "tokens are exact anyway); pass e.g. exact_first=1."
            )
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(
                f"linformer setting max_length={self.max_length!r} must be a positive integer or None "
                "(None = the model's max_position_embeddings)."
            )

    def keys_attended(self, length: int, causal: bool) -> float:
        """The k projected keys and the exact first ones, plus the projection of K and V along the sequence (another
        k per query row), plus the 3 w window keys when set."""
        return 2 * self.k + self.exact_first + min(length, 3 * self.window)


class LinformerState(VariantState):
    """proj_k (E) and proj_v (F): [heads or 1, k, max_length] learned sequence projections."""

    settings_class = LinformerSettings

    def __init__(self, settings: LinformerSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        self.max_length = settings.max_length or max_positions
        proj_heads = num_heads if settings.sharing == "none" else 1
        shape = (proj_heads, settings.k, self.max_length)
        self.proj_k = nn.Parameter(torch.empty(shape))
        self.proj_v = None if settings.sharing == "kv" else nn.Parameter(torch.empty(shape))

    @classmethod
    def for_stock_model(cls, settings, num_heads, head_dim, max_positions, seed):
        raise ValueError(
            "attention 'linformer' has learned projections that a stock checkpoint lacks, so it cannot be switched "
            "on with attn_implementation='linformer'. Convert the model first: "
            "hf_attn_variants.convert(path, attention='linformer'), then fine-tune or distil it."
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        pooling = block_pooling(self.settings.k, self.max_length)
        for param in (self.proj_k, self.proj_v):
            if param is not None:
                param.copy_(pooling.expand_as(param).to(param.device, param.dtype))

    def prune_heads(self, keep_heads: list[int]) -> None:
        super().prune_heads(keep_heads)
        if self.proj_k.shape[0] > 1:  # sharing="none": one projection per head
            index = torch.tensor(keep_heads, device=self.proj_k.device)
            self.proj_k = nn.Parameter(self.proj_k.detach()[index].clone())
            if self.proj_v is not None:
                self.proj_v = nn.Parameter(self.proj_v.detach()[index].clone())

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, F), each [heads or 1, k, max_length]."""
        return self.proj_k, self.proj_k if self.proj_v is None else self.proj_v


def block_pooling(k: int, length: int) -> torch.Tensor:
    """[k, length] 0/1 matrix with row j summing the contiguous positions i with floor(i k / length) = j."""
    positions = torch.arange(length)
    return (positions[None, :] * k // length == torch.arange(k)[:, None]).float()


def fitted_projection(proj: torch.Tensor, length: int, key_mask: torch.Tensor | None, skip: int = 0) -> torch.Tensor:
    """proj [H or 1, k, max_length] resampled to each row's real keys after its first ``skip`` -> [B or 1,
    H or 1, k, length].

    Column i of the result is the mean of proj's columns over the span [i, i + 1) * max_length / n of a row of n
    projected keys (``adaptive_avg_pool1d``), placed at that row's (skip + i)-th real position; padded and skipped
    positions get zero columns. So E describes relative positions: one E serves every length and every padding."""
    def pool(proj: torch.Tensor, n: int) -> torch.Tensor:  # pooling to its own width is the identity: skip it
        return proj if n == proj.shape[-1] else torch.nn.functional.adaptive_avg_pool1d(proj, n)

    if key_mask is None:
        return torch.nn.functional.pad(pool(proj, length - skip), (skip, 0)).unsqueeze(0)
    count = key_mask.cumsum(-1)  # [B, length]: real keys up to and including each position
    kept = key_mask & (count > skip)
    rank = (count - 1 - skip).clamp_min(0)  # each projected key's index among the row's projected keys
    projected = kept.sum(-1)  # [B]
    fitted = proj.new_zeros(key_mask.shape[0], *proj.shape[:2], length)
    for n in projected.unique().tolist():
        if n == 0:
            continue
        rows = (projected == n).nonzero().squeeze(1)
        columns = pool(proj, n)[:, :, rank[rows]]  # [H or 1, k, rows, length]
        fitted[rows] = columns.permute(2, 0, 1, 3) * kept[rows, None, None, :].to(proj.dtype)
    return fitted


def project_along_sequence(proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """proj [B or 1, H or 1, k, L] applied along the sequence of x [B, H, L, D] -> [B, H, k, D].

    A projection shared by the heads is one matmul over the full hidden width, [k, L] x [L, H*D] (x is a head-split
    view of the layer's [B, L, H*D] projections, so no copy), instead of H matmuls with a broadcast copy of proj."""
    batch, heads, length, dim = x.shape
    if proj.shape[1] != 1:
        return torch.matmul(proj, x)
    flat = x.transpose(1, 2).reshape(batch, length, heads * dim)
    low = torch.matmul(proj[:, 0], flat)  # [B, k, H*D]
    return low.view(batch, -1, heads, dim).transpose(1, 2)


def linformer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    proj_k: torch.Tensor,
    proj_v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    exact_first: int = 0,
    window: int = 0,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D] at positions Lk - Lq + i; key/value [B, H, Lk, D]; proj_* [H or 1, k,
    max_length]; key_mask [B, Lk] bool or None; the first ``exact_first`` real keys are attended exactly, the rest
    projected; ``window`` > 0 (needs key_mask None: padded rows go through per_unpadded_row): see
    ``window_column``. Returns the output [B, H, Lq, D].

    Length-normalised projection: projected row j is the E-weighted *mean* of the real keys (values) feeding it,
    with weight w_j = sum_i |E_ji| over real positions, and its logit gets + log w_j, so a row pooling c equal keys
    counts like those c keys. One E then works at every length; rows with w_j = 0 are masked out. With E the
    identity this is exact attention. Padded positions get zero columns in E, so their keys and values never
    reach a real token.
    """
    length = key.shape[2]
    fitted_k = fitted_projection(proj_k, length, key_mask, exact_first).to(key.dtype)
    if proj_v is proj_k:  # sharing="kv": one E = F, resampled once
        projections = [fitted_k, fitted_k]
    else:
        projections = [fitted_k, fitted_projection(proj_v, length, key_mask, exact_first).to(key.dtype)]
    tiny = torch.finfo(key.dtype).tiny
    weight_k, weight_v = (proj.abs().sum(-1, keepdim=True) for proj in projections)  # [B or 1, H or 1, k, 1]
    key_low = project_along_sequence(projections[0], key) / weight_k.clamp_min(tiny)  # (B, H, k, D)
    value_low = project_along_sequence(projections[1], value) / weight_v.clamp_min(tiny)  # (B, H, k, D)
    # The length normalisation as one additive bias per projected key (an empty row: masked out).
    row_weight = weight_k.transpose(-1, -2)  # (B or 1, H or 1, 1, k)
    bias = torch.log(row_weight.clamp_min(tiny)).masked_fill(row_weight == 0, masked_fill_value(key.dtype))
    if exact_first:  # the first real keys join the projected ones as rows of their own (bias 0; absent: masked)
        first_key, first_value, _, exists = leading_keys(key, value, key_mask, exact_first)
        key_low, value_low = torch.cat([first_key, key_low], 2), torch.cat([first_value, value_low], 2)
        first_bias = torch.zeros_like(exists, dtype=bias.dtype).masked_fill(~exists, masked_fill_value(key.dtype))
        bias = torch.cat([first_bias[:, None, None, :].expand(*bias.shape[:3], -1), bias], -1)
    spare = -key_low.shape[2] % ROW_ALIGNMENT  # rows: exact_first + k
    if spare:  # masked rows: probability 0, but aligned matmuls
        key_low, value_low = (torch.nn.functional.pad(x, (0, 0, 0, spare)) for x in (key_low, value_low))
        bias = torch.nn.functional.pad(bias, (0, spare), value=masked_fill_value(key.dtype))
    dtype = compute_dtype(query.dtype)
    q = query.to(dtype)
    window_logit = window_out = replaced = None
    if window:
        if key_mask is not None:
            raise ValueError("linformer_attention with a window takes unpadded rows (key_mask=None); run padded "
                             "batches through per_unpadded_row.")
        window_logit, window_out, replaced = window_column(q, key.to(dtype), value.to(dtype), fitted_k,
                                                           key_low.shape[2], exact_first, window, scaling, dropout)
    out = RowsAttention.apply(q, key_low.to(dtype), value_low.to(dtype), bias.to(dtype), window_logit, window_out,
                              replaced, scaling, dropout)
    return out.to(query.dtype)


class RowsAttention(torch.autograd.Function):
    """out = softmax(q rows^T * scale + bias) values, every query against the same few rows, by blocks of queries,
    with a flash-style backward: nothing of size Lq x rows is kept (the scores are recomputed from the saved
    log-sum-exp), and every block's temporaries are small enough to be reused from the allocator's cache (the
    dense [Lq, rows] probabilities and their softmax backward, 200 MB per layer at 16K tokens, cost more in fresh
    memory pages than in arithmetic).

    query [B, H, Lq, D]; rows/values [B, H, R, D]; bias [B or 1, H or 1, 1, R]. Optionally (the exact window), one
    more column per query joins the softmax: extra_logit [B, H, Lq] with its value extra_value [B, H, Lq, D], and
    excluded [B or 1, H or 1, Lq, R] bool names rows a query does not attend. Returns [B, H, Lq, D]. Dropout (on the
    rows' probabilities) comes from a seed drawn from torch's generator; the backward regenerates the masks."""

    @staticmethod
    def forward(ctx, query, rows, values, bias, extra_logit, extra_value, excluded, scaling, dropout):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1])
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0.0 else 0
        parts = (rows, bias, excluded, scaling)
        for lo, hi in query_blocks(query, rows.shape[2]):
            scores = block_scores(query, *parts, lo, hi)
            block_lse = torch.logsumexp(scores, dim=-1)
            if extra_logit is not None:
                block_lse = torch.logaddexp(block_lse, extra_logit[:, :, lo:hi])
            block_lse = block_lse.clamp_min_(NO_KEY_LSE)
            probs = scores.sub_(block_lse.unsqueeze(-1)).exp_()
            if dropout > 0.0:
                probs.mul_(dropout_factors(probs, seed, lo, dropout))
            block_out = torch.matmul(probs, values)
            if extra_logit is not None:
                share = torch.exp(extra_logit[:, :, lo:hi] - block_lse).unsqueeze(-1)
                block_out.add_(share * extra_value[:, :, lo:hi])
            out[:, :, lo:hi] = block_out
            lse[:, :, lo:hi] = block_lse
        ctx.save_for_backward(query, rows, values, bias, extra_logit, extra_value, excluded, out, lse)
        ctx.settings = (scaling, dropout, seed)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, rows, values, bias, extra_logit, extra_value, excluded, out, lse = ctx.saved_tensors
        scaling, dropout, seed = ctx.settings
        grad_query = torch.empty_like(query)
        grad_rows, grad_values = torch.zeros_like(rows), torch.zeros_like(values)
        grad_scores_sum = query.new_zeros(*query.shape[:2], 1, rows.shape[2])  # d bias, before broadcasting
        delta = (grad_out * out).sum(-1, keepdim=True)  # d scores = P * (dP - rowsum(dO * O))
        grad_extra_logit = grad_extra_value = None
        if extra_logit is not None:
            share = torch.exp(extra_logit - lse).unsqueeze(-1)  # the extra column's probability [B, H, Lq, 1]
            grad_extra_value = share * grad_out
            grad_extra_logit = (share * ((grad_out * extra_value).sum(-1, keepdim=True) - delta)).squeeze(-1)
        parts = (rows, bias, excluded, scaling)
        for lo, hi in query_blocks(query, rows.shape[2]):
            q, grad = query[:, :, lo:hi], grad_out[:, :, lo:hi]
            probs = block_scores(query, *parts, lo, hi).sub_(lse[:, :, lo:hi].unsqueeze(-1)).exp_()
            kept, grad_scores = softmax_block_backward(probs, grad, values, delta[:, :, lo:hi], dropout, seed, lo)
            grad_values.add_(torch.matmul(kept.transpose(-1, -2), grad))
            grad_scores_sum.add_(grad_scores.sum(-2, keepdim=True))
            grad_query[:, :, lo:hi] = torch.matmul(grad_scores, rows)
            grad_rows.add_(torch.matmul(grad_scores.transpose(-1, -2), q))
        grad_query.mul_(scaling)
        grad_rows.mul_(scaling)
        shared = [d for d in range(2) if bias.shape[d] == 1 < grad_scores_sum.shape[d]]  # broadcast dims of bias
        grad_bias = grad_scores_sum.sum(shared, keepdim=True) if shared else grad_scores_sum
        return grad_query, grad_rows, grad_values, grad_bias, grad_extra_logit, grad_extra_value, None, None, None


def block_scores(query, rows, bias, excluded, scaling, lo: int, hi: int) -> torch.Tensor:
    """RowsAttention's scores of queries lo..hi-1: [B, H, hi - lo, R], excluded rows at -inf."""
    scores = torch.matmul(query[:, :, lo:hi], rows.transpose(-1, -2)).mul_(scaling).add_(bias)
    return scores if excluded is None else scores.masked_fill_(excluded[..., lo:hi, :], float("-inf"))


def query_blocks(query: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    """[lo, hi) query ranges whose scores [B, H, hi - lo, rows] hold about GROUP_ELEMENTS numbers."""
    size = max(1, GROUP_ELEMENTS // (query.shape[0] * query.shape[1] * rows))
    return spans(query.shape[2], size)


def window_column(query, key, value, fitted_k, rows: int, first: int, window: int, scaling: float, dropout: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the exact window adds to the rows' softmax (``RowsAttention``): one more column per query, holding the
    log-sum-exp [B, H, Lq] and output [B, H, Lq, D] of the query's window keys (``window_attention``), and which of
    the ``rows`` (the first keys, then k projected, then alignment rows) the window replaces (``rows_in_window``;
    [B or 1, H or 1, Lq, rows] bool), so that no key counts twice."""
    replaced = rows_in_window(fitted_k, query.shape[2], window)  # [B or 1, H or 1, Lq, k]
    # the exact first rows stay; the alignment rows are masked by their bias already
    replaced = torch.nn.functional.pad(replaced, (first, rows - first - replaced.shape[-1]))
    out_window, lse_window = window_attention(query, key, value, window, first, scaling, dropout)
    return lse_window, out_window, replaced


def rows_in_window(fitted: torch.Tensor, query_length: int, window: int) -> torch.Tensor:
    """Which projected rows each query's exact window replaces: those whose centre (the |E|-weighted mean position
    of the keys they pool) lies in the query's blocks i-1, i, i+1. With block pooling that is every row pooled
    from there, so no key is counted twice. fitted [B or 1, H or 1, k, Lk] -> [B or 1, H or 1, Lq, k] bool."""
    length = fitted.shape[-1]
    magnitude = fitted.detach().abs()
    positions = torch.arange(length, device=fitted.device, dtype=fitted.dtype)
    centre = torch.matmul(magnitude, positions) / magnitude.sum(-1).clamp_min(torch.finfo(fitted.dtype).tiny)
    block = (torch.arange(query_length, device=fitted.device) + length - query_length) // window
    lower, upper = ((block - 1) * window).unsqueeze(-1), ((block + 2) * window).unsqueeze(-1)  # [Lq, 1]
    centre = centre.unsqueeze(-2)  # [B or 1, H or 1, 1, k]
    return (centre >= lower) & (centre < upper)


def window_attention(query, key, value, window: int, skip: int, scaling: float, dropout: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax of each query over the keys of its blocks i-1, i, i+1 (blocks of ``window`` positions), the
    first ``skip`` keys left out (they are attended as rows of their own). query [B, H, Lq, D] at positions
    Lk - Lq + i; key/value [B, H, Lk, D]. Computed by query blocks against 3 w keys (``gathered_attention``: memory
    O(N w) per group, nothing of it kept for the backward). Returns (out [B, H, Lq, D], lse [B, H, Lq])."""
    bsz, heads, lq, dim = query.shape
    lk = key.shape[2]
    lead, first_block = (lk - lq) % window, (lk - lq) // window
    count = -(-(lead + lq) // window)
    blocked = torch.nn.functional.pad(query, (0, 0, lead, count * window - lead - lq)).view(bsz, heads, count,
                                                                                          window, dim)
    blocks = torch.arange(first_block, first_block + count, device=query.device)
    positions = (blocks.unsqueeze(-1) - 1) * window + torch.arange(3 * window, device=query.device)  # [count, 3w]
    allowed = ((positions >= skip) & (positions < lk)).unsqueeze(-2)  # [count, 1, 3w]
    out, lse = gathered_attention(blocked, key, value, positions.clamp(0, lk - 1), lambda lo, hi: allowed[lo:hi],
                                  scaling, dropout)
    out = out.reshape(bsz, heads, count * window, dim)[:, :, lead : lead + lq]
    return out, lse.reshape(bsz, heads, count * window)[:, :, lead : lead + lq]  # already >= NO_KEY_LSE


def linformer_attention_forward(
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
    if getattr(module, "is_causal", False):
        raise ValueError(
            "attention 'linformer' is not causal: its projections mix future positions into every key. "
            "Use 'performer', 'bigbird' or 'lsh' for decoders (GPT-2, Llama, ...)."
        )
    call = prepare_call(module, LinformerState, query, key, value, attention_mask, scaling, kwargs.get("is_causal"))
    state = call.state
    if call.key.shape[2] > state.max_length:
        raise ValueError(
            f"input length {call.key.shape[2]} exceeds this Linformer's max_length {state.max_length}. Truncate the "
            "input, or convert again with a larger max_length (e.g. convert(..., max_length=N))."
        )
    proj_k, proj_v = state.projections()
    first, window = state.settings.exact_first, state.settings.window

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # one row, no padding
        if k.shape[2] <= state.settings.k:  # k projections of <= k keys lose nothing: compute it exactly
            return exact_attention(q, k, v, None, False, call.scaling, dropout)
        return linformer_attention(q, k, v, proj_k, proj_v, None, call.scaling, dropout, first, window)

    lengths = call.key.shape[2] if call.key_mask is None else call.key_mask.sum(-1)
    batched = call.key_mask is None or not window  # the window blocks count real tokens: padded rows one by one
    if batched and bool((torch.as_tensor(lengths) > state.settings.k).all()):  # no row takes the exact path
        out = linformer_attention(query, call.key, call.value, proj_k, proj_v, call.key_mask, call.scaling,
                                  dropout, first, window)
        return interface_output(out)
    # Rows of at most k real tokens are exact whatever the padding (training cannot move them off exactness).
    return interface_output(per_unpadded_row(attend, query, call.key, call.value, call.key_mask))
