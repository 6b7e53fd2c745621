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
    prepare_call,
)

KERNELS = ("softmax", "relu")
RELU_EPSILON = 1e-3
# A normaliser below this means every key that matters to the query underflowed (huge logits): the row is left at
# ~0 (its numerator) instead of 0/0, which keeps outputs and gradients finite without biasing ordinary rows.
NORMALISER_FLOOR = 1e-12


def normalise(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, with underflowed rows (denominator < NORMALISER_FLOOR) divided by 1 instead."""
    return numerator / denominator.masked_fill(denominator < NORMALISER_FLOOR, 1.0)


@dataclasses.dataclass
class PerformerSettings(SettingsBase):
    """num_features: m random features; kernel: 'softmax' (FAVOR+) or 'relu'; redraw_interval: redraw the
    features every N training forwards (0 = fixed); chunk_size: block length of the causal prefix sums."""

    variant = "performer"
    num_features: int = dataclasses.field(default=256, metadata={"positive_int": True})
    kernel: str = dataclasses.field(default="softmax", metadata={"choices": KERNELS})
    redraw_interval: int = dataclasses.field(default=0, metadata={"non_negative_int": True})
    chunk_size: int = dataclasses.field(default=256, metadata={"positive_int": True})


def orthogonal_gaussian(num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, dim] blocks of orthogonal rows, each row rescaled to a chi(dim) norm (FAVOR+ 'ORF')."""
    blocks = []
    for _ in range(math.ceil(num_rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:num_rows]
    norms = torch.randn(num_rows, dim, generator=generator).norm(dim=1, keepdim=True)
    return rows * norms


class PerformerState(VariantState):
    """features: [m, D] random projection (buffer, saved with the weights)."""

    settings_class = PerformerSettings

    def __init__(self, settings: PerformerSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        self.register_buffer("features", torch.empty(settings.num_features, head_dim))
        self.forward_calls = 0
        self.draws = 0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.draws = 0
        self.redraw(0)

    @torch.no_grad()
    def redraw(self, draw: int) -> None:
        """Draw feature set number ``draw`` (0 = the saved default) deterministically from the seed."""
        values = orthogonal_gaussian(self.settings.num_features, self.head_dim, self.generator(draw))
        self.features.copy_(values.to(self.features.device, self.features.dtype))

    def step(self, training: bool) -> None:
        """Count a forward pass; redraw every ``redraw_interval`` training forwards when asked to."""
        if not training or self.settings.redraw_interval == 0:
            return
        self.forward_calls += 1
        if self.forward_calls % self.settings.redraw_interval == 0:
            self.draws += 1
            self.redraw(self.draws)


def feature_logits(x: torch.Tensor, features: torch.Tensor, scaling: float) -> torch.Tensor:
    """log of the unnormalised softmax-kernel features: W x' - |x'|^2/2. x [..., L, D] -> [..., L, m] (fp32)."""
    x = x.to(compute_dtype(x.dtype)) * math.sqrt(scaling)
    return torch.matmul(x, features.to(x.dtype).T) - 0.5 * (x * x).sum(-1, keepdim=True)


def query_features(query: torch.Tensor, features: torch.Tensor, scaling: float, kernel: str) -> torch.Tensor:
    """phi(q) up to a per-query factor (which cancels in the normalisation). [B, H, L, D] -> [B, H, L, m]."""
    if kernel == "relu":
        return relu_features(query, features, scaling)
    logits = feature_logits(query, features, scaling)
    return torch.exp(logits - logits.amax(-1, keepdim=True))


def relu_features(x: torch.Tensor, features: torch.Tensor, scaling: float) -> torch.Tensor:
    x = x.to(compute_dtype(x.dtype)) * math.sqrt(scaling)
    return torch.relu(torch.matmul(x, features.to(x.dtype).T)) / math.sqrt(features.shape[0]) + RELU_EPSILON


def performer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: torch.Tensor,
    key_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    kernel: str = "softmax",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Functional core. query [B, H, Lq, D]; key/value [B, H, Lk, D]; features [m, D]; key_mask [B, Lk] bool.

    Returns [B, H, Lq, D] in the query's dtype; internal sums are fp32. In causal mode query i is at position
    Lk - Lq + i (so decoding with a KV cache gives what the full sequence gives).
    """
    out_dtype = query.dtype
    phi_q = query_features(query, features, scaling, kernel)  # (B, H, Lq, m)
    value = value.to(compute_dtype(value.dtype))
    valid = None if key_mask is None else key_mask[:, None, :, None]  # (B, 1, Lk, 1)
    if not is_causal:
        phi_k, _ = key_features(key, features, scaling, kernel, valid, None)
        state = torch.matmul(phi_k.transpose(-1, -2), value)  # (B, H, m, D)
        norm = phi_k.sum(-2)  # (B, H, m)
        numerator = torch.matmul(phi_q, state)
        denominator = torch.matmul(phi_q, norm.unsqueeze(-1))
        return normalise(numerator, denominator).to(out_dtype)
    return causal_prefix_attention(phi_q, key, value, features, valid, scaling, kernel, chunk_size).to(out_dtype)


def key_features(
    key: torch.Tensor,
    features: torch.Tensor,
    scaling: float,
    kernel: str,
    valid: torch.Tensor | None,
    running_max: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """phi(k) for a span of keys [B, H, n, D] -> ([B, H, n, m], new running max [B, H, 1, 1] or None).

    Softmax kernel: features are divided by exp(max logit over the valid keys seen so far); padded keys are 0.
    """
    if kernel == "relu":
        phi = relu_features(key, features, scaling)
        return (phi if valid is None else phi * valid), None
    logits = feature_logits(key, features, scaling)
    floor = torch.finfo(logits.dtype).min
    if valid is not None:
        logits = logits.masked_fill(~valid, floor)
    span_max = logits.amax(dim=(-1, -2), keepdim=True).detach()
    new_max = span_max if running_max is None else torch.maximum(running_max, span_max)
    phi = torch.exp(logits - new_max)
    if valid is not None:
        phi = phi * valid
    return phi, new_max


def causal_prefix_attention(
    phi_q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    features: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    kernel: str,
    chunk_size: int,
) -> torch.Tensor:
    """Causal linear attention by chunks: each chunk sees the prefix state (sum phi(k) v^T over earlier chunks,
    [B, H, m, D]) plus an exact lower-triangular chunk x chunk block. Memory O(N m + m D) per head."""
    lq, lk = phi_q.shape[2], key.shape[2]
    start = lk - lq
    # Keys before the first query (decoding with a cache) are all visible: fold them into the prefix state at once.
    state, norm, running_max = None, None, None
    if start > 0:
        prefix_valid = None if valid is None else valid[:, :, :start]
        phi_k, running_max = key_features(key[:, :, :start], features, scaling, kernel, prefix_valid, None)
        state = torch.matmul(phi_k.transpose(-1, -2), value[:, :, :start])
        norm = phi_k.sum(-2)
    outputs = []
    for chunk_start in range(0, lq, chunk_size):
        lo, hi = start + chunk_start, min(start + chunk_start + chunk_size, lk)
        chunk_valid = None if valid is None else valid[:, :, lo:hi]
        phi_k, new_max = key_features(key[:, :, lo:hi], features, scaling, kernel, chunk_valid, running_max)
        if state is not None and new_max is not None:
            rescale = torch.exp(running_max - new_max)  # earlier sums were taken against a smaller max
            state, norm = state * rescale, norm * rescale.squeeze(-1)
        running_max = new_max
        q = phi_q[:, :, lo - start : hi - start]  # (B, H, c, m)
        local = torch.matmul(q, phi_k.transpose(-1, -2)).tril()  # (B, H, c, c)
        numerator = torch.matmul(local, value[:, :, lo:hi])
        denominator = local.sum(-1, keepdim=True)
        if state is not None:
            numerator = numerator + torch.matmul(q, state)
            denominator = denominator + torch.matmul(q, norm.unsqueeze(-1))
        outputs.append(normalise(numerator, denominator))
        chunk_state = torch.matmul(phi_k.transpose(-1, -2), value[:, :, lo:hi])
        chunk_norm = phi_k.sum(-2)
        state = chunk_state if state is None else state + chunk_state
        norm = chunk_norm if norm is None else norm + chunk_norm
    return torch.cat(outputs, dim=2)


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
    call = prepare_call(module, PerformerState, query, key, value, attention_mask, scaling)
    call.state.step(module.training)
    settings = call.state.settings
    out = performer_attention(query, call.key, call.value, call.state.features, call.key_mask, call.is_causal,
                              call.scaling, settings.kernel, settings.chunk_size)
    return interface_output(out)
