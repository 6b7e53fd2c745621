"""Distil a converted (student) model from its original full-attention (teacher) model with Trainer.

Stage 1, attention transfer (as LoLCATs does): only the attention is trained -- the variant's own learned state
(Linformer projections), plus the attention projections (query/key/value) or LoRA on them -- to match each layer's
self-attention output of the teacher (MSE over real tokens). Stage 2: the whole model (or LoRA) learns to match the
teacher's outputs: KL divergence of temperature-softened logits (models with a head) plus MSE of every hidden state.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer

from .evaluation import pooled_cosine
from .modeling.families import family_of

SHORT_TOKENS = 64  # "short input" length of the non-regression check

ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a (possibly PEFT- or DDP-wrapped) model, in layer order."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)  # DDP and friends
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    family = family_of(base.config)
    return [m for m in base.modules() if family.is_variant_attention(m)]


@contextmanager
def capture_attention_outputs(model: torch.nn.Module):
    """Collect each self-attention module's output [B, L, hidden] during forwards inside the block."""
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
               for m in attention_modules(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def select_trainable(model: torch.nn.Module, stage: int, train: str) -> int:
    """Set requires_grad for a stage; returns the number of trainable parameters.

    stage 1: the variant's state, plus the attention projections when ``train`` is 'attention' (LoRA parameters,
    when the model has them, stay trainable). stage 2: everything ('all') or LoRA + variant state ('lora').
    """
    count = 0
    for name, param in model.named_parameters():
        is_lora = "lora_" in name
        in_state = ".attn_variant." in name
        is_projection = name.split(".")[-2] in ATTENTION_PROJECTIONS  # e.g. ...attention.self.query.weight
        if stage == 1:
            wanted = in_state or is_lora or (train == "attention" and is_projection)
        else:
            wanted = train == "all" or is_lora or in_state
        param.requires_grad_(wanted)
        count += param.numel() if wanted else 0
    if count == 0:
        raise ValueError(f"stage {stage} with train={train!r} leaves nothing to train; use train: attention or lora.")
    return count


def _real_token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    squared = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, L)
    if mask is None:
        return squared.mean()
    mask = mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp_min(1)


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, H] -> [B, H], averaged over real tokens."""
    if mask is None:
        return hidden.float().mean(1)
    weights = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)


class DistillationTrainer(Trainer):
    """Trainer whose loss is the distillation loss of ``stage`` against a frozen ``teacher``."""

    def __init__(self, *args: Any, teacher: PreTrainedModel, stage: int = 1, temperature: float = 2.0,
                 kl_weight: float = 1.0, hidden_weight: float = 1.0, cosine_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.stage, self.temperature = stage, temperature
        self.kl_weight, self.hidden_weight, self.cosine_weight = kl_weight, hidden_weight, cosine_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        self.teacher.to(next(model.parameters()).device)
        if self.stage == 1:
            with torch.no_grad(), capture_attention_outputs(self.teacher) as teacher_outputs:
                self.teacher(**inputs)
            with capture_attention_outputs(model) as student_outputs:
                outputs = model(**inputs)
            losses = [_real_token_mse(s, t, mask) for s, t in zip(student_outputs, teacher_outputs, strict=True)]
            loss = torch.stack(losses).mean()
        else:
            with torch.no_grad():
                teacher_out = self.teacher(**inputs, output_hidden_states=True)
            outputs = model(**inputs, output_hidden_states=True)
            hidden = torch.stack([_real_token_mse(s, t, mask) for s, t in
                                  zip(outputs.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)]).mean()
            loss = self.hidden_weight * hidden
            if self.cosine_weight:  # what users measure: the mean-pooled last hidden state's direction
                cosine = F.cosine_similarity(_mean_pooled(outputs.hidden_states[-1], mask),
                                             _mean_pooled(teacher_out.hidden_states[-1], mask), dim=-1)
                loss = loss + self.cosine_weight * (1 - cosine).mean()
            if getattr(outputs, "logits", None) is not None:
                t = self.temperature
                kl = F.kl_div(F.log_softmax(outputs.logits.float() / t, -1), F.log_softmax(
                    teacher_out.logits.float() / t, -1), log_target=True, reduction="none").sum(-1)
                if mask is not None and kl.dim() == 2:
                    kl = (kl * mask).sum() / mask.sum().clamp_min(1)
                loss = loss + self.kl_weight * kl.mean() * t * t
        return (loss, outputs) if return_outputs else loss


def _layerwise_stage(student, teacher, tokenizer, recipe, data, options: dict) -> dict[str, float]:
    """Layer-wise attention transfer (``stages: [layerwise]``): teacher-forced, the variant's own parameters only;
    options ``layerwise: {lr, epochs, batch_size, loss_scale, long_texts, long_length, long_windows}``. Held out:
    the validation texts.

    ``long_texts`` (a jsonl of articles, e.g. outputs/data/wiki/train.jsonl): ``long_windows`` windows of
    ``long_length`` tokens cut from it (batch 1) join every epoch, shuffled in with the short batches; their teacher
    is the source converted to ``full`` with the student's tiled positions (up to the source's own positions, the
    source itself). The student needs ``max_position_embeddings >= long_length`` in the recipe."""
    import random

    from .attention_transfer import LayerwiseTransfer, text_batches

    settings = {"lr": 1e-2, "epochs": 3, "batch_size": 4, "loss_scale": 1000.0, "long_texts": None,
                "long_length": 2048, "long_windows": 0, **options.get("layerwise", {})}
    column, length = recipe.data.text_column, recipe.data.max_length
    train = text_batches(tokenizer, data["train"][column], length, settings["batch_size"])
    split = "validation" if "validation" in data else "train"
    held_out = text_batches(tokenizer, data[split][column], length, settings["batch_size"])
    if settings["long_texts"] and settings["long_windows"]:
        train += long_window_batches(tokenizer, settings["long_texts"], settings["long_length"],
                                     settings["long_windows"])
        teacher = extended_teacher(teacher, student)
    order = random.Random(recipe.seed)

    def epoch() -> list:
        order.shuffle(train)
        return train

    transfer = LayerwiseTransfer(student, teacher, lr=settings["lr"], loss_scale=settings["loss_scale"])
    result = transfer.fit(epoch, held_out, epochs=settings["epochs"])
    return {"layerwise_seconds": result["seconds"], "layerwise_steps": result["steps"],
            "layerwise_loss_before": sum(x for x in result["eval_loss_before"] if x == x),
            "layerwise_loss_after": sum(x for x in result["eval_loss_after"] if x == x)}


def long_window_batches(tokenizer, path: str, length: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of one window of up to ``length`` tokens each (``words_for_tokens``), cut consecutively from
    the articles of a jsonl file ({"text": ...} rows)."""
    from .attention_transfer import text_batches
    from .corpora import load_articles, word_passages, words_for_tokens

    if not Path(path).exists():
        raise FileNotFoundError(f"layerwise long_texts {path} does not exist; run python scripts/prepare_data.py.")
    words = words_for_tokens(length)
    windows = word_passages(load_articles(path), words, count=count)
    if len(windows) < count:
        raise ValueError(f"layerwise long_texts {path} holds only {len(windows)} windows of {words} words; "
                         f"lower long_windows to {len(windows)} or long_length.")
    return text_batches(tokenizer, windows, length, 1)


