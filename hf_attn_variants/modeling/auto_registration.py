"""Registers the family configs and models with transformers' Auto classes."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_attn_variants import VARIANT_CONFIGS
from .modeling_attn_variants import VARIANT_MODELS

AUTO_CLASS_BY_SUFFIX = (
    ("ForSequenceClassification", AutoModelForSequenceClassification),
    ("ForTokenClassification", AutoModelForTokenClassification),
    ("ForQuestionAnswering", AutoModelForQuestionAnswering),
    ("ForMultipleChoice", AutoModelForMultipleChoice),
    ("ForNextSentencePrediction", AutoModelForNextSentencePrediction),
    ("ForPreTraining", AutoModelForPreTraining),
    ("ForMaskedLM", AutoModelForMaskedLM),
    ("ForCausalLM", AutoModelForCausalLM),
    ("LMHeadModel", AutoModelForCausalLM),
    ("Model", AutoModel),
)
"""Class-name suffix -> Auto class (first match wins; GPT2DoubleHeadsModel has no Auto class)."""


def auto_class_for(class_name: str):
    """The Auto class a transformers model class name belongs to, or None."""
    if class_name.endswith("DoubleHeadsModel"):
        return None
    for suffix, auto_class in AUTO_CLASS_BY_SUFFIX:
        if class_name.endswith(suffix):
            return auto_class
    return None


def register_auto_classes() -> None:
    """Register every family config with AutoConfig and every variant model with its Auto class (idempotent)."""
    for family, config_class in VARIANT_CONFIGS.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for base_name, model_class in VARIANT_MODELS[family].items():
            auto_class = auto_class_for(base_name)
            if auto_class is not None:
                auto_class.register(config_class, model_class, exist_ok=True)
