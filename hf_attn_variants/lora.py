"""LoRA (PEFT) on variant models: default target modules per family, the variant's learned state trainable
through ``modules_to_save``, and merging back into a plain variant model."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from .modeling import get_variant
from .modeling.attention_common import STATE_ATTRIBUTE
from .modeling.families import family_of

TASK_TYPES = (
    ("ForSequenceClassification", TaskType.SEQ_CLS),
    ("ForTokenClassification", TaskType.TOKEN_CLS),
    ("ForQuestionAnswering", TaskType.QUESTION_ANS),
    ("ForCausalLM", TaskType.CAUSAL_LM),
    ("LMHeadModel", TaskType.CAUSAL_LM),
)


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """The attention projections LoRA adapts by default for ``model``'s family (PEFT cannot infer them for a custom
    model_type): the family table's ``lora_targets``."""
    try:
        return list(family_of(model.config).lora_targets)
    except ValueError:
        raise ValueError(
            f"no default LoRA targets for model type '{model.config.model_type}'; pass target_modules."
        ) from None


def lora_config(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    train_variant_state: bool = True,
    **kwargs: Any,
) -> LoraConfig:
    """A LoraConfig for ``model``: family default targets (GPT-2's Conv1D with fan_in_fan_out), the task type from
    the head, and the variant's learned state (e.g. Linformer's projections) in ``modules_to_save``."""
    variant = get_variant(getattr(model.config, "attention_type", "full"))
    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_variant_state and variant.learned:
        modules_to_save.append(STATE_ATTRIBUTE)
    name = type(model).__name__
    task_type = next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target_modules or default_target_modules(model),
        fan_in_fan_out=family_of(model.config).conv1d,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        **kwargs,
    )


def add_lora(model: PreTrainedModel, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (see :func:`lora_config` for the arguments)."""
    return get_peft_model(model, lora_config(model, **kwargs))
