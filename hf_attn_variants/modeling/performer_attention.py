"""Performer attention, FAVOR+ (Choromanski et al. 2021): positive orthogonal random features for softmax.

exp(q.k * scale) ~ phi(q).phi(k) with phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x sqrt(scale), W [m, D]
orthogonal Gaussian rows. Non-causal: O(N m D). Causal: chunked prefix sums, O(N m) memory (never N x m x D).
Stabilisers: each query's features are divided by their own max, keys by a running max over the valid keys seen
so far; both cancel in the normalised output, so fp32/bf16 never overflow. Padded keys are zeroed out of both the
numerator and the normaliser. Features are fixed (saved buffer) unless ``redraw_interval`` > 0.
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
    interface_output,
    per_unpadded_row,
    prepare_call,
    spans,
)
from .decoding_caches import RecurrentStateLayer, decoding_layer

KERNELS = ("softmax", "relu", "learned")
RELU_EPSILON = 1e-3
# A normaliser below this means every key that matters to the query underflowed (huge logits): the row is left at
# ~0 (its numerator) instead of 0/0, which keeps outputs and gradients finite without biasing ordinary rows.
NORMALISER_FLOOR = 1e-12
# Rows per block of the non-causal passes: phi of one block ([B, H, 1024, m]) is all that is ever held.
NONCAUSAL_BLOCK = 1024


@dataclasses.dataclass
class PerformerSettings(SettingsBase):
    """num_features: m random features; kernel: 'softmax' (FAVOR+), 'relu', or 'learned' (FAVOR+'s positive
    softmax features with a trainable projection per head, initialised at the FAVOR+ draw, so training starts where
    FAVOR+ is; as T2R/Hedgehog learn their feature maps); redraw_interval: redraw the features every N training
    forwards (0 = fixed; not with 'learned'); chunk_size: block length of the causal prefix sums; window: 0, or
    the block size w of the LoLCATs-style hybrid: each query attends exactly (softmax) to the keys of its own
    w-token block and the neighbouring ones (causal: its own block up to itself and the previous block), and through
    the features to every other key, all in one normaliser. Inputs of at most w tokens are then exact;
    exact_first (with a window, at most w): the first real tokens every query attends exactly, outside the linear
    part ([CLS] / <s>, an attention sink the features must otherwise carry for every query beyond the window)."""

    variant = "performer"
    num_features: int = dataclasses.field(default=256, metadata={"positive_int": True})
    kernel: str = dataclasses.field(default="softmax", metadata={"choices": KERNELS})
    redraw_interval: int = dataclasses.field(default=0, metadata={"non_negative_int": True})
    chunk_size: int = dataclasses.field(default=128, metadata={"positive_int": True})
    window: int = dataclasses.field(default=0, metadata={"non_negative_int": True})
    exact_first: int = dataclasses.field(default=0, metadata={"non_negative_int": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.exact_first and not 0 < self.exact_first <= self.window:
            raise ValueError(
                f"performer setting exact_first={self.exact_first} must be at most the exact window, and needs one "
                f"(window={self.window}); pass e.g. window=64, exact_first=1, or exact_first=0."
            )
        if self.window and self.kernel == "relu":
            raise ValueError(
                "performer setting window needs positive softmax features (kernel='softmax' or 'learned'); the "
                "exact window and the linear part must estimate the same exp(q.k). Pass kernel='learned'."
            )
        if self.kernel == "learned" and self.redraw_interval:
            raise ValueError(
                f"performer setting redraw_interval={self.redraw_interval} would overwrite the learned features of "
                "kernel='learned'; pass redraw_interval=0."
            )

    def keys_attended(self, length: int, causal: bool) -> float:
        """Feature maps of q and k and the m x D state products (3 m), plus the exact window blocks when set."""
        window = (2 if causal else 3) * self.window
        return 3 * self.num_features + min(length, window + self.exact_first)


def orthogonal_gaussian(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, dim] blocks of orthogonal rows, each row rescaled to a chi(dim) norm (FAVOR+ 'ORF').

    Drawn in float32 on the CPU whatever the default dtype (QR has no bf16/fp16 kernel; the draw must not depend on
    the dtype a model is built in); callers cast."""
    blocks = []
    for _ in range(math.ceil(num_rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float32))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:num_rows]
    norms = torch.randn(num_rows, dim, generator=generator, dtype=torch.float32).norm(dim=1, keepdim=True)
    return rows * norms


