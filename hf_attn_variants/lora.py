"""LoRA (PEFT) on variant models: default target modules per family, the variant's learned state trainable
through ``modules_to_save``, and merging back into a plain variant model."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from .modeling import get_variant
from .modeling.attention_common import STATE_ATTRIBUTE
from .modeling.configuration_attn_variants import config_family

DEFAULT_TARGETS = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
"""Family -> attention projections LoRA adapts by default (PEFT cannot infer them for a custom model_type)."""

TASK_TYPES = (
    ("ForSequenceClassification", TaskType.SEQ_CLS),
    ("ForTokenClassification", TaskType.TOKEN_CLS),
    ("ForQuestionAnswering", TaskType.QUESTION_ANS),
    ("ForCausalLM", TaskType.CAUSAL_LM),
    ("LMHeadModel", TaskType.CAUSAL_LM),
)


def model_family(model: PreTrainedModel) -> str:
    """'bert', 'gpt2', ... of a variant (or stock) model."""
    return config_family(model.config)


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """The attention projections LoRA adapts by default for ``model``'s family."""
    family = model_family(model)
    if family not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for model type '{model.config.model_type}'; pass target_modules.")
    return list(DEFAULT_TARGETS[family])


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
        fan_in_fan_out=model_family(model) == "gpt2",
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        **kwargs,
    )


def add_lora(model: PreTrainedModel, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (see :func:`lora_config` for the arguments)."""
    return get_peft_model(model, lora_config(model, **kwargs))
