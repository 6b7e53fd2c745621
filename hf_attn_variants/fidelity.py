"""``hf-attn-variants evaluate SOURCE CONVERTED``: fidelity of a converted model to its source, by input length.

Encoders: mean cosine of mean-pooled embeddings to the reference. Decoders: mean next-token KL(reference ||
converted) per real token and the perplexity ratio (converted / reference) on the same text. At lengths beyond
the source's learned positions the reference is the source converted to ``full`` with the converted model's
extended positions (the same weights, exact attention). Output: a markdown table, a JSON file, a PNG plot (when
matplotlib is installed), and the numbers recorded on the converted model's card.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers import logging as hf_logging

from .evaluation import embedding_cosine

DEFAULT_LENGTHS = (128, 512, 2048, 4096)


def default_texts() -> tuple[list[str], str]:
    """Long evaluation texts: the held-out Wikipedia articles when prepared (outputs/data/wiki), else the shipped
    held-out Wikipedia passages joined per article. Returns (texts, description)."""
    from .corpora import DEFAULT_CACHE, load_articles

    prepared = Path(DEFAULT_CACHE) / "wiki" / "eval.jsonl"
    if prepared.exists():
        return [a["text"] for a in load_articles(prepared)], f"held-out Wikipedia articles ({prepared})"
    shipped = Path(__file__).resolve().parent.parent / "configs" / "data" / "wiki_passages_eval.jsonl"
    by_title: dict[str, list[str]] = {}
    for row in load_articles(shipped):
        by_title.setdefault(row["title"], []).append(row["text"])
    return [" ".join(parts) for parts in by_title.values()], f"held-out Wikipedia passages ({shipped.name})"


def token_windows(tokenizer, texts: list[str], length: int, count: int) -> torch.Tensor:
    """Up to ``count`` windows of exactly ``length`` tokens [n, length] (special tokens included), cut from the
    texts in order; texts shorter than a window are joined with the next ones."""
    bracket = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None  # BERT-style [CLS] .. [SEP]
    body = length - (2 if bracket else 0)
    stream: list[int] = []
    windows = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(stream) >= body and len(windows) < count:
            chunk, stream = stream[:body], stream[body:]
            windows.append([tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id] if bracket else chunk)
        if len(windows) >= count:
            break
    if not windows:
        raise ValueError(f"the texts hold fewer than {length} tokens; pass longer texts (--texts FILE).")
    return torch.tensor(windows)


@torch.no_grad()
def pooled(model, ids: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """Mean-pooled last hidden states [n, hidden] of unpadded windows ids [n, length]."""
    base = model.base_model if hasattr(model, "base_model") else model
    return torch.cat([base(input_ids=ids[lo : lo + batch_size]).last_hidden_state.mean(1)
                      for lo in range(0, len(ids), batch_size)])


@torch.no_grad()
def decoder_scores(reference, candidate, ids: torch.Tensor, batch_size: int = 1) -> tuple[float, float]:
    """(mean next-token KL(reference || candidate) in nats, perplexity ratio candidate / reference)."""
    kl_sum, nll_ref, nll_cand, tokens = 0.0, 0.0, 0.0, 0
    for lo in range(0, len(ids), batch_size):
        batch = ids[lo : lo + batch_size]
        ref = F.log_softmax(reference(batch).logits[:, :-1].float(), -1)
        cand = F.log_softmax(candidate(batch).logits[:, :-1].float(), -1)
        target = batch[:, 1:, None]
        kl_sum += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
        nll_ref -= ref.gather(-1, target).sum().item()
        nll_cand -= cand.gather(-1, target).sum().item()
        tokens += target.numel()
    return kl_sum / tokens, math.exp((nll_cand - nll_ref) / tokens)


def evaluate_fidelity(source: str, converted: str, lengths=DEFAULT_LENGTHS, texts: list[str] | None = None,
                      count: int = 8) -> dict[str, Any]:
    """Fidelity by length (see the module docstring). Returns {"kind", "texts", "rows": [{length, reference,
    windows, metric values}]}."""
    from .conversion import convert, usable_positions

    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(converted)
    if not hasattr(config, "attention_type"):
        raise ValueError(f"{converted} is not an hf_attn_variants model (no attention_type in its config); "
                         "pass the converted folder second.")
    decoder = config.is_causal_family()
    auto = AutoModelForCausalLM if decoder else AutoModel
    tokenizer = AutoTokenizer.from_pretrained(converted)
    description = "given texts"
    if texts is None:
        texts, description = default_texts()
    candidate = auto.from_pretrained(converted).eval()
    source_model = auto.from_pretrained(source).eval()
    limit = usable_positions(source_model.config)
    extended = None
    rows = []
    for length in lengths:
        if length > usable_positions(config):
            raise ValueError(f"length {length} exceeds the converted model's {usable_positions(config)} positions; "
                             "drop it from --lengths or convert with a larger max_position_embeddings.")
        reference, reference_name = source_model, "source"
        if length > limit:
            if extended is None:
                positions = config.max_position_embeddings
                extended = convert(source_model, attention="full", max_position_embeddings=positions).eval()
            reference, reference_name = extended, "full, extended positions"
        ids = token_windows(tokenizer, texts, length, count)
        row = {"length": length, "windows": len(ids), "reference": reference_name}
        if decoder:
            row["next_token_kl"], row["perplexity_ratio"] = decoder_scores(reference, candidate, ids)
        else:
            row["cosine"] = embedding_cosine(pooled(reference, ids), pooled(candidate, ids)).mean().item()
        rows.append(row)
    return {"kind": "decoder" if decoder else "encoder", "texts": description, "source": str(source),
            "converted": str(converted), "attention": config.attention_type, "rows": rows}


def render_table(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    if report["kind"] == "decoder":
        head = "| tokens | windows | reference | next-token KL (nats) | perplexity ratio |\n|---|---|---|---|---|\n"
        body = "".join(f"| {r['length']} | {r['windows']} | {r['reference']} | {r['next_token_kl']:.4f} | "
                       f"{r['perplexity_ratio']:.4f} |\n" for r in report["rows"])
    else:
        head = "| tokens | windows | reference | embedding cosine |\n|---|---|---|---|\n"
        body = "".join(f"| {r['length']} | {r['windows']} | {r['reference']} | {r['cosine']:.4f} |\n"
                       for r in report["rows"])
    return (f"Fidelity of `{report['converted']}` ({report['attention']}) to `{report['source']}` on "
            f"{report['texts']}.\n\n" + head + body)


def save_report(report: dict[str, Any], output: str | Path) -> list[Path]:
    """Write fidelity.md, fidelity.json and (with matplotlib) fidelity.png into ``output``; returns the paths."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "fidelity.md", folder / "fidelity.json"]
    paths[0].write_text(render_table(report))
    paths[1].write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    key = "perplexity_ratio" if report["kind"] == "decoder" else "cosine"
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot([r["length"] for r in report["rows"]], [r[key] for r in report["rows"]], marker="o")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("input tokens")
    axis.set_ylabel(key.replace("_", " "))
    axis.set_title(f"{report['attention']}: fidelity by length")
    figure.tight_layout()
    figure.savefig(folder / "fidelity.png", dpi=120)
    plt.close(figure)
    return [*paths, folder / "fidelity.png"]


def record_on_card(report: dict[str, Any]) -> None:
    """Add the report's numbers to the converted model's card as evaluation results."""
    from .hub import write_model_card

    folder = report["converted"]
    config = AutoConfig.from_pretrained(folder)
    metric = "perplexity_ratio" if report["kind"] == "decoder" else "cosine"
    results = [{"task_type": "feature-extraction" if report["kind"] == "encoder" else "text-generation",
                "task_name": f"fidelity to the source at {r['length']} tokens", "dataset_type": "text",
                "dataset_name": report["texts"], "metric_type": f"{metric}_to_source_{r['length']}",
                "metric_value": round(r[metric], 4)} for r in report["rows"]]
    architecture = (config.architectures or ["model"])[0]
    lengths = [r["length"] for r in report["rows"]]
    write_model_card(folder, config, architecture, results=results,
                     history=[f"fidelity measured by `hf-attn-variants evaluate` at {lengths} tokens"])
