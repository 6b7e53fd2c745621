"""Time one attention layer (Q/K/V/O projections + attention) forward+backward for a variant."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import BertConfig, BertModel

from .conversion import convert_model
from .modeling import resolve_settings


def attention_layer(
    attention: str, hidden: int = 768, heads: int = 12, max_positions: int = 16384, **settings
) -> torch.nn.Module:
    """A BERT attention block (self-attention + output projection) running ``attention``, in training mode."""
    source = BertModel(
        BertConfig(
            vocab_size=8, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1,
            intermediate_size=8, max_position_embeddings=max_positions, attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
        ),
        add_pooling_layer=False,
    )
    model = convert_model(source, attention, resolve_settings(attention, settings).to_dict())
    return model.encoder.layer[0].attention.train()


def time_forward_backward(layer: torch.nn.Module, length: int, repeats: int = 3, batch: int = 1) -> float:
    """Median seconds of one forward+backward of ``layer`` on random [batch, length, hidden] input, after a warm-up."""
    hidden = layer.self.query.in_features
    x = torch.randn(batch, length, hidden, requires_grad=True)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        layer(x)[0].sum().backward()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)
