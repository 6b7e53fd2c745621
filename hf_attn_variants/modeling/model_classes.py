"""Every variant model class: ``(AttentionVariantMixin, <transformers class>)`` for each family and head.

Generated from the family table (families.py) by ``python scripts/generate_model_classes.py``; do not edit
by hand (tests/test_families.py checks that it is current).
"""

from __future__ import annotations

from transformers import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    MistralForTokenClassification,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
    Qwen2Model,
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)

from .configuration_attn_variants import (
    AttnVariantBertConfig,
    AttnVariantGPT2Config,
    AttnVariantLlamaConfig,
    AttnVariantMistralConfig,
    AttnVariantQwen2Config,
    AttnVariantRobertaConfig,
)
from .modeling_attn_variants import AttentionVariantMixin


class AttnVariantBertModel(AttentionVariantMixin, BertModel):
    """BertModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForPreTraining(AttentionVariantMixin, BertForPreTraining):
    """BertForPreTraining running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForPreTraining"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertLMHeadModel(AttentionVariantMixin, BertLMHeadModel):
    """BertLMHeadModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies code


class AttnVariantBertForMaskedLM(AttentionVariantMixin, BertForMaskedLM):
    """BertForMaskedLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForMaskedLM"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForSequenceClassification(AttentionVariantMixin, BertForSequenceClassification):
    """BertForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForTokenClassification(AttentionVariantMixin, BertForTokenClassification):
    """BertForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForQuestionAnswering(AttentionVariantMixin, BertForQuestionAnswering):
    """BertForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForMultipleChoice(AttentionVariantMixin, BertForMultipleChoice):
    """BertForMultipleChoice running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForMultipleChoice"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantBertForNextSentencePrediction(AttentionVariantMixin, BertForNextSentencePrediction):
    """BertForNextSentencePrediction running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantBertConfig
    family = "bert"
    _auto_class = "AutoModelForNextSentencePrediction"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaModel(AttentionVariantMixin, RobertaModel):
    """RobertaModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaForMaskedLM(AttentionVariantMixin, RobertaForMaskedLM):
    """RobertaForMaskedLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForPreTraining"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaForCausalLM(AttentionVariantMixin, RobertaForCausalLM):
    """RobertaForCausalLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies code


class AttnVariantRobertaForSequenceClassification(AttentionVariantMixin, RobertaForSequenceClassification):
    """RobertaForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaForTokenClassification(AttentionVariantMixin, RobertaForTokenClassification):
    """RobertaForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaForQuestionAnswering(AttentionVariantMixin, RobertaForQuestionAnswering):
    """RobertaForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantRobertaForMultipleChoice(AttentionVariantMixin, RobertaForMultipleChoice):
    """RobertaForMultipleChoice running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantRobertaConfig
    family = "roberta"
    _auto_class = "AutoModelForMultipleChoice"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantGPT2Model(AttentionVariantMixin, GPT2Model):
    """GPT2Model running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantGPT2LMHeadModel(AttentionVariantMixin, GPT2LMHeadModel):
    """GPT2LMHeadModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModelForPreTraining"  # save_pretrained copies code


class AttnVariantGPT2ForSequenceClassification(AttentionVariantMixin, GPT2ForSequenceClassification):
    """GPT2ForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantGPT2ForTokenClassification(AttentionVariantMixin, GPT2ForTokenClassification):
    """GPT2ForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantGPT2ForQuestionAnswering(AttentionVariantMixin, GPT2ForQuestionAnswering):
    """GPT2ForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantGPT2DoubleHeadsModel(AttentionVariantMixin, GPT2DoubleHeadsModel):
    """GPT2DoubleHeadsModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantGPT2Config
    family = "gpt2"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantLlamaModel(AttentionVariantMixin, LlamaModel):
    """LlamaModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantLlamaConfig
    family = "llama"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantLlamaForCausalLM(AttentionVariantMixin, LlamaForCausalLM):
    """LlamaForCausalLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantLlamaConfig
    family = "llama"
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies code


