"""Fine-tune all-MiniLM-L6-v2 and its variant conversions on a real long-document task, by k-fold cross-validation.

    python scripts/prepare_data.py                       # once: outputs/data/newsgroups/
    python scripts/finetune_newsgroups.py [--cases full,performer] [--seeds 0 1] [--output docs/finetune.md]

Task: alt.atheism vs sci.space, the 200 posts of the 20 Newsgroups sample in gensim's wheel (100 each; headers,
which name the group, and quoted text removed). Every case runs its recipe ``configs/finetune_newsgroups_<case>.yaml``
unchanged except for the fold's files and the seed, so all cases share the training settings; ``full`` reads 512
tokens (the source's positions), the variants 2048 (positions tiled), ``full-2048`` is exact attention at 2048 (the
reference for what the longer context is worth). Each post is in exactly one validation fold, so a seed's
cross-validated accuracy is over all 200 posts. Runs are appended to outputs/newsgroups/runs.jsonl and skipped when
already there (the script resumes). The fold-0 seed-0 classifiers are kept in outputs/newsgroups/<case>/ for pruning.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer
from transformers import logging as hf_logging

from hf_attn_variants.corpora import load_articles, prepare_newsgroups
from hf_attn_variants.finetune import build_trainer
from hf_attn_variants.recipes import load_recipe

CASES = {  # case -> (recipe, overrides)
    "full": ("configs/finetune_newsgroups_full.yaml", {}),
    "full-2048": ("configs/finetune_newsgroups_full.yaml", {"max_position_embeddings": 2048, "max_length": 2048}),
    "linformer": ("configs/finetune_newsgroups_linformer.yaml", {}),
    "performer": ("configs/finetune_newsgroups_performer.yaml", {}),
    "bigbird": ("configs/finetune_newsgroups_bigbird.yaml", {}),
    "lsh": ("configs/finetune_newsgroups_lsh.yaml", {}),
}
WORK = Path("outputs/newsgroups")
LONG_TOKENS = 512  # posts longer than the source's positions: where a longer context could help


def run_case(case: str, fold: int, seed: int, paths: dict[str, Path]) -> dict:
    """Train one case on one fold with one seed; returns the run's record (accuracy, per-post correctness)."""
    recipe_path, extra = CASES[case]
    import yaml

    raw = yaml.safe_load(Path(recipe_path).read_text())
    data = raw["data"]
    data.update(train=str(paths[f"fold{fold}_train"]), validation=str(paths[f"fold{fold}_validation"]))
    if "max_length" in extra:
        data["max_length"] = extra["max_length"]
    run_dir = WORK / case / f"seed{seed}_fold{fold}"
    # evaluation once, at the end (predict below), rather than every epoch
    overrides = {"data": data, "seed": seed, "output_dir": str(run_dir),
                 "training": {**raw.get("training", {}), "eval_strategy": "no"}}
    if "max_position_embeddings" in extra:
        overrides["max_position_embeddings"] = extra["max_position_embeddings"]
    recipe = load_recipe(recipe_path, overrides)
    start = time.process_time()
    trainer = build_trainer(recipe)
    train_output = trainer.train()
    prediction = trainer.predict(trainer.eval_dataset)
    minutes = (time.process_time() - start) / 60
    correct = (np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).tolist()
    ids = [row["id"] for row in load_articles(paths[f"fold{fold}_validation"])]
    if seed == 0 and fold == 0:
        trainer.save_model(str(WORK / case / "classifier"))
    shutil.rmtree(run_dir)  # the converted copy and Trainer's files: ~90 MB a run
    return {"case": case, "fold": fold, "seed": seed, "accuracy": float(np.mean(correct)),
            "correct": dict(zip(ids, correct, strict=True)), "cpu_minutes": minutes,
            "train_loss": train_output.training_loss}


def summarise(runs: list[dict], long_ids: set[str], total: int) -> list[dict]:
    """Per case with every post predicted (all folds of a seed): the cross-validated accuracy over all posts and
    over the long ones (mean over seeds), the sd of the per-fold accuracies, and each post's correctness (for the
    paired comparison with ``full``)."""
    rows = []
    for case in CASES:
        by_seed: dict[int, dict[str, bool]] = {}
        folds: list[float] = []
        minutes = 0.0
        for run in runs:
            if run["case"] == case:
                by_seed.setdefault(run["seed"], {}).update(run["correct"])
                folds.append(run["accuracy"])
                minutes += run["cpu_minutes"]
        complete = {s: c for s, c in by_seed.items() if len(c) == total}
        if not complete:
            continue
        rows.append({
            "case": case, "seeds": sorted(complete), "folds": folds, "cpu_minutes": minutes,
            "accuracy": statistics.mean(float(np.mean(list(c.values()))) for c in complete.values()),
            "long_accuracy": statistics.mean(float(np.mean([c[i] for i in long_ids])) for c in complete.values()),
            "correct": complete,
        })
    return rows


def mcnemar_p(reference: dict[str, bool], other: dict[str, bool]) -> tuple[int, int, float]:
    """Exact two-sided McNemar test on paired per-post correctness: (reference right only, other right only, p)."""
    only_reference = sum(reference[i] and not other[i] for i in reference)
    only_other = sum(other[i] and not reference[i] for i in reference)
    n = only_reference + only_other
    tail = sum(math.comb(n, i) for i in range(min(only_reference, only_other) + 1)) / 2**n if n else 1.0
    return only_reference, only_other, min(1.0, 2 * tail)


