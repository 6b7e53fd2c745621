"""Whole models at one length: every variant against 'full', forward and forward+backward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .methods import OURS


def model_table(out: Path, length: int, min_seconds: float, timeout: int) -> int:
    """Whole models at ``length`` tokens, forward and forward+backward, every variant against 'full'."""
    rows = []
    for name in ("bert-base-2-layers", "all-MiniLM-L6-v2"):
        for variant in OURS:
            for mode in ("forward", "forward+backward"):
                command = [sys.executable, "-m", "hf_attn_variants.bench", "--single", f"model:{name}:{variant}",
                           str(length), "0", mode, str(min_seconds)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                    "method": f"model:{name}:{variant}", "mode": mode, "seconds": None, "peak_mb": None,
                    "error": done.stderr.strip()[-200:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["# Model-level benchmark", "",
             f"Whole models at {length} tokens (batch 1, fp32, {torch.get_num_threads()} threads, dropout 0, median "
             f"of the runs filling {min_seconds:g} s after a warm-up): a 2-layer BERT-base-shaped model (hidden 768, "
             "12 heads, FFN 3072) and "
             f"the real all-MiniLM-L6-v2 with its positions tiled to {length}, each converted to every variant.", "",
             "| model | variant | forward s | × full | forward+backward s | × full | peak MB (fwd+bwd) |",
             "|---|---|---|---|---|---|---|"]
    def get(name, variant, mode):
        return next(r for r in rows if r["method"] == f"model:{name}:{variant}" and r["mode"] == mode)

    for name in ("bert-base-2-layers", "all-MiniLM-L6-v2"):
        base_f, base_b = get(name, "full", "forward")["seconds"], get(name, "full", "forward+backward")["seconds"]
        for variant in OURS:
            forward, both = get(name, variant, "forward"), get(name, variant, "forward+backward")
            if forward["seconds"] is None or both["seconds"] is None:
                lines.append(f"| {name} | {variant} | failed | | | | |")
                continue
            lines.append(f"| {name} | {variant} | {forward['seconds']:.2f} | {forward['seconds'] / base_f:.2f} | "
                         f"{both['seconds']:.2f} | {both['seconds'] / base_b:.2f} | {both['peak_mb']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
