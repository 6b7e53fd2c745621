"""Structured pruning of variant models: attention heads by gradient-based importance (Michel et al. 2019) and FFN
neurons by first-order Taylor importance, removed physically (smaller and faster); optional unstructured magnitude
pruning. The pruned shapes are stored in the config, so the Auto classes rebuild the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .modeling.families import Family, family_of, get_path
from .modeling.pruned_shapes import head_dim_of, prune_layer_ffn, prune_layer_heads


def _family(model: PreTrainedModel) -> Family:
    if not hasattr(model.config, "heads_per_layer"):
        raise ValueError(f"{type(model).__name__} is not a hf_attn_variants model; convert it first "
                         "(hf_attn_variants.convert(model, attention='full') keeps exact attention).")
    return family_of(model.config)


def default_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss when the batch has labels; for language-model heads, the loss of reproducing the text;
    for an encoder without a head, an in-batch contrastive loss of mean-pooled embeddings of two dropout views
    (SimCSE), which needs no labels."""
    if "labels" in batch:
        return model(**batch).loss
    if type(model).__name__.endswith(("ForMaskedLM", "ForCausalLM", "LMHeadModel")):  # reproduce the text
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss
    if not type(model).__name__.endswith("Model"):
        raise ValueError(f"{type(model).__name__} needs labelled batches ('labels') to score importance.")
    was_training = model.training
    model.train()
    views = []
    for _ in range(2):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        views.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    model.train(was_training)
    logits = views[0] @ views[1].T / 0.05
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def importance_scores(
    model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], loss_fn=default_loss
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Head importance [layers, heads] (|dL/d gate| summed over the data, each layer L2-normalised, as Michel et
    al.) and per-layer FFN neuron importance (sum |activation * gradient|)."""
    family = _family(model)
    blocks = family.blocks_of(model)
    d = head_dim_of(model.config)
    heads = torch.zeros(len(blocks), model.config.num_attention_heads)  # current heads use the first columns
    ffn_input = family.ffn_inputs[-1]  # the up projection of gated MLPs: its outputs are the neurons' values
    neurons = [torch.zeros(_width(get_path(b, ffn_input), family)) for b in blocks]
    handles = []

    def attention_hook(index):
        def hook(_module, inputs):
            out = inputs[0]  # (B, L, heads * d): d/d gate_h of L = sum over B, L, d of grad * out for head h

            def accumulate(grad):
                per_head = (grad * out).detach().view(*out.shape[:-1], -1, d).sum((0, 1, 3)).abs()
                heads[index, : per_head.shape[0]] += per_head.cpu()

            out.register_hook(accumulate)
        return hook

    def ffn_hook(index):
        def hook(_module, _inputs, output):
            def accumulate(grad):
                neurons[index].add_((grad * output).detach().abs().sum((0, 1)).cpu())

            output.register_hook(accumulate)
        return hook

    for index, block in enumerate(blocks):  # the heads' outputs are the input of the output projection
        handles.append(get_path(block, family.attention_output).register_forward_pre_hook(attention_hook(index)))
    for index, block in enumerate(blocks):
        handles.append(get_path(block, ffn_input).register_forward_hook(ffn_hook(index)))
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    heads = heads / heads.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return heads, neurons


def _width(module: torch.nn.Module, family: Family) -> int:
    """Output features of a projection (Conv1D stores its weight [in, out])."""
    return module.weight.shape[1] if family.conv1d else module.weight.shape[0]


def prune_model(
    model: PreTrainedModel, head_scores: torch.Tensor | None, neuron_scores: list[torch.Tensor] | None,
    head_fraction: float = 0.0, ffn_fraction: float = 0.0,
) -> dict[int, list[int]]:
    """Remove the ``head_fraction`` least important heads (globally; at least one head stays per layer; GQA
    models lose whole key/value groups) and ``ffn_fraction`` of each layer's FFN neurons, in place. Updates the
    config so the model saves and reloads pruned. Returns {layer: removed heads}."""
    for name, fraction in (("head_fraction", head_fraction), ("ffn_fraction", ffn_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name}={fraction} must be in [0, 1).")
    family = _family(model)
    config = model.config
    blocks = family.blocks_of(model)
    current = list(config.heads_per_layer or [config.num_attention_heads] * len(blocks))
    groups = getattr(get_path(blocks[0], family.attention), "num_key_value_groups", 1)
    removed: dict[int, list[int]] = {}
    if head_fraction > 0 and head_scores is not None:
        # Score whole key/value groups (a single head without GQA); drop the lowest globally.
        units = [(head_scores[layer, g * groups:(g + 1) * groups].sum().item(), layer, g)
                 for layer, count in enumerate(current) for g in range(count // groups)]
        budget = int(round(head_fraction * len(units)))
        kept_units = {layer: count // groups for layer, count in enumerate(current)}
        for _, layer, g in sorted(units)[: budget * 2]:
            if budget == 0:
                break
            if kept_units[layer] > 1:
                removed.setdefault(layer, []).extend(range(g * groups, (g + 1) * groups))
                kept_units[layer] -= 1
                budget -= 1
        for layer, gone in removed.items():
            keep = [h for h in range(current[layer]) if h not in set(gone)]
            prune_layer_heads(blocks[layer], family.name, keep, config)
            current[layer] = len(keep)
        config.heads_per_layer = current
        history = dict(config.pruned_heads or {})
        for layer, gone in removed.items():
            history[str(layer)] = sorted(set(history.get(str(layer), [])) | set(gone))
        config.pruned_heads = history
    if ffn_fraction > 0 and neuron_scores is not None:
        sizes = []
        for layer, block in enumerate(blocks):
            scores = neuron_scores[layer]
            keep_count = max(1, int(round(len(scores) * (1 - ffn_fraction))))
            keep = sorted(scores.topk(keep_count).indices.tolist())
            prune_layer_ffn(block, family.name, keep)
            sizes.append(keep_count)
        config.intermediate_per_layer = sizes
    return removed


def magnitude_prune(model: PreTrainedModel, fraction: float) -> int:
    """Zero the ``fraction`` smallest-magnitude weights of every Linear/Conv1D matrix (per matrix, with
    ``torch.nn.utils.prune``; the embeddings and the output (vocabulary) layer, often tied to them, are left alone);
    returns the number of weights zeroed. Unstructured: the model does not get smaller on disk or faster."""
    from torch.nn.utils import prune
    from transformers.pytorch_utils import Conv1D

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"magnitude fraction={fraction} must be in [0, 1).")
    skipped = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    zeroed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear | Conv1D) or id(module.weight) in skipped:
            continue
        prune.l1_unstructured(module, "weight", amount=fraction)
        zeroed += int((module.weight_mask == 0).sum())
        prune.remove(module, "weight")  # make the zeros permanent: a plain parameter again
    return zeroed


def text_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 16,
                 max_length: int = 128, labels: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches of ``texts`` (with ``labels`` when given, for a classifier's loss) for importance scoring."""
    batches = []
    for i in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
        if labels is not None:
            batch["labels"] = torch.tensor(labels[i:i + batch_size])
        batches.append(batch)
    return batches