def extended_teacher(teacher, student):
    """The teacher as a ``full`` model with the student's (tiled) positions, when the student has more positions
    than the teacher; otherwise the teacher itself."""
    from .conversion import convert

    positions = getattr(student.config, "max_position_embeddings", None)
    if positions is None or positions <= getattr(teacher.config, "max_position_embeddings", positions):
        return teacher
    return convert(teacher, attention="full", max_position_embeddings=positions).eval()


@dataclasses.dataclass
class DistillJob:
    """What a distillation run works on, loaded once from its recipe (``load_job``)."""

    recipe: Any
    options: dict  # the recipe's distill section, minus stages and teacher
    stages: list
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: Any
    data: Any  # DatasetDict of texts
    tokenized: Any
    collator: Any
    texts: list[str]  # the texts fidelity is measured on (validation, else train)

    def fidelity(self, max_length: int | None = None) -> float:
        """Mean pooled-embedding cosine of the student to the teacher on ``texts`` cut to ``max_length`` tokens."""
        length = max_length or self.recipe.data.max_length
        cosine = pooled_cosine(self.teacher, self.student.eval(), self.tokenizer, self.texts, max_length=length)
        self.student.train()
        return cosine.mean().item()


def load_job(recipe) -> DistillJob:
    """Student (converted if the recipe names a variant; LoRA if asked), teacher, tokenizer and data."""
    from transformers import AutoTokenizer

    from .finetune import AUTO_CLASS, load_text_datasets, prepare_model_folder, tokenize

    options = dict(recipe.distill or {})
    stages = options.pop("stages", [1, 2])
    folder = prepare_model_folder(recipe)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto = AUTO_CLASS[recipe.task]
    student = auto.from_pretrained(folder)
    teacher = auto.from_pretrained(options.pop("teacher", recipe.model))
    if recipe.lora:
        from .lora import add_lora

        student = add_lora(student, **recipe.lora)
    data = load_text_datasets(recipe)
    tokenized, collator = tokenize(recipe, data, tokenizer)
    texts = data["validation" if "validation" in data else "train"][recipe.data.text_column]
    return DistillJob(recipe, options, stages, student, teacher, tokenizer, data, tokenized, collator, list(texts))


