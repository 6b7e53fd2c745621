"""Decoding benchmark: ms per generated token, cache bytes and prefill time by context length, per causal variant.

    hf-attn-variants bench --decode [--contexts 1024 4096 16384] [--tokens 64] [--repeats 5] [--out docs/benchmarks]

A Llama-shaped decoder (2 layers, hidden 256, 4 heads, random weights: speed does not depend on them) is
prefilled with the context, then decodes greedily one token at a time through the cache ``generate`` would use:
the Performer's recurrent state cache, BigBird's growing key/value cache (appends without copying the context),
LSH's bucket index (on the same growing cache), and for ``full`` transformers' own ``DynamicCache`` (the ratios are
to it); ``full (growing cache)`` is exact attention on the growing cache. Everything runs in one process, one
variant after another, 2 threads; ms/token is the median over the decoded tokens, each timed alone (after two
warm-up tokens). Each method and context runs ``--repeats`` times from a fresh prefill, the repeats interleaved
across methods; the table gives the median of the repeats, [their range], and the ratio of medians.
The floor row is the same step with attention removed (an attention function that returns its queries, no cache):
what the rest of the model costs per token, which no attention method can go below (the median of ``--repeats``
measurements).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

from ..conversion import convert
from ..modeling import VARIANTS
from ..modeling.decoding_caches import GrowingCache
from ..modeling.modeling_attn_variants import decoding_cache
from .timing import median_of_calls

METHODS = {name: {} for name, variant in VARIANTS.items() if variant.causal}
"""Every variant that decodes (causal), at its default settings."""
FULL_GROWING = "full (growing cache)"
"""Exact attention on BigBird's growing key/value cache: what full costs without transformers' per-step copy."""
CONTEXTS = (1024, 4096, 16384)


def source_decoder(positions: int, **config) -> LlamaForCausalLM:
    """The benchmark's stock Llama (positions covering the longest context)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions, **config)
    return LlamaForCausalLM(config).eval()


def decoder(method: str, positions: int) -> torch.nn.Module:
    """The benchmark's model converted to ``method``."""
    return convert(source_decoder(positions), attention=method, **METHODS[method]).eval()


def _no_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return query.transpose(1, 2), None  # the output of attention's shape, for free


@torch.no_grad()
def step_floor(tokens: int) -> float:
    """ms per decoded token of the benchmark's model with attention removed (no cache, nothing attended)."""
    AttentionInterface.register("bench_no_attention", _no_attention)
    model = source_decoder(64, attn_implementation="bench_no_attention")
    token = torch.zeros(1, 1, dtype=torch.long)
    return median_of_calls(lambda: model(token, use_cache=False), tokens) * 1000


def cache_bytes(cache) -> int:
    """Bytes held by a cache: what each layer reports (recurrent states; growing buffers with their spare capacity),
    else its keys and values (transformers' DynamicLayer)."""
    def layer_bytes(layer) -> int:
        if hasattr(layer, "nbytes"):
            return layer.nbytes()
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)

    return sum(layer_bytes(layer) for layer in cache.layers)


