"""Distil all-MiniLM-L6-v2 for every variant with the recipes in configs/ and write docs/distillation.md:
embedding cosine to the original on held-out 512-token passages and short sentences, before and after, and the
CPU time. Usage: python scripts/distill_table.py [VARIANT ...]"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from hf_attn_variants import convert
from hf_attn_variants.distill import run_distill
from hf_attn_variants.evaluation import pooled_cosine
from hf_attn_variants.recipes import load_recipe
from hf_attn_variants.texts import SOURCE, real_sentences

RESULTS = Path("docs/distillation.json")


def sentence_cosine(model, original, tokenizer, sentences):
    return pooled_cosine(original, model, tokenizer, sentences).mean().item()


def main(variants):
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for variant in variants:
        recipe = load_recipe(f"configs/distill_minilm_{variant}.yaml")
        tokenizer = AutoTokenizer.from_pretrained(recipe.model)
        original = AutoModel.from_pretrained(recipe.model).eval()
        sentences = real_sentences(300)
        before = sentence_cosine(convert(recipe.model, attention=variant, **recipe.settings).eval(), original,
                                 tokenizer, sentences)
        cpu = time.process_time()
        metrics = run_distill(recipe)
        cpu = time.process_time() - cpu
        final = AutoModel.from_pretrained(Path(recipe.output_dir) / "final").eval()
        metrics.update(sentences_before=before, sentences_after=sentence_cosine(final, original, tokenizer, sentences),
                       cpu_seconds=cpu, threads=torch.get_num_threads())
        results[variant] = metrics
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(variant, metrics, flush=True)
    lines = ["# Distillation of all-MiniLM-L6-v2 per variant", "",
             f"Mean cosine of mean-pooled embeddings to the original. Passages: 16 held-out 512-token passages; "
             f"sentences: 300 held-out sentences ({SOURCE}). Training: 80 other 512-token passages, recipes "
             "`configs/distill_minilm_<variant>.yaml` (stage 1 attention transfer, stage 2 outputs). CPU time is "
             "process time on this 2-core machine (both stages).", "",
             "| variant | passages before | passages after | sentences before | sentences after | CPU minutes |",
             "|---|---|---|---|---|---|"]
    for variant, m in results.items():
        lines.append(f"| {variant} | {m['cosine_before']:.4f} | {m['cosine_after']:.4f} | "
                     f"{m['sentences_before']:.4f} | {m['sentences_after']:.4f} | {m['cpu_seconds'] / 60:.1f} |")
    Path("docs/distillation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["linformer", "performer", "bigbird", "lsh"])
