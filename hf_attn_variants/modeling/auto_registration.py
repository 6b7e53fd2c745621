"""Registers the family configs and models with transformers' Auto classes."""

from __future__ import annotations

import transformers
from transformers import AutoConfig

from .configuration_attn_variants import VARIANT_CONFIGS
from .families import FAMILIES
from .model_classes import VARIANT_MODELS


def register_auto_classes() -> None:
    """Register every family config with AutoConfig and every variant model with each Auto class its
    transformers class belongs to (the family table's ``head_classes``). Idempotent."""
    for name, family in FAMILIES.items():
        config_class = VARIANT_CONFIGS[name]
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for class_name, auto_names in family.head_classes.items():
            for auto_name in auto_names:
                getattr(transformers, auto_name).register(config_class, VARIANT_MODELS[name][class_name],
                                                          exist_ok=True)
