"""Command line.

``hf-attn-variants convert SRC DST --attention NAME [--set key=value ...] [--max-positions N] [--overwrite]``
``hf-attn-variants finetune RECIPE.yaml [--output-dir DIR]``
``hf-attn-variants distill RECIPE.yaml [--output-dir DIR]``
``hf-attn-variants prune SRC DST [--heads 0.25] [--ffn 0.25] [--magnitude 0.5] [--data FILE]``
``hf-attn-variants evaluate SOURCE CONVERTED [--lengths 128,512,2048,4096] [--texts FILE] [--output DIR]``
``hf-attn-variants push FOLDER --repo-id ORG/NAME [--private] [--dry-run]``
``hf-attn-variants bench [--quick] [--lengths N ...] [--methods NAME ...]``
``hf-attn-variants demo [--sentences N] [--passages N] [--length N]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .modeling import VARIANTS


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=128", "sharing=kv"]`` -> ``{"k": 128, "sharing": "kv"}`` (values parsed as YAML scalars)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r} (e.g. --set k=128).")
        settings[key.strip()] = yaml.safe_load(raw) if raw else None
    return settings


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    convert(
        args.source,
        attention=args.attention,
        output_dir=args.destination,
        max_position_embeddings=args.max_positions,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
        base_model=args.base_model,
        **parse_settings(args.set),
    )
    print(f"saved {args.attention} model to {args.destination}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import PushError, push

    try:
        plan = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    except PushError as err:
        raise ValueError(str(err)) from None
    if args.dry_run:
        print("dry run: nothing was uploaded; this commit would be sent:")
        print(plan.describe())
    else:
        print(f"uploaded {len(plan.operations)} files to https://huggingface.co/{args.repo_id}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import run_finetune
    from .recipes import load_recipe

    overrides = {"output_dir": args.output_dir} if args.output_dir else None
    metrics = run_finetune(load_recipe(args.recipe, overrides))
    print(yaml.safe_dump({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from .distill import run_distill
    from .recipes import load_recipe

    overrides = {"output_dir": args.output_dir} if args.output_dir else None
    metrics = run_distill(load_recipe(args.recipe, overrides))
    print(yaml.safe_dump({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .prune import run_prune

    texts, labels = None, None
    if args.data and args.data.endswith(".csv"):  # text,label columns: labelled data for a classifier
        import csv

        with open(args.data, newline="") as f:
            rows = list(csv.DictReader(f))
        texts, labels = [r["text"] for r in rows], [int(r["label"]) for r in rows]
    elif args.data:
        with open(args.data) as f:
            texts = [line.strip() for line in f if line.strip()]
    report = run_prune(args.source, args.destination, head_fraction=args.heads, ffn_fraction=args.ffn,
                       magnitude=args.magnitude, texts=texts, labels=labels, overwrite=args.overwrite)
    print(yaml.safe_dump(report, sort_keys=False))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .fidelity import evaluate_fidelity, record_on_card, render_table, save_report

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths expects comma-separated integers, got {args.lengths!r}") from None
    texts = None
    if args.texts:
        with open(args.texts) as handle:
            texts = [line.strip() for line in handle if line.strip()]
    report = evaluate_fidelity(args.source, args.converted, lengths, texts, count=args.windows)
    print(render_table(report))
    for path in save_report(report, args.output):
        print(f"wrote {path}")
    if not args.no_card:
        record_on_card(report)
        print(f"recorded on the card of {args.converted}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.cli import main as bench_main

    return bench_main(args.extra)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.extra)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per workflow."""
    parser = argparse.ArgumentParser(prog="hf-attn-variants", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a checkpoint to an attention variant")
    convert.add_argument("source", help="model folder (or Hub id when online)")
    convert.add_argument("destination", help="output folder (written atomically)")
    convert.add_argument("--attention", required=True, choices=sorted(VARIANTS), help="attention variant")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="variant setting")
    convert.add_argument("--max-positions", type=int, default=None, help="lengthen learned positions to N")
    convert.add_argument("--seed", type=int, default=0, help="seed of random features/rotations/blocks")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.add_argument("--base-model", default=None, help="name of the source on the model card (e.g. a Hub id)")
    convert.set_defaults(run=_convert)
    finetune = commands.add_parser("finetune", help="fine-tune with Trainer from a YAML recipe (configs/)")
    finetune.add_argument("recipe", help="YAML recipe")
    finetune.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    finetune.set_defaults(run=_finetune)
    distill = commands.add_parser("distill", help="distil a converted model from the original (YAML recipe)")
    distill.add_argument("recipe", help="YAML recipe with a distill section")
    distill.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    distill.set_defaults(run=_distill)
    prune = commands.add_parser("prune", help="remove unimportant attention heads and FFN neurons")
    prune.add_argument("source", help="saved hf_attn_variants model folder")
    prune.add_argument("destination", help="output folder (written atomically)")
    prune.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads to remove")
    prune.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons to remove per layer")
    prune.add_argument("--magnitude", type=float, default=0.0, help="then zero this fraction of each matrix")
    prune.add_argument("--data", default=None,
                       help="text file (one example per line), or a csv with text,label for a classifier")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.set_defaults(run=_prune)
    evaluate = commands.add_parser("evaluate", help="fidelity of a converted model to its source, by input length")
    evaluate.add_argument("source", help="the original model folder")
    evaluate.add_argument("converted", help="the converted (variant) model folder")
    evaluate.add_argument("--lengths", default="128,512,2048,4096", help="comma-separated input lengths in tokens")
    evaluate.add_argument("--texts", default=None, help="text file, one document a line (default: held-out Wikipedia)")
    evaluate.add_argument("--windows", type=int, default=8, help="windows of text per length")
    evaluate.add_argument("--output", default="outputs/evaluate", help="folder for fidelity.md/.json/.png")
    evaluate.add_argument("--no-card", action="store_true", help="do not record the numbers on the model card")
    evaluate.set_defaults(run=_evaluate)
    push = commands.add_parser("push", help="upload a saved model folder to the Hugging Face Hub")
    push.add_argument("folder", help="saved model folder")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--dry-run", action="store_true", help="list the files and commit; touch no network")
    push.set_defaults(run=_push)
    # bench and demo have parsers of their own: --help and every option go to them (add_help=False here).
    bench = commands.add_parser("bench", add_help=False,
                                help="benchmark one attention layer against SDPA, peers and the floor (--decode: "
                                     "decoding); bench --help lists the options")
    bench.set_defaults(run=_bench, passthrough=True)
    demo = commands.add_parser("demo", add_help=False,
                               help="convert the real all-MiniLM-L6-v2 to every variant; fidelity and speed")
    demo.set_defaults(run=_demo, passthrough=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line naming the problem and the fix, and exit with status 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # bench and demo pass their options on to their own parsers
    try:
        return args.run(args)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"hf-attn-variants {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
