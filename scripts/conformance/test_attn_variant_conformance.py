"""transformers' own generic model tests (ModelTesterMixin, ConfigTester) run against the variant model classes.

Not collected by the project's suite: ``scripts/conformance.sh`` copies this file into the ``tests/`` folder of
transformers' sdist (for the installed version) and runs it there, so the mixins are upstream's, unmodified.
One test class per family x variant; the tester below is written for this project (tiny configs whose inputs run
each variant's approximate path: BigBird with more key blocks than its pattern covers, LSH with more tokens than a
bucket window, Performer with several causal chunks, Linformer with k below the length).
"""

from __future__ import annotations

import os
import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

import hf_attn_variants  # noqa: F401  (registers the variants)
from hf_attn_variants.modeling import VARIANT_CONFIGS, VARIANT_MODELS
from hf_attn_variants.modeling.families import AUTO_MAPPINGS, FAMILIES

from .test_configuration_common import ConfigTester
from .test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

SETTINGS = {
    "full": {},
    "linformer": {"k": 8},
    "performer": {"num_features": 32, "chunk_size": 8},
    "bigbird": {"block_size": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1},
    "lsh": {"bucket_size": 4, "num_buckets": 4, "num_hashes": 2},
}
FAMILY_VARIANTS = {
    "bert": ("full", "linformer", "performer", "bigbird", "lsh"),
    "llama": ("full", "performer", "bigbird", "lsh"),
}
ONLY = os.environ.get("CONFORMANCE_ONLY")  # e.g. "bert-performer": one class (CI's fast subset)


class VariantModelTester:
    """Builds a tiny config of ``family`` running ``variant`` and the inputs the mixins feed every model class."""

    def __init__(self, parent, family: str, variant: str, batch_size: int = 2, seq_length: int = 28):
        self.parent, self.family, self.variant = parent, family, variant
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.hidden_size, self.num_attention_heads = 99, 32, 4
        self.num_hidden_layers, self.num_labels, self.num_choices = 2, 3, 4
        self.is_training, self.type_sequence_label_size = True, 2

    def get_config(self):
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=37, max_position_embeddings=64,
            attention_type=self.variant, attention_settings=SETTINGS[self.variant],
        )
        if self.family == "llama":
            common.update(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return VARIANT_CONFIGS[self.family](**common)

    def prepare_config_and_inputs_for_common(self):
        inputs = {
            "input_ids": ids_tensor([self.batch_size, self.seq_length], self.vocab_size),
            "attention_mask": random_attention_mask([self.batch_size, self.seq_length]),
        }
        if self.family == "bert":
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], 2)
        return self.get_config(), inputs


class VariantConformanceBase(ModelTesterMixin):
    family = ""
    variant = ""
    test_resize_embeddings = True
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = VariantModelTester(self, self.family, self.variant)
        self.config_tester = ConfigTester(self, config_class=VARIANT_CONFIGS[self.family], hidden_size=96,
                                          attention_type=self.variant)

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels and model_class.__name__.endswith("ForPreTraining"):  # BERT's MLM + next-sentence loss
            batch, length = self.model_tester.batch_size, self.model_tester.seq_length
            inputs["labels"] = torch.zeros(batch, length, dtype=torch.long, device=torch_device)
            inputs["next_sentence_label"] = torch.zeros(batch, dtype=torch.long, device=torch_device)
        return inputs



def register_class_names() -> None:
    """The mixins pick labels and skips by class name through transformers' ``MODEL_FOR_*_MAPPING_NAMES``; list
    each variant class there under its config's model_type, as a model inside transformers would be."""
    mapping_of = dict(AUTO_MAPPINGS)
    for family, classes in VARIANT_MODELS.items():
        model_type = VARIANT_CONFIGS[family].model_type
        for base_name, auto_names in FAMILIES[family].head_classes.items():
            for auto in auto_names:
                getattr(modeling_auto, mapping_of[auto]).setdefault(model_type, classes[base_name].__name__)


register_class_names()
for _family, _variants in FAMILY_VARIANTS.items():
    for _variant in _variants:
        _name = f"{_family}-{_variant}"
        if ONLY and ONLY != _name:
            continue
        _cls = type(
            f"Test{_family.capitalize()}{_variant.capitalize()}Conformance",
            (VariantConformanceBase, unittest.TestCase),
            {
                "family": _family,
                "variant": _variant,
                "all_model_classes": tuple(VARIANT_MODELS[_family].values()),
                # The efficient variants return no attention weights (no probability matrix is ever built).
                "has_attentions": _variant == "full",
            },
        )
        globals()[_cls.__name__] = _cls

globals().pop("_cls", None)
torch.manual_seed(0)
