"""Bad input gets a clear error; numerics hold over random shapes (hypothesis); state is deterministic; a killed
conversion leaves nothing half-written; no unpickling; 32K-token inputs run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import hf_attn_variants as hv
from hf_attn_variants.modeling import VARIANT_CONFIGS, VARIANTS, resolve_settings

# --- validation --------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("linformer", "k", 0), ("linformer", "k", 2.0), ("linformer", "max_length", -3),
    ("linformer", "exact_first", -1), ("linformer", "exact_first", 256),  # must be below k (256)
    ("linformer", "window", -4), ("linformer", "window", 2.5),
    ("performer", "num_features", -1), ("performer", "chunk_size", "64"), ("performer", "redraw_interval", -1),
    ("performer", "exact_first", 1),  # needs a window
    ("bigbird", "block_size", 0), ("bigbird", "random_blocks", -1), ("bigbird", "window_blocks", 1.5),
    ("lsh", "bucket_size", 0), ("lsh", "num_hashes", 0), ("lsh", "num_buckets", True),
]


@pytest.mark.parametrize("variant,key,value", BAD_SETTINGS)
def test_bad_setting_values_name_the_setting_and_the_fix(variant, key, value):
    with pytest.raises(ValueError, match=rf"{variant} setting {key}=.*must be"):
        resolve_settings(variant, {key: value})


def test_a_setting_of_another_variant_says_whose_it_is():
    message = "unknown setting 'bucket_size' for attention 'bigbird'. It is a setting of lsh"
    with pytest.raises(ValueError, match=message):
        resolve_settings("bigbird", {"bucket_size": 32})
    with pytest.raises(ValueError, match="'full' takes no settings"):
        resolve_settings("full", {"k": 3})


def test_config_validation_on_construction():
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
        VARIANT_CONFIGS["bert"](hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown attention variant 'flash'"):
        VARIANT_CONFIGS["llama"](attention_type="flash")
    with pytest.raises(ValueError, match="'linformer' is not causal"):
        VARIANT_CONFIGS["llama"](attention_type="linformer")
    with pytest.raises(ValueError, match="'linformer' is not causal"):
        VARIANT_CONFIGS["bert"](attention_type="linformer", is_decoder=True)


def test_linformer_input_longer_than_its_max_length():
    model = hv.convert(tiny_model("bert"), attention="linformer", k=8, max_length=32)
    model(input_ids=torch.ones(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="input length 33 exceeds this Linformer's max_length 32"):
        model(input_ids=torch.ones(1, 33, dtype=torch.long))


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_inputs_beyond_the_extended_positions(family):
    positions = 258 if family == "roberta" else 256  # RoBERTa keeps padding_idx + 1 rows in front
    model = hv.convert(tiny_model(family), attention="performer", max_position_embeddings=positions)
    model(input_ids=torch.full((1, 256), 5))
    with pytest.raises(ValueError, match="needs 257 positions, but this model has learned positions for 256 only"):
        model(input_ids=torch.full((1, 257), 5))


# --- properties over random shapes (hypothesis) ------------------------------------------------------------------


class FakeAttention(torch.nn.Module):
    """What the interface functions read from an attention module: config, is_causal, layer_idx, GQA groups."""

    def __init__(self, variant: str, heads: int, kv_heads: int, head_dim: int, causal: bool):
        super().__init__()
        small = {"linformer": {"k": 16, "max_length": 64}, "performer": {"num_features": 64, "chunk_size": 8},
                 "bigbird": {"block_size": 4, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1},
                 "lsh": {"bucket_size": 4, "num_hashes": 2, "num_buckets": 4}}[variant]
        family = "llama" if causal else "bert"
        extra = {"num_key_value_heads": kv_heads} if causal else {}
        self.config = VARIANT_CONFIGS[family](
            hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=64,
            attention_type=variant, attention_settings=small, **extra,
        )
        self.is_causal, self.layer_idx, self.num_key_value_groups = causal, 0, heads // kv_heads
        state_class = VARIANTS[variant].state
        self.attn_variant = state_class(resolve_settings(variant, small), heads, head_dim, 64, seed=3)
        self.attn_variant.reset_parameters()

    def forward(self, q, k, v, mask):
        return VARIANTS[self.config.attention_type].forward(self, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "length": st.integers(1, 40), "heads": st.sampled_from([1, 2, 4]),
    "groups": st.sampled_from([1, 2]), "head_dim": st.sampled_from([4, 8]), "pad": st.integers(0, 12),
    "seed": st.integers(0, 2**16),
})


def make_inputs(shape, causal, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(shape["seed"])
    b, n, h, d = shape["batch"], shape["length"], shape["heads"], shape["head_dim"]
    kv_heads = max(h // shape["groups"], 1) if causal else h
    q = torch.randn(b, h, n, d, generator=g) * scale
    k = torch.randn(b, kv_heads, n, d, generator=g) * scale
    v = torch.randn(b, kv_heads, n, d, generator=g)
    pad = min(shape["pad"], n - 1)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, n - pad :] = False  # the last row is right-padded
    return [t.to(dtype) for t in (q, k, v)], mask, pad, kv_heads


PROPERTY_CASES = [(v, False) for v in ("linformer", "performer", "bigbird", "lsh")] + [
    (v, True) for v in ("performer", "bigbird", "lsh")
]


@pytest.mark.parametrize("variant,causal", PROPERTY_CASES)
@settings(max_examples=25, deadline=None)
@given(shape=shapes)
def test_padding_future_and_batch_neighbours_never_change_real_outputs(variant, causal, shape):
    (q, k, v), mask, pad, kv_heads = make_inputs(shape, causal)
    module = FakeAttention(variant, shape["heads"], kv_heads, shape["head_dim"], causal)
    out = module(q, k, v, mask)
    n = shape["length"]
    assert out.shape == (shape["batch"], n, shape["heads"], shape["head_dim"]) and torch.isfinite(out).all()
    # padded keys' content
    k2, v2 = k.clone(), v.clone()
    k2[-1, :, n - pad :] += 100.0
    v2[-1, :, n - pad :] -= 100.0
    torch.testing.assert_close(module(q, k2, v2, mask)[-1, : n - pad], out[-1, : n - pad], atol=1e-4, rtol=1e-4)
    # other examples in the batch
    alone = module(q[:1], k[:1], v[:1], mask[:1])
    torch.testing.assert_close(alone[0], out[0], atol=1e-4, rtol=1e-4)
    if causal and n > 1:  # future tokens
        cut = n // 2
        q3, k3, v3 = (t.clone() for t in (q, k, v))
        for t in (q3, k3, v3):
            t[:, :, cut:] = torch.randn_like(t[:, :, cut:]) * 5
        changed = module(q3, k3, v3, mask)
        real = mask[:, :cut]  # padded queries' outputs are unspecified
        torch.testing.assert_close(changed[:, :cut][real], out[:, :cut][real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,causal", PROPERTY_CASES)
@settings(max_examples=10, deadline=None)
@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_outputs_and_gradients_are_finite_even_with_large_logits(variant, causal, shape, dtype):
    (q, k, v), mask, _, kv_heads = make_inputs(shape, causal, dtype=dtype, scale=20.0)
    module = FakeAttention(variant, shape["heads"], kv_heads, shape["head_dim"], causal).to(dtype)
    q.requires_grad_(True)
    out = module(q, k, v, mask)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("variant,causal", PROPERTY_CASES)
def test_gradcheck_in_float64(variant, causal):
    shape = {"batch": 2, "length": 9, "heads": 2, "groups": 1, "head_dim": 4, "pad": 2, "seed": 1}
    (q, k, v), mask, _, kv_heads = make_inputs(shape, causal, dtype=torch.float64)
    module = FakeAttention(variant, 2, kv_heads, 4, causal).double()
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: module(a, b, c, mask), inputs, eps=1e-6, atol=1e-5)


# --- determinism -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_the_same_seed_build_identical_state(saved_models, tmp_path):
    script = textwrap.dedent("""
        import sys, hf_attn_variants as hv
        for variant in ("performer", "bigbird", "lsh", "linformer"):
            hv.convert(sys.argv[1], attention=variant, output_dir=f"{sys.argv[2]}/{variant}", seed=7)
    """)
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, saved_models["bert"], str(tmp_path / run)], check=True,
                       capture_output=True, timeout=300)
    for variant in ("performer", "bigbird", "lsh", "linformer"):
        a = load_file(str(tmp_path / "a" / variant / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / variant / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    seed_7 = load_file(str(tmp_path / "a" / "performer" / "model.safetensors"))
    seed_8 = hv.convert(saved_models["bert"], attention="performer", seed=8).state_dict()
    key = next(k for k in seed_7 if k.endswith("attn_variant.features"))
    assert not torch.equal(seed_8[key], seed_7[key]), "the seed must matter"


def test_performer_features_are_redrawn_only_when_asked():
    ids = torch.randint(3, 90, (1, 12))
    fixed = hv.convert(tiny_model("bert"), attention="performer", num_features=16).train()
    redraw = hv.convert(tiny_model("bert"), attention="performer", num_features=16, redraw_interval=2).train()

    def features(model):
        return model.bert.encoder.layer[0].attention.self.attn_variant.features.clone()

    start_fixed, start_redraw = features(fixed), features(redraw)
    assert torch.equal(start_fixed, start_redraw)
    for _ in range(2):
        fixed(input_ids=ids)
        redraw(input_ids=ids)
    assert torch.equal(features(fixed), start_fixed)
    after_two = features(redraw)
    assert not torch.equal(after_two, start_redraw)
    redraw.eval()
    for _ in range(3):
        redraw(input_ids=ids)
    assert torch.equal(features(redraw), after_two), "eval forwards must not redraw"


# --- nothing lost --------------------------------------------------------------------------------------------------

KILLED_CONVERSION = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    import hf_attn_variants as hv

    real_save = safetensors.torch.save_file
    def slow_save(*args, **kwargs):
        real_save(*args, **kwargs)
        print("saving", flush=True)
        time.sleep(60)  # killed here: weights written, the rest of the folder not yet
    safetensors.torch.save_file = slow_save
    import transformers.modeling_utils
    transformers.modeling_utils.safe_save_file = slow_save
    hv.convert(sys.argv[1], attention="performer", output_dir=sys.argv[2])
""")


