"""Fine-tune a (converted) model with transformers' Trainer from a YAML recipe; runs unchanged under torchrun or
``accelerate launch`` (several processes, gloo on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from .recipes import Recipe

AUTO_CLASS = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "masked-lm": AutoModelForMaskedLM,
    "causal-lm": AutoModelForCausalLM,
    "feature-extraction": AutoModel,
}
METRICS_DIR = Path(__file__).parent / "metrics"


def prepare_model_folder(recipe: Recipe) -> str:
    """The folder to fine-tune from: ``recipe.model`` itself, or its conversion (done once, on the main process,
    into output_dir/converted) when the recipe names an attention variant."""
    if recipe.attention is None:
        return recipe.model
    from accelerate import PartialState

    from .conversion import convert

    folder = Path(model_folder(recipe))
    # The others wait at a barrier, then find the folder written. cpu as Trainer's use_cpu below: without it a
    # CPU-only torchrun job looks like one process to accelerate.
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        if not (folder / "config.json").exists():
            convert(recipe.model, attention=recipe.attention, output_dir=folder, seed=recipe.seed,
                    max_position_embeddings=recipe.max_position_embeddings, **recipe.settings)
    return str(folder)


def model_folder(recipe: Recipe) -> str:
    """Where the recipe's model is read from (its conversion's folder when it names a variant); no side effects."""
    return recipe.model if recipe.attention is None else str(Path(recipe.output_dir) / "converted")


def load_text_datasets(recipe: Recipe):
    """A DatasetDict with 'train' (and 'validation' when given) from local files or the Hub."""
    from datasets import load_dataset

    spec = recipe.data
    if spec.hub_name:
        data = load_dataset(spec.hub_name, spec.hub_config)
    else:
        files = {split: path for split, path in (("train", spec.train), ("validation", spec.validation)) if path}
        if not files:
            raise ValueError("the recipe's data needs train (and optionally validation) files or a hub_name.")
        for path in files.values():
            if not Path(path).exists():
                hint = (" Prepare the data first: python scripts/prepare_data.py"
                        if any(part in str(path) for part in ("data/wiki", "data/newsgroups")) else "")
                raise FileNotFoundError(f"data file {path} does not exist.{hint}")
        suffix = Path(next(iter(files.values()))).suffix.lstrip(".")
        builder = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}.get(suffix)
        if builder is None:
            raise ValueError(f"data files must be .csv, .json, .jsonl or .txt, got .{suffix}.")
        data = load_dataset(builder, data_files=files)
    for split, limit in (("train", spec.max_train_samples), ("validation", spec.max_eval_samples)):
        if limit and split in data:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    return data


def tokenize(recipe: Recipe, data, tokenizer):
    """Tokenised datasets and the matching data collator for the recipe's task."""
    spec = recipe.data
    task = recipe.task

    def encode(batch):
        if task == "token-classification":
            encoded = tokenizer(batch[spec.text_column], is_split_into_words=True, truncation=True,
                                max_length=spec.max_length)
            encoded["labels"] = [
                [labels[w] if w is not None else -100 for w in encoded.word_ids(i)]
                for i, labels in enumerate(batch[spec.label_column])
            ]
            return encoded
        encoded = tokenizer(batch[spec.text_column], truncation=True, max_length=spec.max_length)
        if task == "sequence-classification":
            encoded["labels"] = batch[spec.label_column]
        return encoded

    columns = data["train"].column_names
    tokenized = data.map(encode, batched=True, remove_columns=columns)
    if task in ("sequence-classification", "feature-extraction"):
        collator = DataCollatorWithPadding(tokenizer)
    elif task == "token-classification":
        collator = DataCollatorForTokenClassification(tokenizer)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=task == "masked-lm", seed=recipe.seed)
    return tokenized, collator


def metric_function(recipe: Recipe):
    """compute_metrics for Trainer from the recipe's metric names, loaded offline from the shipped scripts."""
    if not recipe.metrics:
        return None
    import evaluate

    metrics = []
    for name in recipe.metrics:
        local = METRICS_DIR / name
        if not local.exists():
            shipped = sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir())
            raise ValueError(f"metric {name!r} is not shipped; available: {shipped}.")
        metrics.append(evaluate.load(str(local)))

    def compute(prediction):
        logits, labels = prediction
        predictions = np.argmax(logits, axis=-1)
        keep = labels != -100
        results = {}
        for metric in metrics:
            results.update(metric.compute(predictions=predictions[keep].tolist(), references=labels[keep].tolist()))
        return results

    return compute


def build_trainer(recipe: Recipe, trainer_class: type[Trainer] = Trainer, **trainer_kwargs: Any) -> Trainer:
    """The Trainer for a recipe: model (converted if asked, LoRA if asked), tokenised data, metrics, arguments."""
    folder = prepare_model_folder(recipe)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model_kwargs = {"num_labels": recipe.num_labels} if recipe.num_labels else {}
    model = AUTO_CLASS[recipe.task].from_pretrained(folder, **model_kwargs)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.lora:
        from .lora import add_lora

        model = add_lora(model, **recipe.lora)
    data = load_text_datasets(recipe)
    tokenized, collator = tokenize(recipe, data, tokenizer)
    arguments = {
        "output_dir": recipe.output_dir, "report_to": [], "seed": recipe.seed, "use_cpu": not torch.cuda.is_available(),
        "eval_strategy": "epoch" if "validation" in tokenized else "no", "save_strategy": "no", "logging_steps": 10,
        **recipe.training,
    }
    return trainer_class(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=metric_function(recipe),
        **trainer_kwargs,
    )


def save_result(recipe: Recipe, trainer: Trainer, metrics: dict[str, float], history_line: str) -> str:
    """Save the final model (LoRA merged) with its tokenizer to output_dir/final and update its model card."""
    from .hub import read_facts, write_model_card

    final = Path(recipe.output_dir) / "final"
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(final)
        trainer.processing_class.save_pretrained(final)
        source_facts = read_facts(model_folder(recipe))
        results = [
            {"task_type": recipe.task, "task_name": recipe.task, "dataset_type": "local",
             "dataset_name": recipe.data.hub_name or Path(recipe.data.validation or recipe.data.train or "").name,
             "metric_type": key.removeprefix("eval_"), "metric_value": float(value), "dataset_split": "validation"}
            for key, value in metrics.items()
            if key.startswith("eval_") and key.removeprefix("eval_") in {*recipe.metrics, "loss"}
        ]
        write_model_card(final, model.config, type(model).__name__, base_model=source_facts.get("base_model"),
                         license=source_facts.get("license"), results=results,
                         history=source_facts.get("history", []) + [history_line])
    return str(final)


def run_finetune(recipe: Recipe) -> dict[str, float]:
    """Train, evaluate and save; returns the training and evaluation metrics."""
    trainer = build_trainer(recipe)
    train_output = trainer.train()
    metrics = dict(train_output.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    save_result(recipe, trainer, metrics, f"fine-tuned on {recipe.task} for {trainer.state.global_step} steps "
                f"({trainer.args.world_size} process(es))")
    return metrics