class AttnVariantLlamaForSequenceClassification(AttentionVariantMixin, LlamaForSequenceClassification):
    """LlamaForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantLlamaConfig
    family = "llama"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantLlamaForTokenClassification(AttentionVariantMixin, LlamaForTokenClassification):
    """LlamaForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantLlamaConfig
    family = "llama"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantLlamaForQuestionAnswering(AttentionVariantMixin, LlamaForQuestionAnswering):
    """LlamaForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantLlamaConfig
    family = "llama"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantQwen2Model(AttentionVariantMixin, Qwen2Model):
    """Qwen2Model running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantQwen2Config
    family = "qwen2"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantQwen2ForCausalLM(AttentionVariantMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantQwen2Config
    family = "qwen2"
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies code


class AttnVariantQwen2ForSequenceClassification(AttentionVariantMixin, Qwen2ForSequenceClassification):
    """Qwen2ForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantQwen2Config
    family = "qwen2"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantQwen2ForTokenClassification(AttentionVariantMixin, Qwen2ForTokenClassification):
    """Qwen2ForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantQwen2Config
    family = "qwen2"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantQwen2ForQuestionAnswering(AttentionVariantMixin, Qwen2ForQuestionAnswering):
    """Qwen2ForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantQwen2Config
    family = "qwen2"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantMistralModel(AttentionVariantMixin, MistralModel):
    """MistralModel running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantMistralConfig
    family = "mistral"
    _auto_class = "AutoModel"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantMistralForCausalLM(AttentionVariantMixin, MistralForCausalLM):
    """MistralForCausalLM running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantMistralConfig
    family = "mistral"
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies code


class AttnVariantMistralForSequenceClassification(AttentionVariantMixin, MistralForSequenceClassification):
    """MistralForSequenceClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantMistralConfig
    family = "mistral"
    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantMistralForTokenClassification(AttentionVariantMixin, MistralForTokenClassification):
    """MistralForTokenClassification running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantMistralConfig
    family = "mistral"
    _auto_class = "AutoModelForTokenClassification"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


class AttnVariantMistralForQuestionAnswering(AttentionVariantMixin, MistralForQuestionAnswering):
    """MistralForQuestionAnswering running the attention variant named in its config (attention_type)."""

    config_class = AttnVariantMistralConfig
    family = "mistral"
    _auto_class = "AutoModelForQuestionAnswering"  # save_pretrained copies code
    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items


VARIANT_MODELS: dict[str, dict[str, type]] = {
    "bert": {
        "BertModel": AttnVariantBertModel,
        "BertForPreTraining": AttnVariantBertForPreTraining,
        "BertLMHeadModel": AttnVariantBertLMHeadModel,
        "BertForMaskedLM": AttnVariantBertForMaskedLM,
        "BertForSequenceClassification": AttnVariantBertForSequenceClassification,
        "BertForTokenClassification": AttnVariantBertForTokenClassification,
        "BertForQuestionAnswering": AttnVariantBertForQuestionAnswering,
        "BertForMultipleChoice": AttnVariantBertForMultipleChoice,
        "BertForNextSentencePrediction": AttnVariantBertForNextSentencePrediction,
    },
    "roberta": {
        "RobertaModel": AttnVariantRobertaModel,
        "RobertaForMaskedLM": AttnVariantRobertaForMaskedLM,
        "RobertaForCausalLM": AttnVariantRobertaForCausalLM,
        "RobertaForSequenceClassification": AttnVariantRobertaForSequenceClassification,
        "RobertaForTokenClassification": AttnVariantRobertaForTokenClassification,
        "RobertaForQuestionAnswering": AttnVariantRobertaForQuestionAnswering,
        "RobertaForMultipleChoice": AttnVariantRobertaForMultipleChoice,
    },
    "gpt2": {
        "GPT2Model": AttnVariantGPT2Model,
        "GPT2LMHeadModel": AttnVariantGPT2LMHeadModel,
        "GPT2ForSequenceClassification": AttnVariantGPT2ForSequenceClassification,
        "GPT2ForTokenClassification": AttnVariantGPT2ForTokenClassification,
        "GPT2ForQuestionAnswering": AttnVariantGPT2ForQuestionAnswering,
        "GPT2DoubleHeadsModel": AttnVariantGPT2DoubleHeadsModel,
    },
    "llama": {
        "LlamaModel": AttnVariantLlamaModel,
        "LlamaForCausalLM": AttnVariantLlamaForCausalLM,
        "LlamaForSequenceClassification": AttnVariantLlamaForSequenceClassification,
        "LlamaForTokenClassification": AttnVariantLlamaForTokenClassification,
        "LlamaForQuestionAnswering": AttnVariantLlamaForQuestionAnswering,
    },
    "qwen2": {
        "Qwen2Model": AttnVariantQwen2Model,
        "Qwen2ForCausalLM": AttnVariantQwen2ForCausalLM,
        "Qwen2ForSequenceClassification": AttnVariantQwen2ForSequenceClassification,
        "Qwen2ForTokenClassification": AttnVariantQwen2ForTokenClassification,
        "Qwen2ForQuestionAnswering": AttnVariantQwen2ForQuestionAnswering,
    },
    "mistral": {
        "MistralModel": AttnVariantMistralModel,
        "MistralForCausalLM": AttnVariantMistralForCausalLM,
        "MistralForSequenceClassification": AttnVariantMistralForSequenceClassification,
        "MistralForTokenClassification": AttnVariantMistralForTokenClassification,
        "MistralForQuestionAnswering": AttnVariantMistralForQuestionAnswering,
    },
}
"""Family -> transformers class name -> its variant subclass."""