def measure(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], folder: str | None = None
            ) -> dict[str, Any]:
    """Parameters, size on disk (of ``folder``'s safetensors) and mean forward seconds per batch."""
    import itertools

    from .bench.timing import mean_seconds

    inputs = itertools.cycle([{k: v for k, v in batch.items() if k != "labels"} for batch in batches])

    @torch.no_grad()
    def forward():  # the next batch
        model(**next(inputs))

    model.eval()
    seconds = mean_seconds(forward, number=len(batches))
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) if folder else None
    return {"parameters": sum(p.numel() for p in model.parameters()), "disk_bytes": size, "forward_seconds": seconds}


def load_variant_model(source: str | os.PathLike):
    """(model, an untouched copy of it, tokenizer, architecture name) of a saved variant folder; a ValueError
    names the fix for a stock checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    from . import modeling

    config = AutoConfig.from_pretrained(source)
    if not config.model_type.startswith("attn_variant_"):
        raise ValueError(f"{source} is not a hf_attn_variants model (model_type {config.model_type}); convert it "
                         "first: hf-attn-variants convert SRC DST --attention full.")
    classes = modeling.VARIANT_MODELS[family_of(config).name]
    architecture = (config.architectures or [""])[0].removeprefix("AttnVariant")
    architecture = architecture if architecture in classes else next(iter(classes))
    model_class = classes[architecture]
    return (model_class.from_pretrained(source), model_class.from_pretrained(source).eval(),
            AutoTokenizer.from_pretrained(source), architecture)


def save_pruned(model: PreTrainedModel, tokenizer, source, output_dir, overwrite: bool, history: str) -> None:
    """Write the pruned model atomically with its tokenizer and the source's card, plus one history line."""
    from .hub import read_facts, write_model_card
    from .modeling.atomic_io import atomic_output_dir

    facts = read_facts(source)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, model.config, type(model).__name__, base_model=facts.get("base_model"),
                         license=facts.get("license"), repo_id=Path(output_dir).name,
                         history=facts.get("history", []) + [history])


def run_prune(source: str | os.PathLike, output_dir: str | os.PathLike, head_fraction: float = 0.25,
              ffn_fraction: float = 0.0, magnitude: float = 0.0, texts: list[str] | None = None,
              overwrite: bool = False, seed: int = 0, labels: list[int] | None = None) -> dict[str, Any]:
    """Load a saved variant model, score, prune, save atomically (card updated) and report before/after:
    parameters, size on disk, forward time, and for encoders the embedding cosine to the unpruned model."""
    from .evaluation import pooled_cosine
    from .modeling.atomic_io import check_output_dir
    from .texts import real_sentences

    check_output_dir(output_dir, overwrite)
    model, original, tokenizer, architecture = load_variant_model(source)
    batches = text_batches(tokenizer, texts or real_sentences(128, split="train"), labels=labels)
    report: dict[str, Any] = {"before": measure(model, batches, str(source))}
    torch.manual_seed(seed)  # the label-free importance loss uses dropout
    scored = head_fraction > 0 or ffn_fraction > 0
    head_scores, neuron_scores = importance_scores(model, batches[:4]) if scored else (None, None)
    removed = prune_model(model, head_scores, neuron_scores, head_fraction, ffn_fraction)
    if magnitude:
        report["magnitude_zeroed"] = magnitude_prune(model, magnitude)
    report["removed_heads"] = removed
    if architecture.endswith("Model") and not architecture.endswith("LMHeadModel"):  # an encoder: embeddings
        report["cosine_to_unpruned"] = pooled_cosine(original, model, tokenizer, real_sentences(64)).mean().item()
    parameters = sum(p.numel() for p in model.parameters())
    save_pruned(model, tokenizer, source, output_dir, overwrite,
                f"pruned {sum(len(v) for v in removed.values())} attention heads and {ffn_fraction:.0%} of FFN "
                f"neurons (parameters {report['before']['parameters']:,} -> {parameters:,})")
    report["after"] = measure(model, batches, str(output_dir))
    return report
