"""LoRA on every family/variant: trains, the variant's learned state trains via modules_to_save, and
merge_and_unload gives a plain variant model that saves and reloads with identical outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_FAMILIES, batch_with_padding, tiny_model
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hf_attn_variants as hv
from hf_attn_variants.lora import add_lora, default_target_modules

CASES = [("bert", "linformer"), ("roberta", "performer"), ("bert", "bigbird"), ("bert", "lsh"),
         ("gpt2", "performer"), ("llama", "lsh"), ("qwen2", "bigbird"), ("mistral", "performer")]


@pytest.mark.parametrize("family,variant", CASES)
def test_lora_trains_merges_and_reloads(family, variant, tmp_path):
    model = hv.convert(tiny_model(family), attention=variant, **({"k": 16} if variant == "linformer" else {}))
    peft_model = add_lora(model, r=4).train()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or "attn_variant" in n for n in trainable)
    if variant == "linformer":
        assert any("attn_variant.modules_to_save" in n and "proj_k" in n for n in trainable)
    ids, mask = batch_with_padding(length=24)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)

    def eval_loss():
        peft_model.eval()
        with torch.no_grad():
            return peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.item()

    before = eval_loss()
    for _ in range(8):
        peft_model.train()
        peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss() < before
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if family in DECODER_FAMILIES else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           merged(input_ids=ids, attention_mask=mask).logits)


def test_default_targets_per_family():
    assert default_target_modules(hv.convert(tiny_model("gpt2"), attention="full")) == ["c_attn"]
    assert default_target_modules(hv.convert(tiny_model("llama"), attention="full"))[0] == "q_proj"
