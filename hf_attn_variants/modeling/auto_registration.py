"""Registers the family configs and models with transformers' Auto classes."""

from __future__ import annotations

import transformers
from transformers import AutoConfig

from .configuration_attn_variants import VARIANT_CONFIGS
from .modeling_attn_variants import VARIANT_MODELS, auto_class_name


def auto_class_for(class_name: str):
    """The Auto class a transformers model class name belongs to, or None."""
    name = auto_class_name(class_name)
    return None if name is None else getattr(transformers, name)


def register_auto_classes() -> None:
    """Register every family config with AutoConfig and every variant model with its Auto class (idempotent)."""
    for family, config_class in VARIANT_CONFIGS.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for base_name, model_class in VARIANT_MODELS[family].items():
            auto_class = auto_class_for(base_name)
            if auto_class is not None:
                auto_class.register(config_class, model_class, exist_ok=True)
