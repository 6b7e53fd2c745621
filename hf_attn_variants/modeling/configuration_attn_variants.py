"""Config subclasses, one per model family, carrying the attention variant and its settings.

Each adds three fields to the family's own config (as BigBird's ``attention_type`` does):
``attention_type`` (a name from the variant registry), ``attention_settings`` (that variant's settings, defaults
filled in and validated on construction) and ``attention_seed`` (seeds random features, rotations and blocks).
"""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, RobertaConfig

from .families import FAMILIES
from .variant_registry import get_variant, resolve_settings


@dataclasses.dataclass(kw_only=True, repr=False)
class AttentionVariantFields:
    """The fields every family config gains; validation runs after the family's own ``__post_init__``."""

    attention_type: str = "full"
    attention_settings: dict | None = None
    attention_seed: int = 0
    heads_per_layer: list[int] | None = None  # set by pruning: query heads kept in each layer
    intermediate_per_layer: list[int] | None = None  # set by pruning: FFN neurons kept in each layer
    pruned_heads: dict | None = None  # set by pruning: {layer: [original head indices removed]}
    _auto_class = "AutoConfig"  # save_pretrained copies this code next to config.json

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        variant = get_variant(self.attention_type)
        self.attention_settings = resolve_settings(self.attention_type, self.attention_settings).to_dict()
        heads = self.num_attention_heads
        if getattr(self, "head_dim", None) is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {heads}; "
                "choose a head count that divides it."
            )
        for name in ("heads_per_layer", "intermediate_per_layer"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.num_hidden_layers or min(sizes) < 1):
                raise ValueError(f"{name}={sizes} needs one positive size per layer ({self.num_hidden_layers}).")
        if not variant.causal and self.is_causal_family():
            raise ValueError(
                f"attention '{self.attention_type}' is not causal, but {self.model_type} is a decoder; "
                "use 'performer', 'bigbird' or 'lsh' for decoders."
            )

    def is_causal_family(self) -> bool:
        """Whether the attention of this config's models is causal (decoders, or BERT-style with is_decoder)."""
        family = FAMILIES[self.model_type.removeprefix("attn_variant_")]
        return family.causal or bool(getattr(self, "is_decoder", False))


@strict
class AttnVariantBertConfig(AttentionVariantFields, BertConfig):
    model_type = "attn_variant_bert"


@strict
class AttnVariantRobertaConfig(AttentionVariantFields, RobertaConfig):
    model_type = "attn_variant_roberta"


@strict
class AttnVariantGPT2Config(AttentionVariantFields, GPT2Config):
    model_type = "attn_variant_gpt2"


@strict
class AttnVariantLlamaConfig(AttentionVariantFields, LlamaConfig):
    model_type = "attn_variant_llama"


@strict
class AttnVariantQwen2Config(AttentionVariantFields, Qwen2Config):
    model_type = "attn_variant_qwen2"


@strict
class AttnVariantMistralConfig(AttentionVariantFields, MistralConfig):
    model_type = "attn_variant_mistral"


VARIANT_CONFIGS = {
    "bert": AttnVariantBertConfig,
    "roberta": AttnVariantRobertaConfig,
    "gpt2": AttnVariantGPT2Config,
    "llama": AttnVariantLlamaConfig,
    "qwen2": AttnVariantQwen2Config,
    "mistral": AttnVariantMistralConfig,
}
"""Source model_type -> its variant config class."""