def run_trainer_stage(job: DistillJob, stage: int) -> tuple[Trainer, dict[str, float]]:
    """Stage 1 (attention transfer) or 2 (end to end) with DistillationTrainer; returns the trainer and the
    stage's seconds and first/last losses (means of three logged losses: one batch is noisy)."""
    import time

    from transformers import TrainingArguments

    recipe, options = job.recipe, job.options
    select_trainable(job.student, stage, options.get(f"train_stage{stage}", "attention" if stage == 1 else "all"))
    arguments = {"output_dir": recipe.output_dir, "report_to": [], "seed": recipe.seed, "save_strategy": "no",
                 "use_cpu": not torch.cuda.is_available(), "logging_steps": 10, "remove_unused_columns": False,
                 **recipe.training, **options.get(f"stage{stage}_training", {})}
    trainer = DistillationTrainer(
        model=job.student, args=TrainingArguments(**arguments), train_dataset=job.tokenized["train"],
        data_collator=job.collator, processing_class=job.tokenizer, teacher=job.teacher, stage=stage,
        temperature=options.get("temperature", 2.0), kl_weight=options.get("kl_weight", 1.0),
        hidden_weight=options.get("hidden_weight", 1.0), cosine_weight=options.get("cosine_weight", 0.0),
    )
    start = time.perf_counter()
    trainer.train()
    metrics = {f"stage{stage}_seconds": time.perf_counter() - start}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        span = min(3, len(losses))
        metrics[f"stage{stage}_first_loss"] = sum(losses[:span]) / span
        metrics[f"stage{stage}_last_loss"] = sum(losses[-span:]) / span
    return trainer, metrics


def keep_short_inputs(job: DistillJob, stage, snapshot: dict[str, torch.Tensor], short_before: float,
                      tolerance: float) -> dict[str, float]:
    """The non-regression rule: a stage that lowers the short-input fidelity (where most variants are exact) by
    more than ``tolerance`` is undone (its weights restored from ``snapshot``). Returns the stage's short-input
    fidelity and whether it was undone."""
    short = job.fidelity(SHORT_TOKENS)
    undone = short < short_before - tolerance
    if undone:
        job.student.load_state_dict(snapshot)
    return {f"cosine_short_after_stage{stage}": short, f"stage{stage}_undone": float(undone)}


def save_distilled(job: DistillJob, trainer: Trainer | None, metrics: dict[str, float]) -> None:
    """output_dir/final with the tokenizer and an updated card (through the last trainer when there was one)."""
    from pathlib import Path

    from .finetune import save_result

    recipe = job.recipe
    if trainer is None:
        job.student.save_pretrained(Path(recipe.output_dir) / "final")
        job.tokenizer.save_pretrained(Path(recipe.output_dir) / "final")
        return
    job.student.requires_grad_(True)
    recipe.metrics = [*recipe.metrics, "cosine_to_teacher"]
    save_result(recipe, trainer, {"eval_cosine_to_teacher": metrics["cosine_after"]},
                f"distilled from {Path(str(recipe.model)).name} (stages {job.stages}; cosine to teacher "
                f"{metrics['cosine_before']:.4f} -> {metrics['cosine_after']:.4f})")


def run_distill(recipe) -> dict[str, float]:
    """Distil per the recipe's ``distill`` section; saves output_dir/final (card updated) and returns metrics:
    mean embedding cosine to the teacher on the validation texts (at full length and cut to SHORT_TOKENS) before
    and after each stage, and seconds per stage.

    A variant never ends below where it started on short inputs: a stage that lowers their fidelity by more than
    ``short_tolerance`` (distill option, default 1e-3; null to turn the rule off) is undone."""
    job = load_job(recipe)
    tolerance = job.options.get("short_tolerance", 1e-3)
    metrics = {"cosine_before": job.fidelity(), "cosine_short_before": job.fidelity(SHORT_TOKENS)}
    trainer = None
    for stage in job.stages:
        snapshot = {k: v.detach().clone() for k, v in job.student.state_dict().items()}
        if stage == "layerwise":  # stage 1 by teacher forcing, the variant's own parameters only
            metrics.update(_layerwise_stage(job.student, job.teacher, job.tokenizer, recipe, job.data, job.options))
        else:
            trainer, stage_metrics = run_trainer_stage(job, stage)
            metrics.update(stage_metrics)
        if tolerance is not None:
            metrics.update(keep_short_inputs(job, stage, snapshot, metrics["cosine_short_before"], tolerance))
        metrics[f"cosine_after_stage{stage}"] = job.fidelity()
    metrics["cosine_after"] = metrics[f"cosine_after_stage{job.stages[-1]}"] if job.stages else metrics["cosine_before"]
    metrics["cosine_short_after"] = job.fidelity(SHORT_TOKENS)
    save_distilled(job, trainer, metrics)
    return metrics
