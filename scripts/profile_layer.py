"""Where one attention layer's forward+backward time goes: torch.profiler's operator table for a benchmark method.

    python scripts/profile_layer.py lsh 16384 [--causal] [--out docs/benchmarks/profiles]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import profile

from hf_attn_variants.bench.methods import HIDDEN, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method")
    parser.add_argument("length", type=int)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--out", default="docs/benchmarks/profiles")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    layer = build(args.method, args.length, args.causal)
    x = torch.randn(1, args.length, HIDDEN, requires_grad=True)
    layer(x).sum().backward()  # warm-up
    with profile() as prof:
        layer(x).sum().backward()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    name = f"{args.method}_{args.length}_{'causal' if args.causal else 'noncausal'}.txt"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(f"forward+backward of one layer, {args.method}, {args.length} tokens, "
                            f"{'causal' if args.causal else 'non-causal'}, {torch.get_num_threads()} threads\n\n"
                            + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
