"""The one-layer suite: every (method, length, causality, mode) in its own process, with its FLOP floor."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .methods import causal_capable, flops, max_length
from .timing import Result, matmul_gflops


def run_all(methods, lengths, modes, causal_modes, min_seconds: float, out_dir: Path, timeout: int) -> list[dict]:
    """Every configuration in its own process; rows with the floor and ratio to SDPA added."""
    gflops = matmul_gflops()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "machine.json").write_text(json.dumps({"matmul_gflops": gflops, "threads": torch.get_num_threads()}))
    rows = []
    for causal in causal_modes:
        for mode in modes:
            for length in lengths:
                for method in methods:
                    if (causal and not causal_capable(method)) or length > max_length(method, causal):
                        continue
                    command = [sys.executable, "-m", "hf_attn_variants.bench", "--single", method, str(length),
                               str(int(causal)), mode, str(min_seconds)]
                    try:
                        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else asdict(
                            Result(method, length, causal, mode, None, None, done.stderr.strip()[-300:]))
                    except subprocess.TimeoutExpired:
                        result = asdict(Result(method, length, causal, mode, None, None, f"over {timeout} s"))
                    result["floor_seconds"] = flops(method, length, causal, mode) / (gflops * 1e9)
                    rows.append(result)
                    print(json.dumps(result), flush=True)
                    out_dir.mkdir(parents=True, exist_ok=True)  # partial results survive an interrupted run
                    (out_dir / "partial.jsonl").open("a").write(json.dumps(result) + "\n")
    return finish(rows, gflops, out_dir)


def finish(rows: list[dict], gflops: float, out_dir: Path) -> list[dict]:
    """Add the ratios to SDPA and to the floor, and write results.json."""
    for row in rows:
        sdpa = next((r for r in rows if r["method"] == "full" and r["length"] == row["length"]
                     and r["causal"] == row["causal"] and r["mode"] == row["mode"]), None)
        ok = row["seconds"] is not None
        row["vs_sdpa"] = row["seconds"] / sdpa["seconds"] if ok and sdpa and sdpa["seconds"] else None
        row["vs_floor"] = row["seconds"] / row["floor_seconds"] if ok else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"matmul_gflops": gflops, "threads": torch.get_num_threads(),
                                                      "rows": rows}, indent=1) + "\n")
    return rows
