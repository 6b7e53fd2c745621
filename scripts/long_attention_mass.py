"""Where the extended `full` model's attention goes at long inputs: the reference that the long-input fidelity
targets compare against.

    python scripts/long_attention_mass.py [--lengths 512 2048] [--windows 4] [--output docs/fidelity_long_attention.md]

The real all-MiniLM-L6-v2 with its 512 learned positions tiled to the longest length (as `convert(...,
max_position_embeddings=N)` does), exact attention, on windows of held-out Wikipedia articles. For each layer, the
share of each query's attention (averaged over queries and heads) that falls on: the first token; keys within 128
positions (what an exact window of 64-128 tokens can cover); keys at the query's own tiled position +-2 in *other*
512-token tiles ("aliases": tiling gives them the same position embedding); everything else (what a linear or
pooled part must carry).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

import hf_attn_variants as hv
from hf_attn_variants.corpora import load_articles, prepare_wikipedia, word_passages, words_for_tokens
from hf_attn_variants.demo import minilm_path

TILE, NEAR, ALIAS = 512, 128, 2


def attention_probs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities [H, N, N] for one input (eager attention, so they are returned)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return [a[0] for a in out.attentions]


def mass_shares(probs: torch.Tensor) -> dict[str, float]:
    """Shares of attention mass [H, N, N] by key class (first token, near, aliases, rest), mean over heads/queries."""
    n = probs.shape[-1]
    pos = torch.arange(n)
    distance = (pos[None, :] - pos[:, None]).abs()  # [N, N]
    first = torch.zeros(n, n, dtype=torch.bool)
    first[:, 0] = True
    near = (distance <= NEAR) & ~first
    offset = distance % TILE
    alias = ((offset <= ALIAS) | (offset >= TILE - ALIAS)) & (distance > NEAR) & ~first
    rest = ~(first | near | alias)
    return {name: (probs * mask).sum(-1).mean().item()
            for name, mask in (("first", first), ("near", near), ("alias", alias), ("rest", rest))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--output", default="outputs/fidelity_long_attention.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    articles = load_articles(prepare_wikipedia()["eval"])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = hv.convert(minilm_path(), attention="full", max_position_embeddings=max(args.lengths)).eval()
    model.set_attn_implementation("eager")
    rows = []
    for length in args.lengths:
        texts = word_passages(articles, words_for_tokens(length))[: args.windows]
        per_layer: list[dict[str, float]] = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=length)["input_ids"]
            for layer, probs in enumerate(attention_probs(model, ids)):
                shares = mass_shares(probs)
                if len(per_layer) <= layer:
                    per_layer.append(dict.fromkeys(shares, 0.0))
                for name, value in shares.items():
                    per_layer[layer][name] += value / len(texts)
        for layer, shares in enumerate(per_layer):
            rows.append((length, layer, shares))
            print(length, layer, {k: round(v, 3) for k, v in shares.items()}, flush=True)
    lines = [
        "# Where the extended model's attention goes (the long-input reference)",
        "",
        f"Written by `python scripts/long_attention_mass.py`. {args.windows} windows of held-out Wikipedia "
        "articles per length; the real all-MiniLM-L6-v2 with its 512 positions tiled, exact attention. Shares of "
        f"attention mass by key: the first token; keys within {NEAR} positions; aliases (the query's tiled position "
        f"+-{ALIAS} in another 512-token tile, beyond {NEAR}); the rest.",
        "",
        "| tokens | layer | first token | within 128 | aliases in other tiles | rest |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {length} | {layer} | {s['first']:.3f} | {s['near']:.3f} | {s['alias']:.3f} | {s['rest']:.3f} |"
              for length, layer, s in rows]
    with open(args.output, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
