"""Convert a stock BERT/RoBERTa/GPT-2/Llama/Qwen2/Mistral checkpoint into an attention-variant model.

Every source weight is carried over unchanged (checked: nothing dropped, nothing left newly initialised but the
variant's own state). Learned absolute position embeddings can be lengthened by tiling them (Longformer's recipe).
All checks run before anything is loaded or written; the output folder is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers import logging as hf_logging

from .hub import source_card_facts, write_model_card
from .modeling import VARIANT_CONFIGS, VARIANT_MODELS, get_variant, resolve_settings
from .modeling.atomic_io import atomic_output_dir, check_output_dir
from .modeling.attention_common import STATE_ATTRIBUTE
from .modeling.families import Family, family_of


class ConversionError(ValueError):
    """A conversion request that cannot be carried out; the message names the problem and the fix."""


def source_family(config: Any) -> Family:
    """The family of a source config (variant configs map back to their family), or a ConversionError."""
    try:
        return family_of(config)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _check_weights_present(source: str) -> None:
    """A local source must hold safetensors weights: the package never unpickles checkpoint files."""
    folder = Path(source)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names):
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            _check_readable(folder / name)
        return
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in names):
        raise ConversionError(
            f"{source} has only pickled weights (.bin/.pt); hf_attn_variants loads safetensors only. Re-save it "
            "with transformers: AutoModel.from_pretrained(src).save_pretrained(src, safe_serialization=True)."
        )
    raise ConversionError(f"{source} has no model weights (no *.safetensors); point at a saved model folder.")


def _check_readable(path: Path) -> None:
    """One line naming a weight file that is truncated or not safetensors, instead of a deep traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise ConversionError(
            f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged: download or save "
            "it again."
        ) from None


def variant_config(
    source_config: Any,
    attention: str,
    settings: dict[str, Any],
    max_position_embeddings: int | None = None,
    seed: int = 0,
):
    """The family's variant config: the source config's fields plus the variant, its settings and the seed."""
    family = source_family(source_config)
    fields = source_config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map", "attention_type", "attention_settings",
                "attention_seed"):  # a variant source: its variant is replaced, its base fields are kept
        fields.pop(key, None)
    old_positions = getattr(source_config, "max_position_embeddings", None)
    if max_position_embeddings is not None:
        if not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
            raise ConversionError(f"max_position_embeddings={max_position_embeddings!r} must be a positive integer.")
        if old_positions is not None and max_position_embeddings < old_positions:
            raise ConversionError(
                f"max_position_embeddings={max_position_embeddings} is smaller than the source's {old_positions}; "
                "conversion only lengthens the context. Leave it unset or pass a value >= "
                f"{old_positions}."
            )
        fields[family.position_field] = max_position_embeddings
    try:
        return VARIANT_CONFIGS[family.name](
            attention_type=attention, attention_settings=settings, attention_seed=seed, **fields
        )
    except ValueError as err:
        raise ConversionError(str(err)) from None


def extend_position_embeddings(weight: torch.Tensor, new_rows: int, keep_front: int) -> torch.Tensor:
    """Lengthen [old_rows, H] learned positions to [new_rows, H]: the first ``keep_front`` rows stay, the rest are
    the old positions tiled (row keep_front + j gets old row keep_front + j mod (old_rows - keep_front))."""
    old_rows = weight.shape[0]
    if new_rows == old_rows:
        return weight
    period = old_rows - keep_front
    index = torch.arange(new_rows - keep_front, device=weight.device) % period + keep_front
    return torch.cat([weight[:keep_front], weight[index]])


def _front_rows(family: Family, config: Any) -> int:
    return config.pad_token_id + 1 if family.front_rows is None else family.front_rows


def _load_source(source: str | PreTrainedModel, **load_kwargs) -> PreTrainedModel:
    if isinstance(source, PreTrainedModel):
        return source
    config = AutoConfig.from_pretrained(source, **load_kwargs)
    classes = VARIANT_MODELS[source_family(config).name]
    architectures = getattr(config, "architectures", None) or []
    stock_name = architectures[0].removeprefix("AttnVariant") if architectures else ""
    if stock_name not in classes:
        stock_name = next(iter(classes))  # the family's base model
    import transformers

    stock_class = getattr(transformers, stock_name)
    if config.model_type.startswith("attn_variant_"):  # an already converted model: load it as its variant class
        stock_class = classes[stock_name]
    return stock_class.from_pretrained(source, use_safetensors=True, **load_kwargs)


