"""Physical shapes of pruned models: remove attention heads and FFN neurons from a layer by slicing its weights.

The same slicing rebuilds a pruned model from its config (``heads_per_layer``, ``intermediate_per_layer``) before
transformers loads the saved (already pruned) weights, so the Auto classes reload pruned checkpoints as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .attention_common import STATE_ATTRIBUTE, unwrap_trainable_copy
from .families import FAMILIES, get_path


def layers(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks of ``model`` in order."""
    return FAMILIES[family].blocks_of(model)


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
    """Keep only query heads ``keep_heads`` (ascending) of one block. Grouped-query attention must keep whole
    key/value groups."""
    table = FAMILIES[family]
    d = head_dim_of(config)
    heads = torch.tensor(keep_heads, dtype=torch.long)
    columns = (heads[:, None] * d + torch.arange(d)).flatten()
    attention = get_path(layer, table.attention)
    groups = getattr(attention, "num_key_value_groups", 1)
    kv_heads = sorted({h // groups for h in keep_heads})
    if sorted(keep_heads) != [g * groups + i for g in kv_heads for i in range(groups)]:
        raise ValueError(f"{family} shares each key/value head among {groups} query heads: prune whole groups.")
    kv_columns = (torch.tensor(kv_heads)[:, None] * d + torch.arange(d)).flatten()
    if len(table.projections) == 1:  # one fused [q | k | v] projection (GPT-2's c_attn)
        width = attention.split_size
        _slice(get_path(attention, table.projections[0]), torch.cat([columns, width + columns, 2 * width + columns]),
               output=True)
    else:
        query, key, value = (get_path(attention, name) for name in table.projections)
        _slice(query, columns, output=True)
        _slice(key, kv_columns, output=True)
        _slice(value, kv_columns, output=True)
    _slice(get_path(layer, table.attention_output), columns, output=False)
    for name, unit in table.head_attributes:
        setattr(attention, name, len(keep_heads) if unit == "heads" else len(keep_heads) * d)
    state = unwrap_trainable_copy(getattr(attention, STATE_ATTRIBUTE, None))
    if state is not None:
        state.prune_heads(keep_heads)


def prune_layer_ffn(layer: nn.Module, family: str, keep: list[int]) -> None:
    """Keep only the FFN neurons ``keep`` (ascending) of one block."""
    table = FAMILIES[family]
    neurons = torch.tensor(keep, dtype=torch.long)
    for name in table.ffn_inputs:
        _slice(get_path(layer, name), neurons, output=True)
    _slice(get_path(layer, table.ffn_output), neurons, output=False)


def apply_config_shapes(model: nn.Module, family: str) -> None:
    """Give a freshly built model the pruned shapes its config records (weights are loaded afterwards)."""
    config = model.config
    for index, layer in enumerate(layers(model, family)):
        if config.heads_per_layer is not None and config.heads_per_layer[index] != config.num_attention_heads:
            prune_layer_heads(layer, family, list(range(config.heads_per_layer[index])), config)
        if config.intermediate_per_layer is not None:
            prune_layer_ffn(layer, family, list(range(config.intermediate_per_layer[index])))
