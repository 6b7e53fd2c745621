"""The benchmark runs end to end (smoke: no timing assertions) and its FLOP model orders the methods sensibly."""

from __future__ import annotations

import json

from hf_attn_variants.benchmark import flops
from hf_attn_variants.cli import main as cli_main


def test_quick_benchmark_writes_tables(tmp_path, capsys):
    code = cli_main(["bench", "--quick", "--methods", "full", "performer", "lsh", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert data["matmul_gflops"] > 0 and len(rows) == 6  # 3 methods x (non-causal, causal)
    assert all(r["seconds"] and r["seconds"] > 0 and r["vs_sdpa"] and r["vs_floor"] for r in rows)
    assert "| performer | 256 |" in (tmp_path / "results.md").read_text()


def test_flop_model_is_linear_for_variants_and_quadratic_for_sdpa():
    for method in ("linformer", "performer", "bigbird", "lsh"):
        ratio = flops(method, 16384, False, "forward") / flops(method, 8192, False, "forward")
        assert abs(ratio - 2) < 0.01
    assert flops("full", 16384, False, "forward") / flops("full", 8192, False, "forward") > 2.5
    assert flops("full", 4096, True, "forward") < flops("full", 4096, False, "forward")
