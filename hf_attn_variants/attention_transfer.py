"""Stage 1 of distillation: layer-wise attention transfer with teacher forcing (as LoLCATs and MOHAWK do).

The teacher (the source model, exact attention) runs once per batch; each of its self-attention modules' inputs and
outputs are captured. Every student attention module is then run on the *teacher's* input to that layer and trained
to reproduce the teacher's output (MSE over real tokens, scaled by ``loss_scale`` as LoLCATs' x1000), so errors do
not compound across layers and a step costs one attention layer, not a model. Only the variant's own parameters
train (Linformer E/F, Performer ``kernel='learned'`` features): q/k/v/o stay the source's, so inputs where a variant
was exact stay exact. Each layer keeps the state with the lowest held-out loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .distill import attention_modules
from .modeling.attention_common import STATE_ATTRIBUTE, unwrap_trainable_copy

Batch = dict[str, torch.Tensor]


def variant_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The learned parameters of an attention module's variant state (none for FAVOR+, BigBird, LSH)."""
    state = unwrap_trainable_copy(getattr(module, STATE_ATTRIBUTE, None))
    return [] if state is None else list(state.parameters())


@contextmanager
def capture_layer_io(model: torch.nn.Module):
    """Record, per self-attention module in layer order, (args, kwargs, output [B, L, hidden]) of forwards in the
    block. Yields the list, filled as the model runs."""
    modules = attention_modules(model)
    records: list[list[Any]] = [[None, None, None] for _ in modules]

    def pre_hook(index):
        def hook(_module, args, kwargs):
            records[index][0], records[index][1] = args, kwargs
        return hook

    def post_hook(index):
        def hook(_module, _args, _kwargs, output):
            records[index][2] = output[0]
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    handles += [m.register_forward_hook(post_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens. output/target [B, L, hidden], mask [B, L] (1 = token) or None."""
    squared = (output.float() - target.float()).pow(2).mean(-1)
    if mask is None:
        return squared.mean()
    weights = mask.to(squared.dtype)
    return (squared * weights).sum() / weights.sum().clamp_min(1)


class LayerwiseTransfer:
    """Trains each student attention layer's variant state on the teacher's inputs to that layer.

    student/teacher: the converted model and its source (same q/k/v/o weights, teacher on exact attention).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, lr: float = 1e-2,
                 loss_scale: float = 1000.0, weight_decay: float = 0.0):
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.modules = attention_modules(student)
        if len(self.modules) != len(attention_modules(teacher)):
            raise ValueError("student and teacher have different numbers of attention layers; distil a model from "
                             "the checkpoint it was converted from.")
        self.params = [variant_parameters(m) for m in self.modules]
        if not any(self.params):
            raise ValueError(
                f"attention '{student.config.attention_type}' has no learned state, so layer-wise transfer has "
                "nothing to train (it trains only the variant's own parameters: Linformer projections, Performer "
                "with kernel='learned'). Skip stage 'layerwise' for this variant, or convert with kernel='learned'."
            )
        self.loss_scale = loss_scale
        self.optimizers = [torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay) if p else None
                           for p in self.params]

    def layer_losses(self, batch: Batch, train: bool) -> list[float]:
        """One teacher forward, then each trainable layer's loss on it (and one optimiser step when ``train``)."""
        mask = batch.get("attention_mask")
        padding = None if mask is None or bool(mask.all()) else mask.bool()  # what the variants' mask function gives
        with torch.no_grad(), capture_layer_io(self.teacher) as records:
            self.teacher(**batch)
        losses = []
        for module, params, optimizer, (args, kwargs, target) in zip(
            self.modules, self.params, self.optimizers, records, strict=True
        ):
            if not params:
                losses.append(float("nan"))
                continue
            with torch.set_grad_enabled(train):
                output = module(*args, **{**kwargs, "attention_mask": padding})[0]
                loss = masked_mse(output, target, mask) * self.loss_scale
            if train and loss.requires_grad:  # a batch on an exact path (e.g. Linformer at <= k tokens): no step
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
        return losses

    def evaluate(self, batches: Sequence[Batch]) -> list[float]:
        """Mean held-out loss per layer (nan for layers without learned state)."""
        totals = [0.0] * len(self.modules)
        for batch in batches:
            totals = [t + loss for t, loss in zip(totals, self.layer_losses(batch, train=False), strict=True)]
        return [t / max(len(batches), 1) for t in totals]

    def fit(self, batches: Callable[[], Iterable[Batch]], eval_batches: Sequence[Batch], epochs: int = 1,
            eval_every: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Train for ``epochs`` passes over ``batches()`` (a fresh iterable per epoch), evaluating every
        ``eval_every`` steps (0: once per epoch); each layer ends with its best held-out state. Returns the
        per-layer held-out losses before and after, the steps and the seconds."""
        was_training = self.student.training
        self.student.eval()  # no dropout; Performer never redraws in eval
        requires = {p: p.requires_grad for p in self.student.parameters()}
        self.student.requires_grad_(False)
        for params in self.params:
            for p in params:
                p.requires_grad_(True)
        start = time.perf_counter()
        before = self.evaluate(eval_batches)
        best = list(before)
        best_states = [self._snapshot(i) for i in range(len(self.modules))]
        log(f"layerwise transfer: held-out loss before {_fmt(before)}")
        steps = 0

        def checkpoint() -> None:
            current = self.evaluate(eval_batches)
            for i, loss in enumerate(current):
                if not math.isnan(loss) and loss < best[i]:
                    best[i], best_states[i] = loss, self._snapshot(i)
            log(f"layerwise transfer: step {steps}, held-out loss {_fmt(current)}")

        for _ in range(epochs):
            for batch in batches():
                self.layer_losses(batch, train=True)
                steps += 1
                if eval_every and steps % eval_every == 0:
                    checkpoint()
            if not eval_every:
                checkpoint()
        for i, state in enumerate(best_states):
            self._restore(i, state)
        for p, flag in requires.items():
            p.requires_grad_(flag)
        self.student.train(was_training)
        return {"eval_loss_before": before, "eval_loss_after": best, "steps": steps,
                "seconds": time.perf_counter() - start}

    def _snapshot(self, index: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params[index]]

    def _restore(self, index: int, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.params[index], values, strict=True):
                p.copy_(value)


def _fmt(losses: list[float]) -> str:
    return "[" + ", ".join("-" if math.isnan(x) else f"{x:.4g}" for x in losses) + "]"


def text_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[Batch]:
    """Tokenised batches (padded to the longest in each batch, truncated at ``max_length``), texts sorted by
    length so little padding is computed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for lo in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[lo : lo + batch_size]]
        encoded = tokenizer(chunk, max_length=max_length, truncation=True, padding=True, return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches
