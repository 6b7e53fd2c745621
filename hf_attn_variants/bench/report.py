"""The one-layer suite's tables (every configuration; the summary against the targets) and plots."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .methods import ALL_METHODS, HEADS, HIDDEN, LENGTHS, PEER_PAIRS, is_ours


def render(rows: list[dict], gflops: float) -> str:
    """Markdown tables, one per (causal, mode): time, x SDPA, x floor, peak memory."""
    lines = [f"Machine: fp32 matmul {gflops:.0f} GFLOP/s, {torch.get_num_threads()} threads. One layer, hidden "
             f"{HIDDEN}, {HEADS} heads, batch 1, fp32, dropout 0; median of the timed runs after a warm-up; peak "
             "memory = growth of max RSS in the configuration's own process.", ""]
    for causal in (False, True):
        for mode in ("forward", "forward+backward"):
            subset = [r for r in rows if r["causal"] == causal and r["mode"] == mode]
            if not subset:
                continue
            lines += [f"### {'causal' if causal else 'non-causal'}, {mode}", "",
                      "| method | tokens | seconds | × SDPA | × floor | peak MB |", "|---|---|---|---|---|---|"]
            for r in sorted(subset, key=lambda r: (r["method"], r["length"])):
                if r["seconds"] is None:
                    lines.append(f"| {r['method']} | {r['length']} | failed: {r['error'][:60]} | | | |")
                    continue
                lines.append(f"| {r['method']} | {r['length']} | {r['seconds']:.3f} | {r['vs_sdpa']:.2f} | "
                             f"{r['vs_floor']:.2f} | {r['peak_mb']:.0f} |")
            lines.append("")
    return "\n".join(lines)


# The targets (forward+backward, one BERT-base-shaped layer).
SDPA_TARGET_8K, FLOOR_TARGET, MEMORY_TARGET_MB, SLOPE_TARGET = 0.30, 1.6, 1500, 1.1
PEER_LENGTHS = (4096, 8192, 16384)


def measured(rows: list[dict], method: str, length: int, causal: bool, mode: str = "forward+backward") -> dict | None:
    """The row of one configuration, if it ran."""
    return next((r for r in rows if r["method"] == method and r["length"] == length and r["causal"] == causal
                 and r["mode"] == mode and r["seconds"] is not None), None)


def summary(rows: list[dict]) -> str:
    """Forward+backward at the longest lengths against the targets: x SDPA at 8192 and 16384, x floor, peak memory,
    its log-log slope between 4096 and 16384 tokens, and the crossover (the shortest length from which on it beats
    SDPA)."""
    lines = [f"| method | causal | × SDPA at 8192 (≤ {SDPA_TARGET_8K:.2f}) / 16384 | × floor at 8192 / 16384 "
             f"(≤ {FLOOR_TARGET} at 16384) | peak MB at 16384 (≤ {MEMORY_TARGET_MB}) | memory slope 4096→16384 "
             f"(≤ {SLOPE_TARGET}) | beats SDPA from |",
             "|---|---|---|---|---|---|---|"]
    methods = [m for m in ALL_METHODS if m != "full"]
    for causal in (False, True):
        for method in methods:
            longest, middle = measured(rows, method, 16384, causal), measured(rows, method, 8192, causal)
            short = measured(rows, method, 4096, causal)
            if longest is None:
                continue
            ratios = " / ".join(f"{r['vs_sdpa']:.2f}" for r in (middle, longest) if r)
            floors = " / ".join(f"{r['vs_floor']:.2f}" for r in (middle, longest) if r)
            slope = (math.log(longest["peak_mb"] / short["peak_mb"]) / math.log(4)
                     if short and short["peak_mb"] > 0 and longest["peak_mb"] > 0 else float("nan"))
            crossover = None  # the shortest length from which on every measured length beats SDPA
            for length in sorted(LENGTHS, reverse=True):
                row = measured(rows, method, length, causal)
                if row is None or row["vs_sdpa"] >= 1:
                    break
                crossover = length
            lines.append(f"| {method} | {'yes' if causal else 'no'} | {ratios} | {floors} | "
                         f"{longest['peak_mb']:.0f} | {slope:.2f} | {crossover or 'none'} |")
    return "\n".join(lines)


def peers(rows: list[dict]) -> str:
    """Each of our methods against its peer at the same settings: time ratio (ours / peer; below 1, ours is
    faster) and peak MB, forward+backward, at 4096-16384 tokens."""
    lines = ["| ours | peer | causal | " + " | ".join(f"{n}: ours / peer s (ratio)" for n in PEER_LENGTHS) + " |",
             "|---|---|---|" + "---|" * len(PEER_LENGTHS)]
    for causal in (False, True):
        for ours, peer in PEER_PAIRS:
            cells = []
            for length in PEER_LENGTHS:
                a, b = measured(rows, ours, length, causal), measured(rows, peer, length, causal)
                cells.append(f"{a['seconds']:.2f} / {b['seconds']:.2f} ({a['seconds'] / b['seconds']:.2f})"
                             if a and b else "–")
            if any(cell != "–" for cell in cells):
                lines.append(f"| {ours} | {peer} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: list[dict], gflops: float) -> str:
    """results.md: the summary against the targets, then every measured row."""
    return ("# Attention layer benchmark\n\n## Against the targets (forward+backward)\n\n" + summary(rows)
            + "\n\n## Against the peers (forward+backward, same settings)\n\n" + peers(rows)
            + "\n\n## Every configuration\n\n" + render(rows, gflops))


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Log-log time and memory vs length, one line per method, per (causal, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for causal in (False, True):
        for mode in ("forward", "forward+backward"):
            subset = [r for r in rows if r["causal"] == causal and r["mode"] == mode and r["seconds"] is not None]
            if not subset:
                continue
            figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
            for method in sorted({r["method"] for r in subset}):
                points = sorted((r["length"], r["seconds"], r["peak_mb"]) for r in subset if r["method"] == method)
                lengths = [p[0] for p in points]
                style = "-" if is_ours(method) else "--"
                time_axis.plot(lengths, [p[1] for p in points], style, marker="o", label=method)
                memory_axis.plot(lengths, [max(p[2], 1) for p in points], style, marker="o", label=method)
            for axis, label in ((time_axis, "seconds"), (memory_axis, "peak MB")):
                axis.set_xscale("log", base=2)
                axis.set_yscale("log")
                axis.set_xlabel("tokens")
                axis.set_ylabel(label)
                axis.grid(True, which="both", alpha=0.3)
            time_axis.legend(fontsize=7)
            name = f"{'causal' if causal else 'noncausal'}_{mode.replace('+', '_')}"
            figure.suptitle(f"one attention layer, {'causal' if causal else 'non-causal'}, {mode}")
            figure.tight_layout()
            path = out_dir / f"{name}.png"
            figure.savefig(path, dpi=90)
            plt.close(figure)
            paths.append(path)
    return paths
