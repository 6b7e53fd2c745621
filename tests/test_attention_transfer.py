"""Layer-wise attention transfer (stage 1): each layer's held-out loss falls, only the variant's state moves, and the
learned Performer kernel saves, reloads and loads as remote code."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, load_without_package, tiny_model

import hf_attn_variants as hv
from hf_attn_variants.attention_transfer import LayerwiseTransfer, variant_parameters
from hf_attn_variants.distill import attention_modules

LENGTH = 48  # > Linformer's k and several Performer chunks: the approximate paths run
SETTINGS = {
    "linformer": {"k": 8},
    "performer": {"kernel": "learned", "num_features": 16},
}


def _batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (2, LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, LENGTH - 7 :] = 0  # padding must not count in the loss
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def sharpened(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale the query/key projections: a random tiny model's attention is almost uniform, which any variant
    matches already; real models attend sharply."""
    with torch.no_grad():
        for module in attention_modules(model):
            for name in ("query", "key", "q_proj", "k_proj"):
                if hasattr(module, name):
                    getattr(module, name).weight.mul_(factor)
    return model


@pytest.mark.parametrize("family,variant", [("bert", "linformer"), ("bert", "performer"), ("llama", "performer")])
def test_layerwise_transfer_lowers_every_layers_held_out_loss(family, variant):
    teacher = sharpened(tiny_model(family))
    student = hv.convert(teacher, attention=variant, **SETTINGS[variant])
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".attn_variant." not in n}
    state_before = [[p.detach().clone() for p in variant_parameters(m)] for m in attention_modules(student)]
    train, held_out = _batches(12, seed=1), _batches(3, seed=2)
    lr, gain = (1e-3, 0.99) if variant == "linformer" else (1e-2, 0.9)  # E/F start as 0/1 block poolings
    result = LayerwiseTransfer(student, teacher, lr=lr).fit(lambda: train, held_out, epochs=3, log=lambda _: None)
    for before, after in zip(result["eval_loss_before"], result["eval_loss_after"], strict=True):
        assert after < gain * before, result
    for name, param in student.named_parameters():  # q/k/v/o and everything else stay the source's
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    moved = [not torch.equal(a, b) for m, old in zip(attention_modules(student), state_before, strict=True)
             for a, b in zip(variant_parameters(m), old, strict=True)]
    assert moved and all(moved)


def test_transfer_refuses_a_variant_without_learned_state():
    teacher = tiny_model("bert")
    student = hv.convert(teacher, attention="performer", num_features=16)  # FAVOR+: fixed random features
    with pytest.raises(ValueError, match="has no learned state"):
        LayerwiseTransfer(student, teacher)


def test_learned_performer_saves_reloads_and_loads_as_remote_code(tmp_path):
    from transformers import AutoModelForMaskedLM

    model = hv.convert(tiny_model("bert"), attention="performer", **SETTINGS["performer"])
    state = model.bert.encoder.layer[0].attention.self.attn_variant
    assert isinstance(state.features, torch.nn.Parameter) and state.features.shape == (4, 16, 8)
    with torch.no_grad():
        state.features.add_(0.1)  # trained values, not the seed's draw, must come back
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
    outputs, classes = load_without_package(tmp_path, [
        {"name": "learned", "folder": str(tmp_path / "m"), "auto": "AutoModelForMaskedLM",
         "ids": ids.tolist(), "mask": mask.tolist()},
    ])
    assert classes["learned"][2] == "performer"
    assert torch.equal(outputs["learned"], expected)


def test_learned_kernel_starts_at_favor_plus():
    """Initialised at the FAVOR+ draw: before training, the learned kernel approximates softmax attention as well
    as FAVOR+ does (same error to exact attention within noise)."""
    teacher = tiny_model("bert")
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    errors = {}
    with torch.no_grad():
        exact = teacher(ids).logits
        for kernel in ("softmax", "learned"):
            model = hv.convert(teacher, attention="performer", kernel=kernel, num_features=64)
            errors[kernel] = (model(ids).logits - exact).pow(2).mean().item()
    assert math.isclose(errors["learned"], errors["softmax"], rel_tol=0.5), errors
