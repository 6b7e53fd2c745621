"""hf_attn_variants: Linformer, Performer, BigBird-style and LSH attention for Hugging Face models.

Importing the package registers the variants with transformers' AttentionInterface/AttentionMaskInterface and the
family configs/models with the Auto classes; nothing else happens on import.
"""

from .modeling import VARIANT_CONFIGS, VARIANT_MODELS, VARIANTS, get_variant, resolve_settings

__version__ = "0.1.0"


def convert(*args, **kwargs):
    """Convert a checkpoint to an attention variant; see :func:`hf_attn_variants.conversion.convert`."""
    from .conversion import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["VARIANTS", "VARIANT_CONFIGS", "VARIANT_MODELS", "convert", "get_variant", "resolve_settings"]
