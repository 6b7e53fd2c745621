"""The table of model families: everything the package knows about BERT, RoBERTa, GPT-2, Llama, Qwen2 and Mistral.

One ``Family`` entry per stock ``model_type`` holds where its attention and FFN live (dotted paths from a block),
which projections LoRA adapts, how its learned positions are stored, whether it is a decoder, and which of
transformers' classes get a variant subclass (read from transformers' own Auto mappings). Pruning, conversion,
LoRA, model cards and the model classes read this table; adding a family is one entry here (plus its row in the
tests and ``python scripts/generate_model_classes.py``).
"""

from __future__ import annotations

import dataclasses
from functools import reduce

from torch import nn
from transformers.models.auto import modeling_auto
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention

AUTO_MAPPINGS = (
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    ("AutoModelForNextSentencePrediction", "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES"),
)
"""The Auto classes a variant class registers with, and transformers' mapping (model_type -> class name) of each."""

MODEL_CLASSES_MODULE = "model_classes"
"""The module (a sibling, generated from this table) that defines every variant model class."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family. Paths are dotted attribute paths: ``blocks`` from the base model, the others from a block
    (``attention``, ``attention_output``, ``ffn_inputs``, ``ffn_output``) or from the attention module
    (``projections``)."""

    name: str  # the stock model_type
    attention_classes: tuple[type[nn.Module], ...]  # self-attention modules that call the attention interface
    blocks: str
    attention: str
    projections: tuple[str, ...]  # query, key, value projections (one fused name for GPT-2's c_attn)
    attention_output: str
    ffn_inputs: tuple[str, ...]  # the FFN's input projections (gate and up for gated MLPs)
    ffn_output: str
    head_attributes: tuple[tuple[str, str], ...]  # attention-module attributes pruning resizes: "heads" or "width"
    lora_targets: tuple[str, ...]
    causal: bool  # a decoder family (BERT-style families are causal only with is_decoder)
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D; LoRA's fan_in_fan_out)
    position_key: str | None = None  # state-dict key (suffix) of learned absolute positions; None: rotary
    position_field: str = "max_position_embeddings"  # the config field a lengthened context sets
    front_rows: int | None = 0  # position rows kept in front when tiling; None: pad_token_id + 1 (RoBERTa)
    extra_heads: tuple[str, ...] = ()  # head classes that no Auto mapping lists

    @property
    def head_classes(self) -> dict[str, tuple[str, ...]]:
        """transformers class name -> the Auto classes it belongs to, base model first, then every head."""
        classes: dict[str, tuple[str, ...]] = {}
        for auto_name, mapping_name in AUTO_MAPPINGS:
            class_name = getattr(modeling_auto, mapping_name).get(self.name)
            if isinstance(class_name, str):
                classes[class_name] = (*classes.get(class_name, ()), auto_name)
        return {**classes, **{name: () for name in self.extra_heads}}

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks of ``model`` (any head or the base model), in order."""
        return list(get_path(model.base_model, self.blocks))

    def is_variant_attention(self, module: nn.Module) -> bool:
        """Whether ``module`` is a self-attention module the variant runs in (cross-attention is left alone)."""
        return isinstance(module, self.attention_classes) and not getattr(module, "is_cross_attention", False)


def get_path(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for path 'a.b.c'."""
    return reduce(getattr, path.split("."), root)


_BERT_LIKE = dict(
    blocks="encoder.layer", attention="attention.self", projections=("query", "key", "value"),
    attention_output="attention.output.dense", ffn_inputs=("intermediate.dense",), ffn_output="output.dense",
    head_attributes=(("num_attention_heads", "heads"), ("all_head_size", "width")),
    lora_targets=("query", "key", "value"), causal=False, position_key="embeddings.position_embeddings.weight",
)
_LLAMA_LIKE = dict(
    blocks="layers", attention="self_attn", projections=("q_proj", "k_proj", "v_proj"),
    attention_output="self_attn.o_proj", ffn_inputs=("mlp.gate_proj", "mlp.up_proj"), ffn_output="mlp.down_proj",
    head_attributes=(), lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), causal=True,
)

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", (BertSelfAttention,), **_BERT_LIKE),
    "roberta": Family("roberta", (RobertaSelfAttention,), **{**_BERT_LIKE, "front_rows": None}),
    "gpt2": Family(
        "gpt2", (GPT2Attention,), blocks="h", attention="attn", projections=("c_attn",),
        attention_output="attn.c_proj", ffn_inputs=("mlp.c_fc",), ffn_output="mlp.c_proj",
        head_attributes=(("split_size", "width"), ("embed_dim", "width"), ("num_heads", "heads")),
        lora_targets=("c_attn",), causal=True, conv1d=True, position_key="wpe.weight", position_field="n_positions",
        extra_heads=("GPT2DoubleHeadsModel",),
    ),
    "llama": Family("llama", (LlamaAttention,), **_LLAMA_LIKE),
    "qwen2": Family("qwen2", (Qwen2Attention,), **_LLAMA_LIKE),
    "mistral": Family("mistral", (MistralAttention,), **_LLAMA_LIKE),
}
"""Stock model_type -> its family."""


