"""Model cards, push (dry run and the real upload path against huggingface_hub's own objects), round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import batch_with_padding, load_without_package
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from transformers import AutoModelForMaskedLM

import hf_attn_variants as hv
from hf_attn_variants.cli import main as cli_main
from hf_attn_variants.hub import PushError, push, read_facts, write_model_card


@pytest.fixture
def converted(bert_with_tokenizer, tmp_path):
    readme = os.path.join(bert_with_tokenizer, "README.md")
    ModelCard("---\nlicense: mit\n---\n# tiny\n").save(readme)  # a source card whose licence is inherited
    folder = tmp_path / "tiny-performer"
    hv.convert(bert_with_tokenizer, attention="performer", output_dir=folder, base_model="org/tiny-bert",
               num_features=32)
    return folder


def test_convert_writes_a_card_with_what_it_is_and_how_to_load(converted):
    card = ModelCard.load(converted / "README.md")
    assert card.data.base_model == "org/tiny-bert"
    assert card.data.library_name == "transformers"
    assert card.data.license == "mit"
    assert {"hf-attn-variants", "attention-performer", "bert"} <= set(card.data.tags)
    text = card.text
    assert "`num_features=32`" in text and "trust_remote_code=True" in text
    assert "AutoModelForMaskedLM.from_pretrained(\"tiny-performer\"" in text
    assert "converted from org/tiny-bert to 'performer'" in text


def test_results_become_model_index_eval_results(converted):
    model = AutoModelForMaskedLM.from_pretrained(converted)
    write_model_card(converted, model.config, type(model).__name__, results=[{
        "task_type": "feature-extraction", "task_name": "embedding fidelity", "dataset_type": "python-docs",
        "dataset_name": "Python documentation sentences", "metric_type": "cosine", "metric_value": 0.9871,
        "metric_name": "mean cosine to the original",
    }], history=["fine-tuned 3 steps"])
    card = ModelCard.load(converted / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(0.9871)
    assert "| embedding fidelity | Python documentation sentences | mean cosine to the original | 0.9871 |" in card.text
    assert "fine-tuned 3 steps" in card.text and "converted from" in card.text  # history accumulates
    assert read_facts(converted)["license"] == "mit"


def test_dry_run_lists_exactly_the_files_and_the_commit(converted, capsys):
    assert cli_main(["push", str(converted), "--repo-id", "org/tiny-performer", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    files = sorted(os.listdir(converted))
    listed = [line.split()[0] for line in printed.splitlines() if line.startswith("  ")]
    assert listed == files
    assert "repository: org/tiny-performer (public)" in printed and "nothing was uploaded" in printed


def test_push_sends_one_commit_of_every_file(converted, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs["private"])

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        calls["commit"] = (repo_id, operations, commit_message)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    push(converted, "org/tiny-performer", private=True)
    assert calls["repo"] == ("org/tiny-performer", True)
    repo_id, operations, message = calls["commit"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert sorted(op.path_in_repo for op in operations) == sorted(os.listdir(converted))
    assert "config.json" in {op.path_in_repo for op in operations} and "tiny-performer" in message


def test_push_offline_is_a_clear_error(converted, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode"):
        push(converted, "org/tiny-performer")
    assert cli_main(["push", str(converted), "--repo-id", "org/x"]) == 2
    err = capsys.readouterr().err
    assert "offline mode" in err and "Traceback" not in err


@pytest.mark.parametrize("repo_id,problem", [("no-slash", "must look like ORG/NAME"), ("org/x", "not a saved model")])
def test_push_refuses_bad_input(tmp_path, repo_id, problem, converted):
    folder = converted if problem != "not a saved model" else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    with pytest.raises(PushError, match=problem):
        push(folder, repo_id, dry_run=True)


@pytest.mark.slow
def test_round_trip_convert_finetune_push_and_load_with_and_without_the_package(bert_with_tokenizer, tmp_path):
    model = hv.convert(bert_with_tokenizer, attention="linformer", k=16).train()
    ids, mask = batch_with_padding(length=24)
    ids = ids % model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    fresh = hv.convert(bert_with_tokenizer, attention="linformer", k=16)
    projection = "bert.encoder.layer.0.attention.self.attn_variant.proj_k"
    assert not torch.equal(model.state_dict()[projection], fresh.state_dict()[projection]), "state did not train"
    folder = tmp_path / "tuned"
    model.eval().save_pretrained(folder)
    plan = push(folder, "org/tuned", dry_run=True)
    uploaded = {o.path_in_repo for o in plan.operations}
    assert {"model.safetensors", "config.json", "modeling_attn_variants.py"} <= uploaded
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with_package = AutoModelForMaskedLM.from_pretrained(folder)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(with_package, expected)
    outputs, classes = load_without_package(tmp_path, [{"name": "tuned", "folder": str(folder),
                                                       "auto": "AutoModelForMaskedLM", "ids": ids.tolist(),
                                                       "mask": mask.tolist()}])
    assert torch.equal(outputs["tuned"], expected) and classes["tuned"][2] == "linformer"
    assert json.load(open(folder / "config.json"))["attention_type"] == "linformer"
