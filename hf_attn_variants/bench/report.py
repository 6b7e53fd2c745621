"""The one-layer suite's tables (every configuration; the summary against the targets) and plots."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .methods import ALL_METHODS, HEADS, HIDDEN, LENGTHS, is_ours


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


# The targets (fwd+bwd, one layer, 16384 tokens): time / SDPA per (method, causal); None = no target.
SDPA_TARGETS = {("linformer", False): 0.13, ("performer", False): 0.13, ("performer", True): 0.35,
                ("bigbird", False): 0.16, ("bigbird", True): 0.16, ("lsh-1", False): 0.12, ("lsh-1", True): 0.12,
                ("lsh-4", False): 0.18, ("lsh-4", True): 0.18}
FLOOR_TARGET, MEMORY_TARGET_MB, SLOPE_TARGET = 1.4, 1500, 1.1


def summary(rows: list[dict]) -> str:
    """Forward+backward at the longest lengths against the targets: x SDPA, x floor, peak memory, its log-log slope
    between 4096 and 16384 tokens, and the crossover (the shortest length from which on it beats SDPA)."""
    lines = ["| method | causal | × SDPA at 16384 (target) | × floor at 8192 / 16384 (target ≤ 1.4) | "
             "peak MB at 16384 (≤ 1500) | memory slope 4096→16384 (≤ 1.1) | beats SDPA from |",
             "|---|---|---|---|---|---|---|"]

    def row(method, length, causal):
        return next((r for r in rows if r["method"] == method and r["length"] == length and r["causal"] == causal
                     and r["mode"] == "forward+backward" and r["seconds"] is not None), None)

    methods = [m for m in ALL_METHODS if m != "full"]
    for causal in (False, True):
        for method in methods:
            longest, middle, short = row(method, 16384, causal), row(method, 8192, causal), row(method, 4096, causal)
            if longest is None:
                continue
            target = SDPA_TARGETS.get((method, causal))
            floors = " / ".join(f"{r['vs_floor']:.2f}" for r in (middle, longest) if r)
            slope = (math.log(longest["peak_mb"] / short["peak_mb"]) / math.log(4)
                     if short and short["peak_mb"] > 0 and longest["peak_mb"] > 0 else float("nan"))
            crossover = None  # the shortest length from which on every measured length beats SDPA
            for length in sorted(LENGTHS, reverse=True):
                measured = row(method, length, causal)
                if measured is None or measured["vs_sdpa"] >= 1:
                    break
                crossover = length
            lines.append(
                f"| {method} | {'yes' if causal else 'no'} | {longest['vs_sdpa']:.2f}"
                f"{f' ({target})' if target else ''} | {floors} | {longest['peak_mb']:.0f} | {slope:.2f} | "
                f"{crossover or 'none'} |")
    return "\n".join(lines)


def report(rows: list[dict], gflops: float) -> str:
    """results.md: the summary against the targets, then every measured row."""
    return ("# Attention layer benchmark\n\n## Against the targets (forward+backward)\n\n" + summary(rows)
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
