"""The ceiling of any sparse attention pattern on the real all-MiniLM-L6-v2: each query attends exactly its own
top-k keys (chosen with the full N x N scores, which no sparse variant can afford), on held-out Wikipedia.

    python scripts/sparse_ceiling.py [--ks 64,128,192,256] [--output docs/fidelity_sparse_ceiling.md]

If even the best k keys per query leave the pooled embedding below a target, no choice of blocks or buckets with
k keys per query reaches it: what is left must come from more keys or from a learned/low-rank part.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers import logging as hf_logging
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_attn_variants as hv
from hf_attn_variants.corpora import load_articles, prepare_wikipedia, word_passages
from hf_attn_variants.demo import minilm_path
from hf_attn_variants.evaluation import embedding_cosine, mean_pooled_embeddings, retrieval_agreement

KEYS = {"k": 128}  # keys per query of the oracle (set before each run)


def top_k_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax over each query's ``KEYS['k']`` highest-scoring allowed keys: q/k/v [B, H, L, D] -> [B, L, H, D]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:  # sdpa_mask: bool, True = may attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    if scores.shape[-1] > KEYS["k"]:
        threshold = scores.topk(KEYS["k"], dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).contiguous(), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="64,128,192,256")
    parser.add_argument("--eval-passages", type=int, default=48)
    parser.add_argument("--output", default="outputs/fidelity_sparse_ceiling.md")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    from layerwise_fidelity import spread  # the same 48 held-out passages as docs/fidelity_encoder.md

    AttentionInterface.register("top_k_oracle", top_k_attention)
    AttentionMaskInterface.register("top_k_oracle", sdpa_mask)
    passages = spread(word_passages, load_articles(prepare_wikipedia()["eval"]), args.eval_passages)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    reference = mean_pooled_embeddings(teacher, tokenizer, passages, max_length=512, batch_size=8)
    oracle = hv.convert(teacher, attention="full").eval()
    oracle.set_attn_implementation("top_k_oracle")
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        KEYS["k"] = k
        candidate = mean_pooled_embeddings(oracle, tokenizer, passages, max_length=512, batch_size=8)
        cosine = embedding_cosine(reference, candidate).mean().item()
        rows.append((k, cosine, retrieval_agreement(reference, candidate)))
        print(f"top {k}: cosine {rows[-1][1]:.4f}, retrieval {rows[-1][2]:.3f}", flush=True)
    lines = [
        "# The ceiling of sparse attention on all-MiniLM-L6-v2",
        "",
        "Written by `python scripts/sparse_ceiling.py`. Each query attends exactly its own top-k keys, chosen from",
        "the full score matrix (an oracle: no sparse variant can afford it). Same metric and text as",
        f"[fidelity_encoder.md](fidelity_encoder.md): {len(passages)} held-out passages of 512 tokens, mean cosine",
        "of mean-pooled embeddings to the original, nearest-neighbour retrieval agreement.",
        "",
        "| keys per query (of 512) | cosine | retrieval agreement |",
        "|---|---|---|",
        *[f"| {k} | {cosine:.4f} | {agreement:.3f} |" for k, cosine, agreement in rows],
    ]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