def write_doc(rows: list[dict], posts: list[dict], long_ids: set[str], folds: int, output: Path,
              runs: list[dict]) -> None:
    reads = {"full": "512 (truncated)", "full-2048": "2048 (full attention, tiled positions)"}
    reference = next((r for r in rows if r["case"] == "full"), None)
    lines = [
        "# Fine-tuning on a real long-document task", "",
        "Written by `python scripts/finetune_newsgroups.py --output docs/finetune.md` (recipes "
        "`configs/finetune_newsgroups_<case>.yaml`).", "",
        f"Task: alt.atheism vs sci.space, the {len(posts)} posts of the 20 Newsgroups sample in gensim's wheel "
        "(headers, which name the group, and quoted text removed). Model: all-MiniLM-L6-v2, converted to each "
        f"variant with default settings, then fine-tuned with identical settings. {folds}-fold cross-validation by "
        "post (stratified): every post is predicted once, by a model that never trained on it, so the accuracy is "
        f"over all {len(posts)} posts (mean over seeds when there are several). Fold sd: the spread of the "
        f"{folds} per-fold accuracies (40 posts each). {len(long_ids)} posts are longer than {LONG_TOKENS} tokens "
        "(what `full` cannot read whole); their accuracy has its own column. vs full: exact McNemar test on the "
        "same posts (posts only `full` got right / only the variant got right, two-sided p).", "",
        "**Majority rate: 0.500** (100 posts of each group; every training fold is balanced too).", "",
        "| case | tokens read | accuracy | fold sd | accuracy, posts > 512 tokens | vs full: only full / only it, p "
        "| CPU min (all folds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paired = ""
        if reference is not None and row is not reference:
            seed = reference["seeds"][0]
            if seed in row["correct"]:
                a, b, p_value = mcnemar_p(reference["correct"][seed], row["correct"][seed])
                paired = f"{a} / {b}, p = {p_value:.2f}"
        fold_sd = statistics.stdev(row["folds"]) if len(row["folds"]) > 1 else 0.0
        lines.append(f"| {row['case']} | {reads.get(row['case'], '2048 (tiled positions)')} | "
                     f"{row['accuracy']:.3f} | {fold_sd:.3f} | {row['long_accuracy']:.3f} | {paired} | "
                     f"{row['cpu_minutes']:.1f} |")
    lines += ["", *findings(rows, reference, len(long_ids), runs)]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")


def findings(rows: list[dict], reference: dict | None, long_count: int, runs: list[dict]) -> list[str]:
    """What the table shows, computed from it: against the majority rate, against full, on the long posts, and
    which cases were not run (with the folds a case did finish, beside full's on the same folds)."""
    out = []
    variants = [r for r in rows if reference is not None and r is not reference]
    for row in variants:
        seed = reference["seeds"][0]
        _, _, p_value = mcnemar_p(reference["correct"][seed], row["correct"][seed])
        verdict = "within noise of full" if p_value >= 0.05 else "differs from full"
        out.append(f"- {row['case']}: {row['accuracy']:.3f}, {row['accuracy'] - 0.5:+.3f} over the majority rate; "
                   f"{verdict} (paired p = {p_value:.2f}); on the {long_count} long posts {row['long_accuracy']:.3f} "
                   f"against full's {reference['long_accuracy']:.3f}.")
    missing = [case for case in CASES if case not in {r["case"] for r in rows}]
    for case in missing:
        done = sorted((r["fold"], r["accuracy"]) for r in runs if r["case"] == case)
        if not done:
            out.append(f"- {case}: not run.")
            continue
        full = {r["fold"]: r["accuracy"] for r in runs if r["case"] == "full"}
        folds = ", ".join(f"fold {f}: {a:.3f} (full {full.get(f, float('nan')):.3f})" for f, a in done)
        out.append(f"- {case}: only {len(done)} fold(s) finished, not in the table: {folds}.")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs so far")
    parser.add_argument("--output", type=Path, default=WORK / "finetune.md",
                        help="the table (docs/finetune.md to regenerate the tracked one)")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    paths = prepare_newsgroups(folds=args.folds)
    posts = load_articles(paths["posts"])
    tokenizer = AutoTokenizer.from_pretrained(load_recipe(CASES["full"][0]).model)
    long_ids = {p["id"] for p in posts if len(tokenizer(p["text"])["input_ids"]) > LONG_TOKENS}
    log = WORK / "runs.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["case"], r["fold"], r["seed"]) for r in runs}
    for case in [] if args.report_only else args.cases.split(","):
        for seed in args.seeds:
            for fold in range(args.folds):
                if (case, fold, seed) in done:
                    continue
                run = run_case(case, fold, seed, paths)
                print(f"{case} seed {seed} fold {fold}: accuracy {run['accuracy']:.3f} "
                      f"({run['cpu_minutes']:.1f} CPU-min)", flush=True)
                with log.open("a") as stream:
                    stream.write(json.dumps(run) + "\n")
                runs.append(run)
    write_doc(summarise(runs, long_ids, len(posts)), posts, long_ids, args.folds, args.output, runs)
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