def convert(
    source: str | os.PathLike | PreTrainedModel,
    attention: str = "performer",
    output_dir: str | os.PathLike | None = None,
    max_position_embeddings: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    base_model: str | None = None,
    **variant_settings: Any,
) -> PreTrainedModel:
    """Convert ``source`` (a folder, a Hub id when online, or a loaded model) to attention ``attention``.

    Returns the converted model (same head as the source, same dtype); saves it with its tokenizer and generation
    config to ``output_dir`` when given. ``variant_settings`` are the variant's settings (e.g. ``k=128`` for
    Linformer). Raises ConversionError before any loading or writing for an unknown variant or setting, an
    unsupported family, a shorter ``max_position_embeddings`` or an existing ``output_dir`` (unless
    ``overwrite``).
    """
    get_variant(attention)
    settings = resolve_settings(attention, variant_settings).to_dict()
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    steps = _progress(progress, total=3)
    if not isinstance(source, PreTrainedModel):
        source = str(source)
        _check_weights_present(source)
        # Validate family and settings from the config alone, before the weights are read.
        variant_config(AutoConfig.from_pretrained(source), attention, settings, max_position_embeddings, seed)
    source_model = _load_source_quietly(source)
    steps.update(1)
    model = convert_model(source_model, attention, settings, max_position_embeddings, seed,
                          share_weights=not isinstance(source, PreTrainedModel))
    steps.update(1)
    if output_dir is not None:
        save_conversion(model, source, source_model, output_dir, overwrite, base_model, settings, seed)
    steps.update(1)
    steps.close()
    return model


def _load_source_quietly(source: str | PreTrainedModel) -> PreTrainedModel:
    """The source model, without transformers' per-load warnings (conversion checks the weights itself)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _load_source(source)
    finally:
        hf_logging.set_verbosity(verbosity)


def save_conversion(model: PreTrainedModel, source: str | PreTrainedModel, source_model: PreTrainedModel,
                    output_dir: str | os.PathLike, overwrite: bool, base_model: str | None,
                    settings: dict[str, Any], seed: int) -> None:
    """Write a converted model atomically: weights and config, the source's tokenizer and companion files (for a
    folder source), and a model card recording where it came from."""
    source_name = source if isinstance(source, str) else getattr(source_model, "name_or_path", None) or None
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if isinstance(source, str):
            _copy_tokenizer(source, tmp)
            extended = model.config.max_position_embeddings > source_model.config.max_position_embeddings
            copy_companion_files(source, tmp, extended=extended and usable_positions(model.config))
        card = source_card_facts(source_name)
        base = base_model or card.get("base_model")
        settings_text = ", ".join(f"{k}={v}" for k, v in settings.items()) or "no settings"
        write_model_card(
            tmp, model.config, type(model).__name__, base_model=base, license=card.get("license"),
            source_positions=source_model.config.max_position_embeddings, repo_id=Path(output_dir).name,
            history=[f"converted from {base} to '{model.config.attention_type}' ({settings_text}, seed {seed}) "
                     "with hf_attn_variants"],
        )


def convert_model(
    source_model: PreTrainedModel,
    attention: str,
    settings: dict[str, Any],
    max_position_embeddings: int | None = None,
    seed: int = 0,
    share_weights: bool = False,
) -> PreTrainedModel:
    """Build the variant model for a loaded ``source_model`` and carry every weight over (source unchanged).

    share_weights: hand the source's tensors to the new model instead of copies (no second copy in memory; the
    source must not be used afterwards). ``convert`` does so for sources it loaded itself from a folder."""
    config = variant_config(source_model.config, attention, settings, max_position_embeddings, seed)
    family = source_family(source_model.config)
    classes = VARIANT_MODELS[family.name]
    stock_name = type(source_model).__name__.removeprefix("AttnVariant")
    if stock_name not in classes:
        raise ConversionError(
            f"{type(source_model).__name__} has no variant class; supported {family.name} classes: "
            f"{sorted(classes)}."
        )
    copies: dict[int, torch.Tensor] = {}  # one copy per tensor, so tied weights stay tied
    state = {
        key: value if share_weights else copies.setdefault(value.data_ptr(), value.detach().clone())
        for key, value in source_model.state_dict().items()
        if f".{STATE_ATTRIBUTE}." not in key  # an earlier variant's state is replaced
    }
    new_positions = getattr(config, "max_position_embeddings", None)
    if family.position_key and new_positions != source_model.config.max_position_embeddings:
        front = _front_rows(family, config)
        for key in list(state):
            if key.endswith(family.position_key):
                state[key] = extend_position_embeddings(state[key], new_positions, front)
    reference = next(source_model.parameters())
    init_kwargs = {}
    if hasattr(source_model, "pooler") and source_model.pooler is None:  # BertModel(add_pooling_layer=False)
        init_kwargs["add_pooling_layer"] = False
    # Built on the meta device and given the source's own tensors (assign): no random initialisation and no second
    # copy of the weights, so converting needs about the checkpoint's memory, not three times it.
    with torch.device("meta"):
        model = classes[stock_name](config, **init_kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    lost = [key for key in missing if f".{STATE_ATTRIBUTE}." not in key]
    if lost or unexpected:
        raise ConversionError(
            f"conversion would not carry every weight over (missing {lost[:5]}, unexpected {list(unexpected)[:5]}); "
            "please report this with the source model's config."
        )
    materialize_new_tensors(model, reference.device, reference.dtype)
    model.tie_weights()  # assigned tensors replace parameters: tie the output embedding to the input one again
    if getattr(source_model, "generation_config", None) is not None and model.can_generate():
        model.generation_config = GenerationConfig.from_dict(source_model.generation_config.to_dict())
    model.eval()
    return model


WRITTEN_BY_CONVERSION = ("config.json", "generation_config.json", "README.md", "model.safetensors.index.json")
"""Files the conversion writes itself; every other non-weight file of a source folder is carried over."""


def usable_positions(config: Any) -> int:
    """Input tokens a stock or variant config's positions allow (RoBERTa reserves padding_idx + 1 rows)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    if family_of(config).front_rows is None:  # RoBERTa: padding_idx + 1 rows before the first token
        positions -= config.pad_token_id + 1
    return positions


