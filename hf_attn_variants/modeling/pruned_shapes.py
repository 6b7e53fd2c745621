"""Physical shapes of pruned models: remove attention heads and FFN neurons from a layer by slicing its weights.

The same slicing rebuilds a pruned model from its config (``heads_per_layer``, ``intermediate_per_layer``) before
transformers loads the saved (already pruned) weights, so the Auto classes reload pruned checkpoints as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .attention_common import STATE_ATTRIBUTE, unwrap_trainable_copy


def layers(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks of ``model`` in order."""
    base = model.base_model
    if family in ("bert", "roberta"):
        return list(base.encoder.layer)
    if family == "gpt2":
        return list(base.h)
    return list(base.layers)


def _slice(module: nn.Module, keep: torch.Tensor, output: bool) -> None:
    """Keep only the ``keep`` output features (``output``) or input features of a Linear/Conv1D, in place."""
    keep = keep.to(module.weight.device)
    with torch.no_grad():
        if isinstance(module, Conv1D):  # weight [in, out]
            weight = module.weight[:, keep] if output else module.weight[keep, :]
            if output:
                module.bias = nn.Parameter(module.bias[keep].clone())
                module.nf = len(keep)
            else:
                module.nx = len(keep)
        else:  # nn.Linear, weight [out, in]
            weight = module.weight[keep, :] if output else module.weight[:, keep]
            if output and module.bias is not None:
                module.bias = nn.Parameter(module.bias[keep].clone())
            if output:
                module.out_features = len(keep)
            else:
                module.in_features = len(keep)
        module.weight = nn.Parameter(weight.clone())


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def prune_layer_heads(layer: nn.Module, family: str, keep_heads: list[int], config) -> None:
    """Keep only query heads ``keep_heads`` (ascending) of one block. Llama-style GQA must keep whole groups."""
    d = head_dim_of(config)
    heads = torch.tensor(keep_heads, dtype=torch.long)
    columns = (heads[:, None] * d + torch.arange(d)).flatten()
    if family in ("bert", "roberta"):
        attention = layer.attention.self
        for projection in (attention.query, attention.key, attention.value):
            _slice(projection, columns, output=True)
        _slice(layer.attention.output.dense, columns, output=False)
        attention.num_attention_heads = len(keep_heads)
        attention.all_head_size = len(keep_heads) * d
    elif family == "gpt2":
        attention = layer.attn
        width = attention.split_size
        _slice(attention.c_attn, torch.cat([columns, width + columns, 2 * width + columns]), output=True)
        _slice(attention.c_proj, columns, output=False)
        attention.split_size = attention.embed_dim = len(keep_heads) * d
        attention.num_heads = len(keep_heads)
    else:
        attention = layer.self_attn
        groups = attention.num_key_value_groups
        kv_heads = sorted({h // groups for h in keep_heads})
        if sorted(keep_heads) != [g * groups + i for g in kv_heads for i in range(groups)]:
            raise ValueError(f"{family} shares each key/value head among {groups} query heads: prune whole groups.")
        kv_columns = (torch.tensor(kv_heads)[:, None] * d + torch.arange(d)).flatten()
        _slice(attention.q_proj, columns, output=True)
        _slice(attention.k_proj, kv_columns, output=True)
        _slice(attention.v_proj, kv_columns, output=True)
        _slice(attention.o_proj, columns, output=False)
    state = unwrap_trainable_copy(getattr(attention, STATE_ATTRIBUTE, None))
    if state is not None:
        state.prune_heads(keep_heads)


def prune_layer_ffn(layer: nn.Module, family: str, keep: list[int]) -> None:
    """Keep only the FFN neurons ``keep`` (ascending) of one block."""
    neurons = torch.tensor(keep, dtype=torch.long)
    if family in ("bert", "roberta"):
        _slice(layer.intermediate.dense, neurons, output=True)
        _slice(layer.output.dense, neurons, output=False)
    elif family == "gpt2":
        _slice(layer.mlp.c_fc, neurons, output=True)
        _slice(layer.mlp.c_proj, neurons, output=False)
    else:
        _slice(layer.mlp.gate_proj, neurons, output=True)
        _slice(layer.mlp.up_proj, neurons, output=True)
        _slice(layer.mlp.down_proj, neurons, output=False)


def apply_config_shapes(model: nn.Module, family: str) -> None:
    """Give a freshly built model the pruned shapes its config records (weights are loaded afterwards)."""
    config = model.config
    for index, layer in enumerate(layers(model, family)):
        if config.heads_per_layer is not None and config.heads_per_layer[index] != config.num_attention_heads:
            prune_layer_heads(layer, family, list(range(config.heads_per_layer[index])), config)
        if config.intermediate_per_layer is not None:
            prune_layer_ffn(layer, family, list(range(config.intermediate_per_layer[index])))
