"""Command line.

``hf-attn-variants convert SRC DST --attention NAME [--set key=value ...] [--max-positions N] [--overwrite]``
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
        **parse_settings(args.set),
    )
    print(f"saved {args.attention} model to {args.destination}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.demo_args)


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
    convert.set_defaults(run=_convert)
    demo = commands.add_parser("demo", help="convert the real all-MiniLM-L6-v2 to every variant; fidelity and speed")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="options of hf_attn_variants.demo (see --help)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line naming the problem and the fix, and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"hf-attn-variants {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