class PerformerState(VariantState):
    """features: [m, D] random projection (buffer, saved with the weights); with kernel='learned' a parameter
    [H, m, D], one projection per head, each starting at its own FAVOR+ draw."""

    settings_class = PerformerSettings

    def __init__(self, settings: PerformerSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        if settings.kernel == "learned":
            self.features = nn.Parameter(torch.empty(num_heads, settings.num_features, head_dim))
        else:
            self.register_buffer("features", torch.empty(settings.num_features, head_dim))
        # Counters are saved with the weights, so a reloaded model continues the same redraw schedule.
        self.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.forward_calls.zero_()
        self.draws.zero_()
        self.redraw(0)

    @torch.no_grad()
    def redraw(self, draw: int) -> None:
        """Draw feature set number ``draw`` (0 = the saved default) deterministically from the seed."""
        heads = self.features.shape[0] if self.features.dim() == 3 else 1
        values = orthogonal_gaussian(heads * self.settings.num_features, self.head_dim, self.generator(draw))
        self.features.copy_(values.view_as(self.features).to(self.features.device, self.features.dtype))

    def prune_heads(self, keep_heads: list[int]) -> None:
        super().prune_heads(keep_heads)
        if self.features.dim() == 3:  # learned: one projection per head
            index = torch.tensor(keep_heads, device=self.features.device)
            self.features = nn.Parameter(self.features.detach()[index].clone())

    @torch.no_grad()
    def step(self, training: bool) -> None:
        """Count a model forward; redraw every ``redraw_interval`` training forwards when asked to. Called once per
        forward of the whole model (a forward pre-hook of the model class), never by the attention function, so
        activation checkpointing's recomputation in the backward sees the features its forward used."""
        if not training or self.settings.redraw_interval == 0:
            return
        self.forward_calls += 1
        if int(self.forward_calls) % self.settings.redraw_interval == 0:
            self.draws += 1
            self.redraw(int(self.draws))


class FeatureMap:
    """phi(x) for scaled inputs xs = x sqrt(scale) [..., n, D] -> [..., n, m], and its backward.

    features: [m, D] shared by the heads, or [H, m, D] (learned: one per head). 'learned' computes as 'softmax';
    when ``grad_features`` is a tensor, ``backward`` also accumulates d loss / d features into it.

    softmax: phi = exp(xs W^T - |xs|^2/2 - shift); relu: phi = relu(xs W^T)/sqrt(m) + eps. ``shift`` (queries: the
    row max, keys: a max over valid keys) is a common factor that cancels in the normalised output, so the backward
    treats it as a constant - which is exact.
    """

    def __init__(self, features: torch.Tensor, kernel: str, grad_features: torch.Tensor | None = None):
        self.features = features
        self.kernel = "softmax" if kernel == "learned" else kernel
        self.grad_features = grad_features
        self.num_features = features.shape[-2]

    def logits(self, xs: torch.Tensor) -> torch.Tensor:
        """The pre-activation: xs W^T - |xs|^2/2 (softmax) or xs W^T (relu). [..., n, D] -> [..., n, m]."""
        out = torch.matmul(xs, self.features.transpose(-1, -2))
        if self.kernel == "softmax":
            out.sub_(0.5 * (xs * xs).sum(-1, keepdim=True))
        return out

    def queries(self, xs: torch.Tensor) -> torch.Tensor:
        """phi(q), each row divided by its largest feature."""
        return self.queries_from_logits(self.logits(xs))

    def queries_from_logits(self, out: torch.Tensor) -> torch.Tensor:
        """phi(q) from query logits (consumed in place)."""
        if self.kernel == "relu":
            return out.relu_().div_(math.sqrt(self.num_features)).add_(RELU_EPSILON)
        return out.sub_(out.amax(-1, keepdim=True)).exp_()

    def keys(self, logits: torch.Tensor, shift: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
        """phi(k) from key logits (consumed in place), divided by exp(shift); padded keys are 0."""
        if self.kernel == "relu":
            out = logits.relu_().div_(math.sqrt(self.num_features)).add_(RELU_EPSILON)
        else:
            out = logits.sub_(shift).exp_()
        return out if valid is None else out.masked_fill_(~valid, 0.0)

    def advance_shift(self, logits, valid, shift, state):
        """The running max over the valid keys so far, [B, H, 1, 1], after a span of key logits, and the state
        summed against the old max rescaled to it (a new tensor: earlier states stay as they were). relu needs no
        shift: (None, state)."""
        if self.kernel == "relu":
            return None, state
        if valid is not None:
            logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
        span_max = logits.amax(dim=(-1, -2), keepdim=True)
        new_shift = span_max if shift is None else torch.maximum(shift, span_max)
        if state is not None:
            state = state * torch.exp(shift - new_shift)
        return new_shift, state

    def backward(self, xs: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor) -> torch.Tensor:
        """d loss / d xs from d loss / d phi (grad_phi is consumed). Padded keys have phi = 0, so no gradient."""
        if self.kernel == "relu":  # phi > eps exactly where the pre-activation was positive
            grad = grad_phi.mul_(phi > RELU_EPSILON).div_(math.sqrt(self.num_features))
            self._accumulate_feature_grad(grad, xs)
            return torch.matmul(grad, self.features)
        grad = grad_phi.mul_(phi)  # d loss / d logits
        self._accumulate_feature_grad(grad, xs)
        return torch.matmul(grad, self.features).sub_(xs * grad.sum(-1, keepdim=True))

    def _accumulate_feature_grad(self, grad_logits: torch.Tensor, xs: torch.Tensor) -> None:
        """logits = xs W^T (- |xs|^2 / 2): d W = grad_logits^T xs, summed over the batch (and heads if shared)."""
        if self.grad_features is None:
            return
        grad = torch.matmul(grad_logits.transpose(-1, -2), xs)  # [B, H, m, D]
        self.grad_features.add_(grad.sum(0) if self.grad_features.dim() == 3 else grad.sum((0, 1)))


def floored(denominator: torch.Tensor) -> torch.Tensor:
    """The denominator with underflowed rows (< NORMALISER_FLOOR) replaced by 1 (their output is the numerator)."""
    return denominator.masked_fill(denominator < NORMALISER_FLOOR, 1.0)


def output_gradients(grad: torch.Tensor, out: torch.Tensor, denominator: torch.Tensor):
    """For out = numerator / denominator: (d numerator, d denominator) = (g / den, -(g . out) / den)."""
    den = floored(denominator)
    grad_den = -(grad * out).sum(-1, keepdim=True) / den
    return grad / den, grad_den.masked_fill_(denominator < NORMALISER_FLOOR, 0.0)


def rows(x: torch.Tensor | None, span: tuple[int, int]) -> torch.Tensor | None:
    """x [B, H, L, ...] restricted to the rows of ``span`` (None stays None)."""
    return None if x is None else x[:, :, span[0] : span[1]]


def performer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: torch.Tensor,
    key_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    kernel: str = "softmax",
    chunk_size: int = 128,
    block_rows: int = NONCAUSAL_BLOCK,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D]; key/value [B, H, Lk, D]; features [m, D] or [H, m, D] (differentiable:
    a learned kernel gets its gradient); key_mask [B, Lk] bool. chunk_size: rows per step of the causal prefix
    sums; block_rows: rows per step of the non-causal pass (memory per step; the result does not depend on it).

    Returns [B, H, Lq, D] in the query's dtype; internal sums are fp32. In causal mode query i is at position
    Lk - Lq + i (so decoding with a KV cache gives what the full sequence gives).
    """
    dtype = compute_dtype(query.dtype)
    valid = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, Lk, 1)
    function = CausalFavor if is_causal else NonCausalFavor
    out = function.apply(query.to(dtype), key.to(dtype), value.to(dtype), features.to(dtype), valid,
                         scaling, kernel, chunk_size if is_causal else block_rows)
    return out.to(query.dtype)


def _scaled_inputs(query, key, value, scaling):
    """(q sqrt(scale), k sqrt(scale), [v, 1]): the ones column makes one matmul give numerator and denominator."""
    root = math.sqrt(scaling)
    ones = value.new_ones(value.shape[:-1] + (1,))
    return query * root, key * root, torch.cat([value, ones], dim=-1)


def _feature_grad_holder(ctx, features: torch.Tensor) -> torch.Tensor | None:
    """A zero tensor to accumulate the features' gradient in, when they need one (kernel='learned')."""
    return torch.zeros_like(features) if ctx.needs_input_grad[3] else None


class NonCausalFavor(torch.autograd.Function):
    """out = phi(q) S / phi(q) z with S = sum_k phi(k) v^T, z = sum_k phi(k). The forward and the backward run over
    row blocks and recompute phi in the backward, so no [N, m] tensor is kept: O(N D + m D) memory."""

    @staticmethod
    def forward(ctx, query, key, value, features, valid, scaling, kernel, block):
        qs, ks, v1 = _scaled_inputs(query, key, value, scaling)
        fmap = FeatureMap(features, kernel)
        shift, state = None, None  # state: [B, H, m, D + 1] = (S, z) relative to exp(shift)
        for span in spans(ks.shape[2], block):
            logits = fmap.logits(rows(ks, span))
            shift, state = fmap.advance_shift(logits, rows(valid, span), shift, state)
            phi = fmap.keys(logits, shift, rows(valid, span))
            contribution = torch.matmul(phi.transpose(-1, -2), rows(v1, span))
            state = contribution if state is None else state + contribution
        out = torch.empty_like(query)
        denominator = query.new_empty(query.shape[:-1] + (1,))
        for span in spans(qs.shape[2], block):
            both = torch.matmul(fmap.queries(rows(qs, span)), state)
            out[:, :, span[0] : span[1]] = both[..., :-1] / floored(both[..., -1:])
            denominator[:, :, span[0] : span[1]] = both[..., -1:]
        ctx.save_for_backward(query, key, value, features, valid, state, shift, out, denominator)
        ctx.settings = (scaling, kernel, block)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises instead of going wrong
    def backward(ctx, grad_out):
        query, key, value, features, valid, state, shift, out, denominator = ctx.saved_tensors
        scaling, kernel, block = ctx.settings
        qs, ks, v1 = _scaled_inputs(query, key, value, scaling)
        grad_features = _feature_grad_holder(ctx, features)
        fmap = FeatureMap(features, kernel, grad_features)
        grad_num, grad_den = output_gradients(grad_out, out, denominator)
        grad_both = torch.cat([grad_num, grad_den], dim=-1)  # [B, H, Lq, D + 1]
        grad_query, grad_state = torch.empty_like(query), torch.zeros_like(state)
        for span in spans(qs.shape[2], block):
            phi = fmap.queries(rows(qs, span))
            grad_span = rows(grad_both, span)
            grad_state.add_(torch.matmul(phi.transpose(-1, -2), grad_span))
            grad_phi = torch.matmul(grad_span, state.transpose(-1, -2))
            grad_query[:, :, span[0] : span[1]] = fmap.backward(rows(qs, span), phi, grad_phi)
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
        for span in spans(ks.shape[2], block):
            phi = fmap.keys(fmap.logits(rows(ks, span)), shift, rows(valid, span))
            grad_phi = torch.matmul(rows(v1, span), grad_state.transpose(-1, -2))
            grad_value[:, :, span[0] : span[1]] = torch.matmul(phi, grad_state[..., :-1])
            grad_key[:, :, span[0] : span[1]] = fmap.backward(rows(ks, span), phi, grad_phi)
        root = math.sqrt(scaling)
        return grad_query.mul_(root), grad_key.mul_(root), grad_value, grad_features, None, None, None, None


class CausalFavor(torch.autograd.Function):
    """Causal linear attention by chunks of c queries: each chunk sees the prefix state (sum phi(k) [v, 1]^T over
    earlier keys, [B, H, m, D + 1]) plus an exact lower-triangular c x c block. Key features of span j are taken
    against a running max over the valid keys so far (shift_j, non-decreasing), the prefix state is rescaled when it
    grows. The backward walks the chunks in reverse carrying the state's gradient, recomputing phi per chunk:
    O(N m / c + c^2) memory, no N x m x D tensor and no per-chunk autograd graph."""

    @staticmethod
    def forward(ctx, query, key, value, features, valid, scaling, kernel, chunk):
        qs, ks, v1 = _scaled_inputs(query, key, value, scaling)
        key_spans = causal_key_spans(qs.shape[2], ks.shape[2], chunk)
        run = causal_pass(qs, ks, v1, FeatureMap(features, kernel), valid, key_spans)
        ctx.save_for_backward(query, key, value, features, valid, run.out, run.denominator)
        ctx.settings = (scaling, kernel, key_spans, run.shifts, run.prefixes)
        return run.out

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises instead of going wrong
    def backward(ctx, grad_out):
        query, key, value, features, valid, out, denominator = ctx.saved_tensors
        scaling, kernel, key_spans, shifts, prefixes = ctx.settings
        qs, ks, v1 = _scaled_inputs(query, key, value, scaling)
        grad_features = _feature_grad_holder(ctx, features)
        fmap = FeatureMap(features, kernel, grad_features)
        start = ks.shape[2] - qs.shape[2]
        grad_num, grad_den = output_gradients(grad_out, out, denominator)
        grad_both = torch.cat([grad_num, grad_den], dim=-1)
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        carry = None  # gradient of the prefix state the next span saw, in that span's shift units
        for j in reversed(range(len(key_spans))):
            span, shift = key_spans[j], shifts[j]
            phi_k = fmap.keys(fmap.logits(rows(ks, span)), shift, rows(valid, span))
            grad_state = None  # gradient of this span's contribution to later prefixes
            if carry is not None:
                grad_state = carry if shift is None else carry * torch.exp(shift - shifts[j + 1])
            grad_phi_k = (torch.zeros_like(phi_k) if grad_state is None
                          else torch.matmul(rows(v1, span), grad_state.transpose(-1, -2)))
            grad_v = None if grad_state is None else torch.matmul(phi_k, grad_state[..., :-1])
            if span[0] >= start:
                q_span = (span[0] - start, span[1] - start)
                phi_q = fmap.queries(rows(qs, q_span))
                grad_span = rows(grad_both, q_span)
                local = torch.matmul(phi_q, phi_k.transpose(-1, -2)).tril_()
                grad_local = torch.matmul(grad_span, rows(v1, span).transpose(-1, -2)).tril_()
                grad_phi_q = torch.matmul(grad_local, phi_k)
                grad_phi_k.add_(torch.matmul(grad_local.transpose(-1, -2), phi_q))
                local_v = torch.matmul(local.transpose(-1, -2), grad_span[..., :-1])
                grad_v = local_v if grad_v is None else grad_v.add_(local_v)
                prefix = prefixes[j]
                if prefix is not None:
                    grad_phi_q.add_(torch.matmul(grad_span, prefix.transpose(-1, -2)))
                    used = torch.matmul(phi_q.transpose(-1, -2), grad_span)
                    carry = used if grad_state is None else used.add_(grad_state)
                grad_query[:, :, q_span[0] : q_span[1]] = fmap.backward(rows(qs, q_span), phi_q, grad_phi_q)
            grad_value[:, :, span[0] : span[1]] = 0.0 if grad_v is None else grad_v
            grad_key[:, :, span[0] : span[1]] = fmap.backward(rows(ks, span), phi_k, grad_phi_k)
        root = math.sqrt(scaling)
        return grad_query.mul_(root), grad_key.mul_(root), grad_value, grad_features, None, None, None, None


@dataclasses.dataclass
class CausalRun:
    """What one causal pass leaves: outputs and their normalisers, the per-span shifts and prefix states (for the
    backward), and the final state and shift (for recurrent decoding)."""

    out: torch.Tensor
    denominator: torch.Tensor
    shifts: list
    prefixes: list
    state: torch.Tensor | None
    shift: torch.Tensor | None


def causal_pass(qs, ks, v1, fmap: FeatureMap, valid, key_spans, state=None, shift=None) -> CausalRun:
    """The causal recurrence over ``key_spans``, continuing from (``state``, ``shift``) when given.

    qs/ks [B, H, L, D] scaled, v1 [B, H, Lk, D + 1]; the queries are the last Lq key positions. Each span's keys see
    the prefix state plus an exact lower-triangular block; the state is rescaled when the running max grows."""
    start = ks.shape[2] - qs.shape[2]
    out = torch.empty(qs.shape, dtype=qs.dtype, device=qs.device)
    denominator = qs.new_empty(qs.shape[:-1] + (1,))
    shifts, prefixes = [], []
    for span in key_spans:
        logits = fmap.logits(rows(ks, span))
        shift, state = fmap.advance_shift(logits, rows(valid, span), shift, state)
        shifts.append(shift)
        prefixes.append(state)
        phi_k = fmap.keys(logits, shift, rows(valid, span))
        if span[0] >= start:  # a chunk of queries (the first span may be cached keys only)
            phi_q = fmap.queries(qs[:, :, span[0] - start : span[1] - start])
            both = torch.matmul(torch.matmul(phi_q, phi_k.transpose(-1, -2)).tril_(), rows(v1, span))
            if state is not None:
                both.add_(torch.matmul(phi_q, state))
            out[:, :, span[0] - start : span[1] - start] = both[..., :-1] / floored(both[..., -1:])
            denominator[:, :, span[0] - start : span[1] - start] = both[..., -1:]
        contribution = torch.matmul(phi_k.transpose(-1, -2), rows(v1, span))
        state = contribution if state is None else state + contribution
    return CausalRun(out, denominator, shifts, prefixes, state, shift)


@torch.no_grad()
def continue_causal_favor(query, key, value, features, key_mask, scaling, kernel, chunk, state, shift):
    """Decoding in recurrent form: the new tokens' queries/keys/values [B, H, L, D] (queries are the new tokens)
    attend to everything before them through ``state`` [B, H, m, D + 1] / ``shift`` [B, H, 1, 1] (None at the
    start) and causally to each other. Returns (out [B, H, L, D], state, shift); O(L m D), nothing of the past read.
    """
    dtype = compute_dtype(query.dtype)
    valid = None if key_mask is None else key_mask[:, None, :, None]
    if query.shape[2] == key.shape[2] == 1 and state is not None and (shift is not None or kernel == "relu"):
        return recurrent_step(query, key, value, features.to(dtype), valid, scaling, kernel, state, shift)
    qs, ks, v1 = _scaled_inputs(query.to(dtype), key.to(dtype), value.to(dtype), scaling)
    spans_ = causal_key_spans(qs.shape[2], ks.shape[2], chunk)
    run = causal_pass(qs, ks, v1, FeatureMap(features.to(dtype), kernel), valid, spans_, state, shift)
    return run.out.to(query.dtype), run.state, run.shift


def recurrent_step(query, key, value, features, valid, scaling, kernel, state, shift):
    """One decoding token in as few kernels as the recurrence allows (per-token cost is dispatch, not FLOPs): the
    query's and key's feature logits, scale and norm term included, from one (b)addmm; phi of both rows from one
    exp; the state extended by phi(k) [v, 1]^T and the output read off phi(q) S as [B H]-batched matmuls. The
    query's -|q|^2/2 goes with its row max (phi(q) is divided by its largest feature, which removes any per-row
    factor). On the CPU, where reading a value to the host costs no synchronisation, the state is rescaled only on
    the steps where the new key raises the running max. With autograd off (``generate``) the state is extended in
    place: the caller's ``state`` tensor is the returned one. query/key/value [B, H, 1, D], valid [B, 1, 1, 1] bool
    or None; (state, shift) as in ``continue_causal_favor``, which it equals (tested). Returns (out [B, H, 1, D],
    state, shift)."""
    dtype = features.dtype
    bsz, heads, _, dim = query.shape
    both = torch.cat([query, key], dim=2).to(dtype)  # [B, H, 2, D]: the query's row, then the key's
    logits = _step_logits(both, features, scaling, kernel)  # [B, H, 2, m]
    k_logits = logits[:, :, 1:]
    if kernel == "relu":  # the same map for both rows, no stabiliser
        phi = FeatureMap(features, kernel).queries_from_logits(logits)
        if valid is not None:
            phi[:, :, 1:].masked_fill_(~valid, 0.0)
    else:
        if valid is not None:
            k_logits.masked_fill_(~valid, torch.finfo(dtype).min)
        row_max = logits.amax(-1, keepdim=True)  # [B, H, 2, 1]
        key_max = row_max[:, :, 1:]
        if key_max.device.type != "cpu" or bool((key_max > shift).any()):
            new_shift = torch.maximum(shift, key_max)
            state, shift = state * torch.exp(shift - new_shift), new_shift
        phi = logits.sub_(torch.cat([row_max[:, :, :1], shift], dim=2)).exp_()
    phi = phi.reshape(bsz * heads, 2, -1)  # (B H, 2, m): a copy only for per-head features and B > 1
    v1 = torch.nn.functional.pad(value.to(dtype), (0, 1), value=1.0).view(bsz * heads, 1, dim + 1)
    flat = state.reshape(bsz * heads, *state.shape[2:])  # (B H, m, D + 1)
    if torch.is_grad_enabled():
        flat = torch.baddbmm(flat, phi[:, 1:].transpose(1, 2), v1)
    else:
        flat.baddbmm_(phi[:, 1:].transpose(1, 2), v1)
    read = torch.bmm(phi[:, :1], flat)  # (B H, 1, D + 1)
    out = read[..., :-1] / floored(read[..., -1:])
    return out.view(bsz, heads, 1, dim).to(query.dtype), flat.view(state.shape), shift


def _step_logits(both: torch.Tensor, features: torch.Tensor, scaling: float, kernel: str) -> torch.Tensor:
    """FeatureMap.logits of the rows ``both`` [B, H, n, D] scaled by sqrt(scaling) -> [B, H, n, m]; features [m, D]
    (shared) or [H, m, D] (per head). Softmax kernels in one (b)addmm: the scale as alpha, -|x|^2 scaling / 2 as
    the added input."""
    bsz, heads, n, dim = both.shape
    root = math.sqrt(scaling)
    if kernel == "relu":
        return torch.matmul(both, features.transpose(-1, -2)).mul_(root)
    norms, beta = torch.linalg.vecdot(both, both).unsqueeze(-1), -scaling / 2
    if features.dim() == 2:
        flat = torch.addmm(norms.reshape(-1, 1), both.reshape(-1, dim), features.t(), beta=beta, alpha=root)
        return flat.view(bsz, heads, n, -1)
    by_head = both.transpose(0, 1).reshape(heads, bsz * n, dim)  # (H, B n, D)
    logits = torch.baddbmm(norms.transpose(0, 1).reshape(heads, bsz * n, 1), by_head, features.transpose(1, 2),
                           beta=beta, alpha=root)
    return logits.view(heads, bsz, n, -1).transpose(0, 1)


def causal_key_spans(query_length: int, key_length: int, chunk: int) -> list[tuple[int, int]]:
    """Key spans of the causal pass: the cached keys before the first query (if any), then chunks of queries."""
    start = key_length - query_length
    return ([(0, start)] if start > 0 else []) + [(start + lo, start + hi) for lo, hi in spans(query_length, chunk)]


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: torch.Tensor,
    is_causal: bool,
    scaling: float,
    window: int,
    exact_first: int = 0,
) -> torch.Tensor:
    """Exact softmax over each query's window blocks plus FAVOR+ features for every other key, one normaliser
    (LoLCATs' sliding window + linear attention, by blocks). Plain autograd; no padding (see per_unpadded_row).
    The first ``exact_first`` (<= window) keys are exact for every query: in the window of query blocks 0 and 1,
    an exact term of their own beyond, and never in the linear part.

    query [B, H, Lq, D] at positions Lk - Lq + i; key/value [B, H, Lk, D]; features [m, D] or [H, m, D]. Keys are
    cut into blocks of w = ``window``; a query in block i sees blocks i-1, i (and i+1 when not causal) exactly, the
    others through phi(q).phi(k) ~ exp(q.k * scale). The two parts are in their own units (the exact part relative
    to its row max, the linear part to exp(shift_q + shift_k) / m) and combined by their log-scales, so nothing
    overflows. Memory O(N w + N m + (N / w) m D). Returns [B, H, Lq, D].
    """
    dtype = compute_dtype(query.dtype)
    bsz, heads, lq, dim = query.shape
    lk, b = key.shape[2], window
    q, k = query.to(dtype), key.to(dtype)
    v1 = torch.cat([value.to(dtype), value.new_ones(value.shape[:-1] + (1,)).to(dtype)], dim=-1)
    nk = -(-lk // b)
    offset = lk - lq
    first_qb = offset // b
    q_lead = offset - first_qb * b
    nq = nk - first_qb
    pad_k = nk * b - lk
    # Key side: features and per-block states [B, H, nk, m, D + 1].
    k_pad = nn.functional.pad(k, (0, 0, 0, pad_k))
    v_pad = nn.functional.pad(v1, (0, 0, 0, pad_k))
    k_real = torch.arange(nk * b, device=q.device) < lk  # (nk*b,)
    root = math.sqrt(scaling)
    w = features.to(dtype).transpose(-1, -2)  # [D, m] or [H, D, m]
    m = features.shape[-2]

    def feature_logits(x: torch.Tensor) -> torch.Tensor:  # x [B, H, ..., D] -> [B, H, ..., m]
        xs = x * root
        heads_w = w if w.dim() == 2 else w.view(w.shape[0], *([1] * (x.dim() - 4)), *w.shape[1:])
        return torch.matmul(xs, heads_w) - 0.5 * (xs * xs).sum(-1, keepdim=True)

    linear_keys = k_real & (torch.arange(nk * b, device=q.device) >= exact_first)  # the first keys are exact
    key_logits = feature_logits(k_pad).masked_fill(~linear_keys[:, None], float("-inf"))
    shift_k = key_logits.detach().amax(dim=(-1, -2), keepdim=True)  # [B, H, 1, 1], a common factor: cancels
    phi_k = torch.exp(key_logits - shift_k)  # padded rows: exp(-inf) = 0
    block_states = torch.matmul(phi_k.view(bsz, heads, nk, b, m).transpose(-1, -2), v_pad.view(bsz, heads, nk, b, -1))
    zero = torch.zeros_like(block_states[:, :, :1])
    before = torch.cat([zero, block_states.cumsum(2)[:, :, :-1]], dim=2)  # sum over blocks < i
    # Out-of-window state for query block i: blocks < i - 1 (and > i + 1 when not causal).
    blocks = torch.arange(first_qb, nk, device=q.device)
    outside = before[:, :, (blocks - 1).clamp_min(0)] * (blocks >= 1).view(1, 1, -1, 1, 1).to(dtype)
    if not is_causal:
        after = block_states.flip(2).cumsum(2).flip(2) - block_states  # sum over blocks > i
        nxt = (blocks + 1).clamp_max(nk - 1)
        outside = outside + after[:, :, nxt] * (blocks + 1 < nk).view(1, 1, -1, 1, 1).to(dtype)
    # Query side, blocked on the key grid.
    q_pad = nn.functional.pad(q, (0, 0, q_lead, nq * b - q_lead - lq)).view(bsz, heads, nq, b, dim)
    query_logits = feature_logits(q_pad)
    shift_q = query_logits.detach().amax(-1, keepdim=True)  # [B, H, nq, b, 1]
    linear = torch.matmul(torch.exp(query_logits - shift_q), outside)  # [B, H, nq, b, D + 1]
    linear_scale = shift_q + shift_k.unsqueeze(2) - math.log(m)  # linear part = linear * exp(linear_scale)
    # Exact part over the window blocks: keys of blocks i-1, i (, i+1) gathered as one span.
    span = 2 if is_causal else 3
    k_win = nn.functional.pad(k_pad, (0, 0, b, b)).unfold(2, span * b, b)[:, :, first_qb : first_qb + nq]
    v_win = nn.functional.pad(v_pad, (0, 0, b, b)).unfold(2, span * b, b)[:, :, first_qb : first_qb + nq]
    key_pos = (blocks[:, None] - 1) * b + torch.arange(span * b, device=q.device)  # (nq, span*b)
    allowed = (key_pos >= 0) & (key_pos < lk)
    if is_causal:
        query_pos = blocks[:, None] * b + torch.arange(b, device=q.device)  # (nq, b)
        allowed = allowed[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    else:
        allowed = allowed[:, None, :].expand(nq, b, span * b)
    scores = torch.matmul(q_pad, k_win) * scaling  # unfold puts the span last: k_win [B, H, nq, D, span*b]
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exact = torch.matmul(torch.exp(scores - row_max), v_win.transpose(-1, -2))  # [B, H, nq, b, D + 1]
    top = torch.maximum(linear_scale, row_max)
    total = linear * torch.exp(linear_scale - top) + exact * torch.exp(row_max - top)
    if exact_first:  # query blocks >= 2 (their windows start after block 0): the first keys as one more exact part
        first_scores = torch.matmul(q_pad, k[:, :, :exact_first].unsqueeze(2).transpose(-1, -2)) * scaling
        first_scores = first_scores.masked_fill((blocks < 2).view(1, 1, -1, 1, 1), float("-inf"))
        first_max = first_scores.detach().amax(-1, keepdim=True)  # [B, H, nq, b, 1]; -inf where not used
        safe_max = torch.where(torch.isfinite(first_max), first_max, torch.zeros_like(first_max))
        first = torch.matmul(torch.exp(first_scores - safe_max), v1[:, :, :exact_first].unsqueeze(2))
        new_top = torch.maximum(top, first_max)
        total = total * torch.exp(top - new_top) + first * torch.exp(first_max - new_top)
    out = total[..., :-1] / floored(total[..., -1:])
    return out.reshape(bsz, heads, nq * b, dim)[:, :, q_lead : q_lead + lq].to(query.dtype)


def performer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q/k/v [B, H, L, D] -> ([B, Lq, H, D], None). No attention dropout
    (there is no probability matrix to drop from)."""
    layer = decoding_layer(key)
    call = prepare_call(module, PerformerState, query, key, value, attention_mask, scaling, kwargs.get("is_causal"))
    settings = call.state.settings
    if isinstance(layer, RecurrentStateLayer):  # decoding with RecurrentStateCache: continue the running sums
        if settings.window or not call.is_causal:
            raise ValueError(
                "the recurrent Performer cache serves causal Performer layers without an exact window; decode this "
                "model with a key/value cache (generate(..., cache_implementation='dynamic'))."
            )
        out, layer.state, layer.shift = continue_causal_favor(
            query, call.key, call.value, call.state.features, call.key_mask, call.scaling, settings.kernel,
            settings.chunk_size, layer.state, layer.shift,
        )
        return interface_output(out)
    if settings.window:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # one row, no padding
            return hybrid_attention(q, k, v, call.state.features, call.is_causal, call.scaling, settings.window,
                                    settings.exact_first)

        # The window blocks count real tokens only: padding cannot move an output.
        return interface_output(per_unpadded_row(attend, query, call.key, call.value, call.key_mask))
    out = performer_attention(query, call.key, call.value, call.state.features, call.key_mask, call.is_causal,
                              call.scaling, settings.kernel, settings.chunk_size)
    return interface_output(out)
