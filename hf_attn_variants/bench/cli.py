"""``hf-attn-variants bench``: the one-layer suite (default), ``--models``, ``--decode``; ``--single`` runs one
configuration (what the suite starts in a process of its own)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .layers import finish, run_all
from .methods import ALL_METHODS, LENGTHS
from .report import plot, render, report

DESCRIPTION = """Benchmark one attention layer (Q/K/V/O projections + attention) against SDPA, the peers and the
FLOP floor. Each (method, length, causal, mode) runs in its own process (so peak memory is its own): a warm-up,
then the median of the timed runs filling --min-seconds (torch.utils.benchmark's Timer); peak memory is the growth
of the process's max RSS over the run. The floor is the method's FLOPs divided by this machine's measured fp32
matmul throughput (measured in the same run)."""


def main(argv=None) -> int:
    """CLI: ``hf-attn-variants bench [--quick] [--lengths ...] [--methods ...] [--out docs/benchmarks]``;
    ``bench --decode ...`` runs the decoding benchmark (hf_attn_variants.bench.decode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--decode" in argv:
        from .decode import main as decode_main

        return decode_main(argv)
    parser = argparse.ArgumentParser(prog="hf-attn-variants bench", description=DESCRIPTION)
    parser.add_argument("--single", nargs=5, metavar=("METHOD", "LENGTH", "CAUSAL", "MODE", "MIN_SECONDS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, forward+backward, 1 run")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="time budget per configuration: runs are repeated (after a warm-up) until it is spent")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--models", action="store_true", help="the model-level table instead of the layer suite")
    parser.add_argument("--from-partial", action="store_true", help="render partial.jsonl of an interrupted run")
    parser.add_argument("--model-length", type=int, default=4096)
    parser.add_argument("--decode", action="store_true",
                        help="decoding benchmark instead: ms/token, cache bytes, prefill (see bench --decode --help)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.single:
        method, length, causal, mode, min_seconds = args.single
        from .timing import run_single

        result = run_single(method, int(length), bool(int(causal)), mode, float(min_seconds))
        print(json.dumps(asdict(result)))
        return 0
    if args.models:
        from .models import model_table

        return model_table(Path(args.out), args.model_length, args.min_seconds, args.timeout)
    if args.from_partial:  # render what an interrupted run measured
        out = Path(args.out)
        rows = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
        gflops = json.loads((out / "machine.json").read_text())["matmul_gflops"]
        rows = finish(rows, gflops, out)
        (out / "results.md").write_text(report(rows, gflops))
        plot(rows, out)
        return 0
    if args.quick:  # a smoke run: no timing claims
        args.lengths, args.min_seconds, args.modes = [256], 0.0, ["forward+backward"]
    causal_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    out = Path(args.out)
    (out / "partial.jsonl").unlink(missing_ok=True)
    rows = run_all(args.methods, args.lengths, args.modes, causal_modes, args.min_seconds, out, args.timeout)
    gflops = json.loads((out / "results.json").read_text())["matmul_gflops"]
    text = render(rows, gflops)
    (out / "results.md").write_text(report(rows, gflops))
    paths = plot(rows, out) if not args.quick else []
    print(text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + "".join(f", {p}" for p in paths))
    return 0
