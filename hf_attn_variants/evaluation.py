"""Fidelity of a converted encoder to its source: cosine similarity of mean-pooled sentence embeddings."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def mean_pooled_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int = 512,
    batch_size: int = 32,
) -> torch.Tensor:
    """Sentence embeddings [len(texts), hidden]: the last hidden state averaged over real (non-padding) tokens."""
    device = next(model.parameters()).device
    base = model.base_model if hasattr(model, "base_model") else model
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = base(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        chunks.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(chunks)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per-text cosine similarity [N] between two embedding matrices [N, H]."""
    return torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=-1)


def pooled_cosine(
    reference: PreTrainedModel | torch.Tensor,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int = 512,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-text cosine [len(texts)] of ``model``'s mean-pooled embeddings to the reference's: a model (the source),
    or its embeddings [len(texts), hidden] when measured already (to compare many models with one reference).
    A PEFT-wrapped model is measured through its base model."""
    if not isinstance(reference, torch.Tensor):
        reference = mean_pooled_embeddings(reference, tokenizer, texts, max_length, batch_size)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return embedding_cosine(reference, mean_pooled_embeddings(model, tokenizer, texts, max_length, batch_size))


def retrieval_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Share of texts whose nearest other text (cosine of embeddings [N, H]) is the same under both embeddings:
    does the converted model retrieve what the original retrieves?"""
    def nearest(embeddings: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(float("-inf"))
        return similarity.argmax(-1)

    return (nearest(reference) == nearest(candidate)).float().mean().item()