@pytest.mark.slow
def test_a_conversion_killed_midway_leaves_no_destination_and_the_source_intact(saved_models, tmp_path):
    source = Path(saved_models["gpt2"])
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    destination = tmp_path / "out" / "converted"
    process = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(source), str(destination)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "saving"
    temporary = [p for p in (tmp_path / "out").iterdir() if ".converted.tmp-" in p.name]
    assert any((p / "model.safetensors").exists() for p in temporary)  # killed mid-write, really
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not destination.exists()
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    hv.convert(source, attention="performer", output_dir=destination)  # a retry succeeds beside the debris
    assert (destination / "model.safetensors").exists() and (destination / "config.json").exists()


def test_the_package_never_unpickles_checkpoints(saved_models, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(saved_models["bert"], folder)
    torch.save(tiny_model("bert").state_dict(), folder / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    model = hv.convert(folder, attention="performer")
    safetensors_weights = load_file(str(folder / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(model.state_dict()[key], safetensors_weights[key])


# --- long inputs ---------------------------------------------------------------------------------------------------

LONG_FORWARD = textwrap.dedent("""
    import resource, sys, torch, hf_attn_variants as hv
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel
    n = 32768
    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=n)
    for family, variant in [("bert", "linformer"), ("bert", "performer"), ("bert", "bigbird"), ("bert", "lsh"),
                            ("llama", "performer"), ("llama", "bigbird"), ("llama", "lsh")]:
        source = BertModel(BertConfig(**common)) if family == "bert" else LlamaModel(LlamaConfig(**common))
        model = hv.convert(source, attention=variant)
        with torch.no_grad():
            out = model(input_ids=torch.randint(0, 50, (1, n))).last_hidden_state
        assert out.shape == (1, n, 32) and torch.isfinite(out).all(), (family, variant)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_32k_token_forward_of_every_linear_memory_variant_fits_in_24_gib():
    result = subprocess.run([sys.executable, "-c", LONG_FORWARD], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 24 * 1024 * 1024, f"peak RSS {peak_kib / 2**20:.1f} GiB"


def test_save_pretrained_is_atomic_and_keeps_unrelated_files(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    model = hv.convert(tiny_model("bert"), attention="lsh")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    original = (folder / "model.safetensors").read_bytes()

    real_save = PreTrainedModel.save_pretrained

    def crash_midway(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        hv.convert(tiny_model("bert", seed=1), attention="lsh").save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == original, "a failed save changed the saved model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "temporary folder left behind"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    hv.convert(tiny_model("bert", seed=1), attention="lsh").save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() != original
    assert (folder / "trainer_state.json").exists() and not (folder / "model-00002-of-00002.safetensors").exists()


def test_performer_redraw_does_not_step_again_when_checkpointing_recomputes_the_forward(tmp_path):
    """With redraw_interval=1 every training forward redraws. Activation checkpointing recomputes each layer in the
    backward: the features must be the forward's, so the gradients equal those of the same step without it. The
    redraw counter is saved, so a reloaded model continues the schedule."""
    from transformers import AutoModelForMaskedLM

    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = hv.convert(tiny_model("bert"), attention="performer", num_features=16, redraw_interval=1).train()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
    state = model.bert.encoder.layer[0].attention.self.attn_variant
    assert int(state.forward_calls) == 1 and int(state.draws) == 1  # one model forward, one redraw
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "m").bert.encoder.layer[0].attention.self.attn_variant
    assert int(reloaded.draws) == 1 and torch.equal(reloaded.features, state.features)


def test_the_wheel_lists_every_subpackage():
    """A package missing from pyproject's explicit list works in the editable install and is absent from a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    inits = (root / "hf_attn_variants").rglob("__init__.py")
    on_disk = {".".join(init.parent.relative_to(root).parts) for init in inits}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
