"""The self-contained part of hf_attn_variants: attention variants, their registration, family configs and models.

Every module here imports only torch, transformers and its siblings (``from .x import y``), so a saved model can
carry this folder as remote code and load where the package is not installed.
"""

from .auto_registration import register_auto_classes
from .configuration_attn_variants import VARIANT_CONFIGS
from .families import FAMILIES, family_of
from .model_classes import VARIANT_MODELS
from .variant_registry import VARIANTS, get_variant, resolve_settings

register_auto_classes()

__all__ = ["FAMILIES", "VARIANTS", "VARIANT_CONFIGS", "VARIANT_MODELS", "family_of", "get_variant", "resolve_settings"]
