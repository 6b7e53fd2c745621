"""`hf-attn-variants evaluate`: fidelity by length against the source, or against the extended `full` model
beyond the source's positions; a table, a JSON file and the numbers on the model card."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LOCAL_TEXT
from huggingface_hub import ModelCard

import hf_attn_variants as hv
from hf_attn_variants.cli import main

TEXT = LOCAL_TEXT * 6


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text(TEXT + "\n")
    return path


def sharpened_copy(folder, destination):
    """The model with its query/key projections scaled x16 (sharp attention, as in real models) and its tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(16.0)
            layer.attention.self.key.weight.mul_(16.0)
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(folder).save_pretrained(destination)
    return destination


def _run(source, converted, lengths, text_file, output):
    code = main(["evaluate", str(source), str(converted), "--lengths", lengths, "--texts", str(text_file),
                 "--windows", "3", "--output", str(output)])
    assert code == 0
    return json.loads((output / "fidelity.json").read_text())


def test_encoder_fidelity_by_length_full_is_exact_and_extended_lengths_use_the_full_model(
    bert_with_tokenizer, tmp_path, text_file
):
    hv.convert(bert_with_tokenizer, attention="full", output_dir=tmp_path / "full")
    report = _run(bert_with_tokenizer, tmp_path / "full", "16,48", text_file, tmp_path / "out_full")
    assert [r["cosine"] for r in report["rows"]] == pytest.approx([1.0, 1.0], abs=1e-6)  # same SDPA, same weights
    source = sharpened_copy(bert_with_tokenizer, tmp_path / "sharp")  # a random tiny model attends ~uniformly
    hv.convert(source, attention="performer", output_dir=tmp_path / "performer", max_position_embeddings=128,
               num_features=4)  # few random features: clearly approximate
    report = _run(source, tmp_path / "performer", "48,96", text_file, tmp_path / "out_performer")
    assert [r["reference"] for r in report["rows"]] == ["source", "full, extended positions"]
    # approximate (a tiny 2-layer model's pooled output is dominated by its residual stream), not broken
    assert all(0.5 < r["cosine"] < 0.99999 for r in report["rows"]), report  # full: within 1e-6 of 1
    assert "| 96 |" in (tmp_path / "out_performer" / "fidelity.md").read_text()
    card = ModelCard.load(tmp_path / "performer" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} >= {"cosine_to_source_48", "cosine_to_source_96"}


def test_decoder_fidelity_reports_kl_and_perplexity_ratio(gpt2_with_tokenizer, tmp_path, text_file):
    hv.convert(gpt2_with_tokenizer, attention="full", output_dir=tmp_path / "full")
    exact = _run(gpt2_with_tokenizer, tmp_path / "full", "32", text_file, tmp_path / "out_full")["rows"][0]
    assert exact["next_token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert exact["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    hv.convert(gpt2_with_tokenizer, attention="bigbird", output_dir=tmp_path / "bigbird", block_size=4,
               window_blocks=1, global_blocks=1, random_blocks=1)
    sparse = _run(gpt2_with_tokenizer, tmp_path / "bigbird", "48", text_file, tmp_path / "out_bb")["rows"][0]
    assert sparse["next_token_kl"] > 1e-6 and sparse["perplexity_ratio"] > 0


def test_lengths_beyond_the_converted_positions_get_a_clear_error(bert_with_tokenizer, tmp_path, text_file,
                                                                  capsys):
    hv.convert(bert_with_tokenizer, attention="full", output_dir=tmp_path / "full")
    code = main(["evaluate", bert_with_tokenizer, str(tmp_path / "full"), "--lengths", "500",
                 "--texts", str(text_file), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "exceeds the converted model's 64 positions" in capsys.readouterr().err


def test_retrieval_agreement_counts_texts_whose_nearest_neighbour_is_unchanged():
    from hf_attn_variants.evaluation import retrieval_agreement

    reference = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # neighbours: 1, 0, 3, 2
    assert retrieval_agreement(reference, reference * 3) == 1.0
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # neighbours: 2, 3, 0, 1
    assert retrieval_agreement(reference, swapped) == 0.0


def test_long_attention_mass_classifies_keys_by_distance_tile_alias_and_first_token():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "long_attention_mass.py"
    spec = importlib.util.spec_from_file_location("long_attention_mass", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    n = 1024
    probs = torch.zeros(1, n, n)
    query = torch.arange(n)
    probs[0, query, 0] = 0.1  # the first token
    probs[0, query, (query + 100) % n] += 0.2  # within 128 for most queries, else an ordinary far key
    probs[0, query, (query + 513) % n] += 0.3  # another tile, own tiled position + 1: an alias
    probs[0, query, (query + 300) % n] += 0.4  # far, not an alias
    shares = script.mass_shares(probs)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert shares["first"] == pytest.approx(0.1, abs=0.01)
    assert shares["alias"] == pytest.approx(0.3, abs=0.01)
    assert shares["near"] == pytest.approx(0.2 * (n - 100) / n, abs=0.01)
