"""Exact softmax attention through PyTorch SDPA, under the name 'full': the reference for A/B comparisons.

It is transformers' own SDPA path with its N x N mask builder, so a model converted with attention='full'
computes exactly what the source model computes.
"""

from __future__ import annotations

import dataclasses

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .attention_common import SettingsBase

full_attention_forward = sdpa_attention_forward
full_attention_mask = sdpa_mask


@dataclasses.dataclass
class FullSettings(SettingsBase):
    """Exact attention has no settings."""

    variant = "full"

    def keys_attended(self, length: int, causal: bool) -> float:
        """Every key (half of them on average when causal)."""
        return length / 2 if causal else length