@torch.no_grad()
def measure(model, context: int, tokens: int, cache=None) -> dict[str, float]:
    """Prefill ``context`` random tokens, then decode ``tokens`` greedily; times in ms, cache in bytes."""
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(context))
    cache = decoding_cache(model.config) if cache is None else cache
    cache = DynamicCache(config=model.config) if cache is None else cache
    last = {}

    def prefill():
        last["token"] = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def step():  # one greedy token: the cache grows by one
        last["token"] = model(last["token"], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    gc.collect()  # earlier runs' caches are freed before this one is timed
    start = time.perf_counter()  # once: a second prefill would find the cache already full
    prefill()
    prefill_s = time.perf_counter() - start
    ms_per_token = median_of_calls(step, tokens) * 1000  # (after two warm-up tokens)
    return {"prefill_s": prefill_s, "ms_per_token": ms_per_token, "cache_bytes": cache_bytes(cache)}


def new_cache(method: str):
    """The cache a run decodes with: None lets ``measure`` pick what ``generate`` would."""
    return GrowingCache() if method == FULL_GROWING else None


def summarise(method: str, context: int, measured: list[dict[str, float]]) -> dict:
    """One table row from repeated runs: the median ms/token and prefill, and the ms/token range."""
    ms = sorted(m["ms_per_token"] for m in measured)
    return {"method": method, "context": context, "ms_per_token": statistics.median(ms), "ms_min": ms[0],
            "ms_max": ms[-1], "prefill_s": statistics.median(m["prefill_s"] for m in measured),
            "cache_bytes": measured[-1]["cache_bytes"], "repeats": len(ms)}


def render(rows: list[dict], floor_ms: float | None = None) -> str:
    """Markdown: ms/token (x full), cache MB and prefill seconds per method and context; the floor (attention
    removed) as a last row when given."""
    contexts = sorted({r["context"] for r in rows})
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    lines = ["| method | " + " | ".join(f"{c} ctx: ms/token (× full) · cache MB · prefill s" for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for context in contexts:
            r = next(x for x in rows if x["method"] == method and x["context"] == context)
            ratio = r["ms_per_token"] / full[context]["ms_per_token"] if context in full else float("nan")
            spread = f" [{r['ms_min']:.2f}–{r['ms_max']:.2f}]" if r.get("repeats", 1) > 1 else ""
            cells.append(f"{r['ms_per_token']:.2f}{spread} ({ratio:.2f}×) · {r['cache_bytes'] / 2**20:.2f} · "
                         f"{r['prefill_s']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if floor_ms is not None:
        cells = [f"{floor_ms:.2f} ({floor_ms / full[c]['ms_per_token']:.2f}×) · 0 · –" if c in full else ""
                 for c in contexts]
        lines.append("| floor (attention removed) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["context"])
        contexts = [r["context"] for r in mine]
        axes[0].plot(contexts, [r["ms_per_token"] for r in mine], marker="o", label=method)
        axes[1].plot(contexts, [r["cache_bytes"] / 2**20 for r in mine], marker="o", label=method)
    for axis, label in zip(axes, ("ms per new token", "cache MB"), strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_ylabel(label)
    axes[1].set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-attn-variants bench --decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--methods", nargs="+", default=[*METHODS, FULL_GROWING], choices=[*METHODS, FULL_GROWING])
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per context")
    parser.add_argument("--repeats", type=int, default=5,
                        help="fresh prefills per method and context, interleaved across methods")
    parser.add_argument("--out", default="outputs/benchmarks", help="folder for decode.md/.json/.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = {}
    for method in args.methods:
        models[method] = decoder("full" if method == FULL_GROWING else method, max(args.contexts) + args.tokens)
        measure(models[method], 64, 2, new_cache(method))  # warm-up
    runs = {(method, context): [] for method in args.methods for context in args.contexts}
    for repeat in range(args.repeats):  # interleaved: every method meets the same drift of the machine
        for method, model in models.items():
            for context in args.contexts:
                runs[method, context].append(measure(model, context, args.tokens, new_cache(method)))
                print(json.dumps({"repeat": repeat, "method": method, "context": context,
                                  **runs[method, context][-1]}), flush=True)
    rows = [summarise(method, context, measured) for (method, context), measured in runs.items()]
    floor_ms = statistics.median(step_floor(args.tokens) for _ in range(args.repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"rows": rows, "floor_ms_per_token": floor_ms}, indent=2) + "\n")
    table = render(rows, floor_ms)
    (out / "decode.md").write_text("# Decoding: ms per new token, cache size, prefill\n\n" + __doc__.split("\n\n", 1)[1]
                                   + "\n" + table)
    plot(rows, out / "decode.png")
    print(table)
    return 0