def family_of(config) -> Family:
    """The family of a stock or variant config (or of a model, through its config); a ValueError names the
    supported ones otherwise."""
    config = getattr(config, "config", config)
    name = config.model_type.removeprefix("attn_variant_")
    if name not in FAMILIES:
        raise ValueError(
            f"model type '{config.model_type}' is not supported; hf_attn_variants converts {sorted(FAMILIES)} "
            "(models whose attention goes through transformers' AttentionInterface)."
        )
    return FAMILIES[name]


def family_auto_map(family: Family) -> dict[str, str]:
    """config.json ``auto_map`` of a family: AutoConfig and every Auto class -> 'module.Class' in the saved code."""
    from .configuration_attn_variants import VARIANT_CONFIGS

    config_class = VARIANT_CONFIGS[family.name]
    auto_map = {"AutoConfig": f"{config_class.__module__.split('.')[-1]}.{config_class.__name__}"}
    for class_name, auto_names in family.head_classes.items():
        for auto_name in auto_names:
            auto_map.setdefault(auto_name, f"{MODEL_CLASSES_MODULE}.AttnVariant{class_name}")
    return auto_map


def sums_loss_over_items(class_name: str) -> bool:
    """Whether a head's loss is a sum over the batch's items divided by ``num_items_in_batch`` (transformers' causal
    LM loss). Trainer multiplies the loss by the process count for models that "accept loss kwargs", expecting
    exactly that; the other heads return a local mean, so they declare ``accepts_loss_kwargs = False`` and their
    loss and gradient do not depend on the number of processes."""
    return class_name.endswith(("ForCausalLM", "LMHeadModel"))


def render_model_classes() -> str:
    """The source of ``model_classes.py``: one written-out class per family and head (so each is findable by name),
    generated from this table by ``python scripts/generate_model_classes.py``."""
    from .configuration_attn_variants import VARIANT_CONFIGS

    stock = sorted({name for family in FAMILIES.values() for name in family.head_classes})
    configs = [VARIANT_CONFIGS[name].__name__ for name in FAMILIES]
    lines = [
        '"""Every variant model class: ``(AttentionVariantMixin, <transformers class>)`` for each family and head.',
        "",
        "Generated from the family table (families.py) by ``python scripts/generate_model_classes.py``; do not edit",
        "by hand (tests/test_families.py checks that it is current).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from transformers import (",
        *(f"    {name}," for name in stock),
        ")",
        "",
        "from .configuration_attn_variants import (",
        *(f"    {name}," for name in sorted(configs)),
        ")",
        "from .modeling_attn_variants import AttentionVariantMixin",
        "",
    ]
    table = []
    for family in FAMILIES.values():
        config_name = VARIANT_CONFIGS[family.name].__name__
        for class_name, auto_names in family.head_classes.items():
            lines += [
                "",
                f"class AttnVariant{class_name}(AttentionVariantMixin, {class_name}):",
                f'    """{class_name} running the attention variant named in its config (attention_type)."""',
                "",
                f"    config_class = {config_name}",
                f'    family = "{family.name}"',
                f'    _auto_class = "{auto_names[0] if auto_names else "AutoModel"}"  # save_pretrained copies code',
            ]
            if not sums_loss_over_items(class_name):
                lines.append("    accepts_loss_kwargs = False  # a local-mean loss: see families.sums_loss_over_items")
            lines.append("")
            table.append((family.name, class_name))
    lines += ["", "VARIANT_MODELS: dict[str, dict[str, type]] = {"]
    for name in FAMILIES:
        lines.append(f'    "{name}": {{')
        lines += [f'        "{c}": AttnVariant{c},' for f, c in table if f == name]
        lines.append("    },")
    lines += ["}", '"""Family -> transformers class name -> its variant subclass."""', ""]
    return "\n".join(lines)