def copy_companion_files(source: str, destination: str | os.PathLike, extended: int | bool = False) -> list[str]:
    """Carry over the source folder's non-weight files the conversion does not write itself (sentence-transformers'
    ``modules.json``, ``1_Pooling/``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``, licence
    and data files, ...), so pipelines built on the folder keep working. ``extended``: the new usable length when
    positions were lengthened; ``max_seq_length`` in ``sentence_bert_config.json`` is raised to it. Returns the
    names copied."""
    import json
    import shutil

    folder = Path(source)
    if not folder.is_dir():
        return []
    copied = []
    for entry in sorted(folder.iterdir()):
        target = Path(destination) / entry.name
        weights = entry.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
        if target.exists() or weights or entry.name in WRITTEN_BY_CONVERSION or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
        copied.append(entry.name)
    st_config = Path(destination) / "sentence_bert_config.json"
    if extended and st_config.exists():
        data = json.loads(st_config.read_text())
        data["max_seq_length"] = max(int(extended), data.get("max_seq_length", 0))
        st_config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def materialize_new_tensors(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate and initialise what the checkpoint did not provide, after a meta-device build and an assigning load:
    the variant's state (from its seed) and non-persistent buffers (position ids, rotary frequencies, through
    transformers' own ``_init_weights``). Floating tensors take the source's dtype, as the weights have it."""
    from .modeling.attention_common import VariantState

    for name, module in model.named_modules():
        direct = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        fresh = [key for key, tensor in direct if tensor.is_meta]
        if not fresh:
            continue
        if len(fresh) != len(direct):  # a module half loaded, half new: never expected; refuse rather than guess
            raise ConversionError(f"{name or type(module).__name__}: {fresh} were not in the checkpoint; please "
                                  "report this with the source model's config.")
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            if isinstance(module, VariantState):
                module.reset_parameters()
            else:
                model._init_weights(module)
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                target = module._parameters if key in module._parameters else module._buffers
                cast = tensor.detach().to(dtype)
                target[key] = torch.nn.Parameter(cast, tensor.requires_grad) if key in module._parameters else cast


def _copy_tokenizer(source: str, destination: str) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return  # a weights-only folder: nothing to carry over
    tokenizer.save_pretrained(destination)


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="convert", disable=not enabled, unit="step")
