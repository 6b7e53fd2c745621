"""Fine-tuning from YAML recipes with Trainer (every task), activation checkpointing with every variant, and the
same job on two processes (torchrun, gloo on CPU)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LOCAL_TEXT, batch_with_padding, tiny_model
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

import hf_attn_variants as hv
from hf_attn_variants.cli import main as cli_main
from hf_attn_variants.finetune import run_finetune
from hf_attn_variants.recipes import load_recipe

SENTENCES = [s.strip() + "." for s in LOCAL_TEXT.split(".") if s.strip()][:12]


def write_classification_data(folder: Path) -> tuple[str, str]:
    """Sentences labelled 1 when they mention 'attention' (a learnable keyword task)."""
    rows = [(s, int("attention" in s.lower())) for s in SENTENCES] * 4
    paths = []
    for name, part in (("train", rows), ("validation", rows[:12])):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
        paths.append(str(path))
    return paths[0], paths[1]


def write_recipe(folder: Path, **fields) -> Path:
    path = folder / "recipe.yaml"
    path.write_text("# hf-attn-variants finetune recipe.yaml\n" + yaml.safe_dump(fields))
    return path


def test_sequence_classification_recipe_trains_evaluates_and_updates_the_card(bert_with_tokenizer, tmp_path):
    train, validation = write_classification_data(tmp_path)
    recipe = write_recipe(
        tmp_path, model=bert_with_tokenizer, attention="linformer", settings={"k": 16}, num_labels=2,
        task="sequence-classification", data={"train": train, "validation": validation, "max_length": 32},
        metrics=["accuracy", "f1"], output_dir=str(tmp_path / "out"),
        training={"num_train_epochs": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
    )
    metrics = run_finetune(load_recipe(recipe))
    labels = [int("attention" in s.lower()) for s in SENTENCES]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert metrics["eval_accuracy"] > majority, (metrics, majority)  # it learned the keyword, not the base rate
    assert "eval_f1" in metrics and metrics["eval_f1"] > 0
    final = tmp_path / "out" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.attention_type == "linformer" and model.config.num_labels == 2
    card = ModelCard.load(final / "README.md")
    assert any(r.metric_type == "accuracy" for r in card.data.eval_results)
    assert "fine-tuned on sequence-classification" in card.text and "converted from" in card.text


def test_causal_and_masked_lm_recipes_lower_the_loss(gpt2_with_tokenizer, bert_with_tokenizer, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(SENTENCES * 3) + "\n")
    for name, model, task, attention in (("gpt2", gpt2_with_tokenizer, "causal-lm", "bigbird"),
                                         ("bert", bert_with_tokenizer, "masked-lm", "lsh")):
        recipe = write_recipe(
            tmp_path, model=model, attention=attention, task=task,
            data={"train": str(text), "validation": str(text), "max_length": 32},
            output_dir=str(tmp_path / name), training={"num_train_epochs": 4, "learning_rate": 3e-3,
                                                       "per_device_train_batch_size": 8, "eval_strategy": "no"},
        )
        loaded = load_recipe(recipe)
        from hf_attn_variants.finetune import build_trainer

        trainer = build_trainer(loaded)
        before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
        trainer.train()
        after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
        assert after < before, (name, before, after)


def test_token_classification_recipe(bert_with_tokenizer, tmp_path):
    data = tmp_path / "tokens.jsonl"
    with open(data, "w") as f:
        for sentence in SENTENCES * 2:
            words = sentence.lower().strip(".").split()
            f.write(json.dumps({"tokens": words, "tags": [int(w == "attention") for w in words]}) + "\n")
    recipe = write_recipe(
        tmp_path, model=bert_with_tokenizer, attention="performer", task="token-classification", num_labels=2,
        data={"train": str(data), "validation": str(data), "text_column": "tokens", "label_column": "tags"},
        metrics=["accuracy"], output_dir=str(tmp_path / "tok"), training={"num_train_epochs": 1},
    )
    metrics = run_finetune(load_recipe(recipe))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


@pytest.mark.parametrize("problem,fields,message", [
    ("unknown key", {"modle": "x"}, "unknown keys \\['modle'\\]"),
    ("bad task", {"task": "translation"}, "is not one of"),
    ("no labels", {"task": "sequence-classification"}, "needs num_labels"),
])
def test_bad_recipes_fail_clearly(tmp_path, problem, fields, message):
    recipe = write_recipe(tmp_path, **{"model": "m", "output_dir": "o", "task": "masked-lm", **fields})
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe)


def test_cli_finetune_reports_a_missing_recipe(capsys):
    assert cli_main(["finetune", "no/such/recipe.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["linformer", "performer", "bigbird", "lsh"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    settings = {"linformer": {"k": 16}, "bigbird": {"block_size": 4, "random_blocks": 1, "global_blocks": 1},
                "lsh": {"bucket_size": 4}, "performer": {"num_features": 32}}[variant]
    ids, mask = batch_with_padding(length=40)
    grads = []
    for checkpointing in (False, True):
        model = hv.convert(tiny_model("bert"), attention=variant, **settings)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


DISTRIBUTED_JOB = textwrap.dedent("""
    import hashlib, json, os, sys, torch
    from hf_attn_variants.finetune import build_trainer
    from hf_attn_variants.recipes import load_recipe

    recipe = load_recipe(sys.argv[1])
    if recipe.distill:  # the distillation trainer, stage 1, on the same data
        from hf_attn_variants.distill import DistillationTrainer, select_trainable
        from transformers import AutoModelForSequenceClassification
        teacher = AutoModelForSequenceClassification.from_pretrained(recipe.model, num_labels=recipe.num_labels)
        probe = build_trainer(recipe)
        select_trainable(probe.model, 1, "attention")
        trainer = DistillationTrainer(model=probe.model, args=probe.args, train_dataset=probe.train_dataset,
                                      data_collator=probe.data_collator, teacher=teacher, stage=1)
    else:
        trainer = build_trainer(recipe)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    json.dump({"digest": digest, "losses": losses, "world_size": trainer.args.world_size},
              open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
    if torch.distributed.is_initialized():  # a clean teardown: gloo threads left running can abort the exit
        torch.distributed.destroy_process_group()
""")


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517"],
}


@pytest.mark.parametrize("launcher,job", [("torchrun", "finetune"), ("accelerate", "finetune"),
                                          ("accelerate", "distill")])
@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical_and_lowers_the_loss(bert_with_tokenizer, tmp_path, launcher,
                                                                        job):
    train, validation = write_classification_data(tmp_path)
    recipe = write_recipe(
        tmp_path, model=bert_with_tokenizer, attention="linformer", settings={"k": 4},
        task="sequence-classification", num_labels=2, data={"train": train, "max_length": 32},
        output_dir=str(tmp_path / "ddp"),
        training={"num_train_epochs": 3, "per_device_train_batch_size": 4, "learning_rate": 2e-3,
                  "logging_steps": 1, "ddp_backend": "gloo"},
        **({"distill": {"stages": [1]}} if job == "distill" else {}),
    )
    script = tmp_path / "job.py"
    script.write_text(DISTRIBUTED_JOB)
    for _attempt in range(2):  # gloo's teardown aborts now and then (SIGABRT at exit, ~1 run in 10 under load)
        result = subprocess.run([*LAUNCHERS[launcher], str(script), str(recipe), str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
        if result.returncode == 0 or "Signal 6 (SIGABRT)" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"], "the two ranks ended with different weights"
    losses = ranks[0]["losses"]
    assert len(losses) >= 6 and sum(losses[-3:]) < sum(losses[:3])


STEP_JOB = textwrap.dedent("""
    import os, sys, torch
    from hf_attn_variants.finetune import build_trainer
    from hf_attn_variants.recipes import load_recipe

    trainer = build_trainer(load_recipe(sys.argv[1]))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save({"loss": losses[0], "params": params}, os.path.join(sys.argv[2], f"step{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_one_process_with_batch_2b_and_two_with_batch_b_log_the_same_loss_and_take_the_same_step(
    bert_with_tokenizer, tmp_path
):
    """Trainer scales the loss by the process count for models that 'accept loss kwargs'; a classification head
    returns a local mean, so it must not (it declares accepts_loss_kwargs = False). Dropout is off so the two runs
    compute the same thing."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "no_dropout"  # a complete classifier: nothing is drawn at load time in either run
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        bert_with_tokenizer, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bert_with_tokenizer).save_pretrained(folder)
    train, _ = write_classification_data(tmp_path)
    runs = {}
    for processes, batch in ((1, 8), (2, 4)):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        recipe = write_recipe(
            out, model=str(folder), attention="linformer", settings={"k": 4}, task="sequence-classification",
            num_labels=2, data={"train": train, "max_length": 32}, output_dir=str(out / "run"),
            training={"max_steps": 1, "per_device_train_batch_size": batch, "learning_rate": 1e-2,
                      "logging_steps": 1, "max_grad_norm": 1.0, "train_sampling_strategy": "sequential",
                      **({"ddp_backend": "gloo"} if processes == 2 else {})},
        )
        script = out / "job.py"
        script.write_text(STEP_JOB)
        launcher = LAUNCHERS["torchrun"] if processes == 2 else [sys.executable]
        result = subprocess.run([*launcher, str(script), str(recipe), str(out)], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = torch.load(out / "step0.pt")
    assert runs[2]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-4)
    torch.testing.assert_close(runs[2]["params"], runs[1]["params"], atol=1e-5, rtol=1e-4)
