"""Tiny checkpoints built here (random tiny configs, tokenizers trained on local text): nothing comes from the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

import hf_attn_variants  # noqa: F401  (registers the variants)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 96
ENCODER_FAMILIES = ("bert", "roberta")
DECODER_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
FAMILIES = ENCODER_FAMILIES + DECODER_FAMILIES
EFFICIENT = ("linformer", "performer", "bigbird", "lsh")
CAUSAL_EFFICIENT = ("performer", "bigbird", "lsh")

LOCAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. Attention is all you need, but memory is finite. "
    "Linear attention approximates the softmax kernel with random features. Sparse attention keeps a window, "
    "a few global tokens and some random blocks. Hashing puts similar queries and keys in the same bucket. "
    "A low rank projection of keys and values along the sequence makes attention linear in length. "
) * 4


def tiny_model(family: str, max_positions: int = 128, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer model of ``family`` (hidden 32, 4 heads; Llama-style families use 2 KV heads)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
    if family == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=32, max_position_embeddings=max_positions, **common))
    elif family == "roberta":
        model = RobertaForMaskedLM(
            RobertaConfig(hidden_size=32, max_position_embeddings=max_positions + 2, pad_token_id=1, **common)
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions,
                       bos_token_id=0, eos_token_id=0)
        )
    else:
        config_class, model_class = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }[family]
        model = model_class(
            config_class(hidden_size=32, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, **common)
        )
    return model.eval()


def batch_with_padding(length: int = 20, pad: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, length] and attention_mask with the second row right-padded by ``pad`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - pad :] = 0
    return ids, mask


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, str]:
    """family -> folder of a saved tiny source model (safetensors)."""
    root = tmp_path_factory.mktemp("sources")
    folders = {}
    for family in FAMILIES:
        folder = root / family
        tiny_model(family).save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.fixture(scope="session")
def bert_with_tokenizer(tmp_path_factory) -> str:
    """A tiny BERT folder with a WordPiece tokenizer whose vocabulary comes from LOCAL_TEXT."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert_tok")
    words = sorted({w.strip(".,").lower() for w in LOCAL_TEXT.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file))
    model = BertForMaskedLM(
        BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=40, max_position_embeddings=64)
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def gpt2_with_tokenizer(tmp_path_factory) -> str:
    """A tiny GPT-2 folder with a byte-level BPE trained on LOCAL_TEXT and a generation config."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GenerationConfig, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2_tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([LOCAL_TEXT], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                   bos_token_id=0, eos_token_id=0)
    )
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "hf_attn_variants":
                raise ImportError("hf_attn_variants is not installed here")

    sys.meta_path.insert(0, BlockPackage())
    sys.path = [p for p in sys.path if p.rstrip("/") not in ("", REPO_ROOT)]
    try:
        import hf_attn_variants  # noqa: F401
        raise SystemExit("hf_attn_variants is importable: the test would prove nothing")
    except ImportError:
        pass

    import torch
    import transformers
    from safetensors.torch import save_file

    jobs = json.load(open(sys.argv[1]))
    outputs, classes = {}, {}
    for job in jobs:
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["folder"], trust_remote_code=True).eval()
        ids = torch.tensor(job["ids"])
        mask = torch.tensor(job["mask"])
        with torch.no_grad():
            outputs[job["name"]] = model(input_ids=ids, attention_mask=mask).logits.contiguous()
        classes[job["name"]] = [type(model).__module__, type(model).__name__, model.config._attn_implementation]
    save_file(outputs, sys.argv[2])
    json.dump(classes, open(sys.argv[3], "w"))
    """
).replace("REPO_ROOT", repr(REPO_ROOT))


def load_without_package(tmp_path, jobs: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Load each job's folder with trust_remote_code=True in a fresh Python process in which hf_attn_variants
    cannot be imported; returns {name: logits} and {name: [module, class name, attn implementation]}.

    A job: {"name", "folder", "auto" (Auto class name), "ids", "mask" (nested lists)}.
    """
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.safetensors"),
         str(tmp_path / "classes.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(tmp_path / "out.safetensors")), json.loads((tmp_path / "classes.json").read_text())
