"""Model cards and Hub upload for saved variant models.

A saved folder carries ``hf_attn_variants_card.json`` (the facts: base model, licence, variant, settings, results,
history); every workflow updates it and re-renders README.md from the template in ``model_cards/`` with
huggingface_hub's ModelCard/ModelCardData (measured results as model-index eval results).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .modeling import get_variant
from .modeling.families import family_of

FACTS_FILE = "hf_attn_variants_card.json"
CARD_FILE = "README.md"
def read_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """The card facts saved in ``folder`` (empty if none)."""
    path = Path(folder) / FACTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def source_card_facts(source: str | os.PathLike | None) -> dict[str, Any]:
    """base_model and licence of a local source folder, read from its README.md card (offline)."""
    facts: dict[str, Any] = {}
    if source is None:
        return facts
    readme = Path(source) / CARD_FILE
    if readme.exists():
        data = ModelCard.load(readme).data
        facts["license"] = data.license
        previous = read_facts(source)
        facts["base_model"] = previous.get("base_model") or data.base_model
    if not facts.get("base_model"):
        facts["base_model"] = Path(source).name if Path(source).exists() else str(source)
    return facts


def write_model_card(
    folder: str | os.PathLike,
    config: Any,
    architecture: str,
    base_model: str | None = None,
    license: str | None = None,
    source_positions: int | None = None,
    results: list[dict[str, Any]] | None = None,
    history: list[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Record the facts of a saved variant model and (re-)render its README.md; returns the card.

    results: dicts with task_type, task_name, dataset_type, dataset_name, metric_type, metric_value (and optional
    metric_name, dataset_split), appended to any saved ones; history: lines appended to the card's history;
    repo_id: the name the card shows (default: the folder's name).
    """
    facts = read_facts(folder)
    given = {"base_model": base_model, "license": license, "repo_id": repo_id}
    facts.update({k: v for k, v in given.items() if v is not None})
    facts.setdefault("source_positions", source_positions)
    facts["results"] = facts.get("results", []) + list(results or [])
    facts["history"] = facts.get("history", []) + list(history or [])
    Path(folder, FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    card = render_model_card(folder, config, architecture, facts)
    card.save(Path(folder) / CARD_FILE)
    return card


def render_model_card(folder: str | os.PathLike, config: Any, architecture: str, facts: dict[str, Any]) -> ModelCard:
    """The ModelCard for a saved folder from its config and facts (no I/O)."""
    variant = config.attention_type
    family_entry = family_of(config)
    family = family_entry.name
    repo_id = facts.get("repo_id") or Path(folder).name
    eval_results = [EvalResult(**r) for r in facts.get("results", [])]
    card_data = ModelCardData(
        base_model=facts.get("base_model"),
        library_name="transformers",
        license=facts.get("license"),
        tags=["hf-attn-variants", "efficient-attention", f"attention-{variant}", family],
        model_name=repo_id,
        eval_results=eval_results or None,
    )
    template = resources.files("hf_attn_variants.model_cards").joinpath("attention_variant.md")
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(),
        model_name=repo_id,
        repo_id=repo_id,
        base_model=facts.get("base_model"),
        variant=variant,
        variant_summary=get_variant(variant).summary,
        new_state=get_variant(variant).new_state,
        family=family,
        model_type=config.model_type,
        architecture=architecture,
        settings=", ".join(f"`{k}={v}`" for k, v in (config.attention_settings or {}).items()) or "none",
        seed=config.attention_seed,
        max_positions=getattr(config, "max_position_embeddings", None),
        source_positions=facts.get("source_positions"),
        causal=get_variant(variant).causal and family_entry.causal,
        auto_class=(family_entry.head_classes.get(architecture.removeprefix("AttnVariant")) or ("AutoModel",))[0],
        results=eval_results,
        history=facts.get("history", []),
        limitations=get_variant(variant).limitations,
        license=facts.get("license"),
    )


# --- push ------------------------------------------------------------------------------------------------------


class PushError(RuntimeError):
    """Uploading failed for a reason the user can fix (offline, not logged in, no permission)."""


@dataclass
class PushPlan:
    """What a push uploads: the repository, the commit message and one CommitOperationAdd per file."""

    repo_id: str
    private: bool
    commit_message: str
    operations: list[CommitOperationAdd]

    def describe(self) -> str:
        """Human-readable listing: repository, commit message, then each file with its size."""
        lines = [f"repository: {self.repo_id} ({'private' if self.private else 'public'})",
                 f"commit: {self.commit_message}", "files:"]
        for op in self.operations:
            lines.append(f"  {op.path_in_repo}  ({os.path.getsize(op.path_or_fileobj):,} bytes)")
        return "\n".join(lines)


def plan_push(folder: str | os.PathLike, repo_id: str, private: bool = False, commit_message: str | None = None):
    """Check ``folder`` is a complete saved variant model and list the commit that would upload it (no network)."""
    root = Path(folder)
    if not (root / "config.json").exists() or not any(root.glob("*.safetensors")):
        raise PushError(f"{root} is not a saved model folder (config.json and *.safetensors expected); "
                        "save it with model.save_pretrained(folder) or hf-attn-variants convert.")
    if any(root.glob("*.bin")):
        raise PushError(f"{root} contains pickled *.bin weights; remove them (safetensors only are shared).")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise PushError(f"--repo-id {repo_id!r} must look like ORG/NAME.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and "__pycache__" not in p.parts)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(root).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    message = commit_message or f"Upload {root.name} (hf_attn_variants)"
    return PushPlan(repo_id, private, message, operations)


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, dry_run: bool = False,
         token: str | None = None, commit_message: str | None = None) -> PushPlan:
    """Upload a saved folder to the Hub in one commit (``dry_run``: only plan it). Returns the plan.

    Raises PushError with the cause and the fix when offline, unauthenticated or refused.
    """
    plan = plan_push(folder, repo_id, private, commit_message)
    if dry_run:
        return plan
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations=plan.operations, commit_message=plan.commit_message)
    except OfflineModeIsEnabled as err:
        raise PushError("the Hub is unreachable in offline mode (HF_HUB_OFFLINE=1); unset it and retry, or use "
                        "--dry-run to see what would be uploaded.") from err
    except LocalTokenNotFoundError as err:
        raise PushError("not logged in to the Hub: run `hf auth login` or pass a token.") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = "check the token's write permission and the organisation" if status in (401, 403) else "retry later"
        raise PushError(f"the Hub refused the upload ({status}): {hint}.") from err
    except Exception as err:  # DNS failures, refused connections, timeouts (httpx/OS errors)
        raise PushError(f"could not reach the Hub ({type(err).__name__}: {err}); check the network.") from err
    return plan
