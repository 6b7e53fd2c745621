"""The benchmark runs end to end (smoke: no timing assertions) and its FLOP model orders the methods sensibly."""

from __future__ import annotations

import json

import pytest

from hf_attn_variants.bench.methods import flops
from hf_attn_variants.cli import main as cli_main


@pytest.mark.slow
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


def test_summary_reports_ratios_slope_and_crossover_against_the_targets():
    from hf_attn_variants.bench.methods import LENGTHS
    from hf_attn_variants.bench.report import summary

    rows = []
    for length in LENGTHS:
        sdpa = length * length / 1e6
        rows.append({"method": "full", "length": length, "causal": False, "mode": "forward+backward",
                     "seconds": sdpa, "vs_sdpa": 1.0, "vs_floor": 1.0, "peak_mb": 100.0})
        seconds = 2.0 + length / 1e4  # loses to SDPA at 512 and 1024 only
        rows.append({"method": "performer", "length": length, "causal": False, "mode": "forward+backward",
                     "seconds": seconds, "vs_sdpa": seconds / sdpa, "vs_floor": 1.2, "peak_mb": length / 10})
    line = next(line for line in summary(rows).splitlines() if line.startswith("| performer | no |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    ratio = lambda n: (2.0 + n / 1e4) / (n**2 / 1e6)  # noqa: E731
    assert cells[2] == f"{ratio(8192):.2f} / {ratio(16384):.2f}"
    assert cells[3] == "1.20 / 1.20" and cells[4] == "1638"
    assert cells[5] == "1.00"  # peak memory grows linearly: log-log slope 1
    assert cells[6] == "2048"


def test_peers_table_gives_our_time_over_the_peer_s_at_each_length():
    from hf_attn_variants.bench.report import PEER_LENGTHS, peers

    rows = [{"method": method, "length": length, "causal": False, "mode": "forward+backward",
             "seconds": seconds * length / 4096, "peak_mb": 1.0}
            for length in PEER_LENGTHS for method, seconds in (("lsh", 1.0), ("hf-reformer-2", 4.0))]
    rows.append({"method": "lsh-1", "length": 8192, "causal": False, "mode": "forward+backward", "seconds": 3.0,
                 "peak_mb": 1.0})  # its peer did not run: no row
    table = peers(rows).splitlines()
    line = next(line for line in table if line.startswith("| lsh | hf-reformer-2 | no |"))
    assert [cell.strip() for cell in line.strip("|").split("|")][3:] == [
        "1.00 / 4.00 (0.25)", "2.00 / 8.00 (0.25)", "4.00 / 16.00 (0.25)"]
    assert not any(line.startswith("| lsh-1 |") for line in table)


def test_decode_benchmark_measures_every_method_and_the_performer_cache_stays_flat(tmp_path):
    import json

    from hf_attn_variants.bench.decode import main as decode_main

    assert decode_main(["--contexts", "64", "192", "--tokens", "2", "--repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"full", "performer", "bigbird", "lsh", "full (growing cache)"}
    # Timings are measured, not asserted (a loaded CI host reorders them): every one is a positive number.
    assert result["floor_ms_per_token"] > 0 and all(r["ms_per_token"] > 0 for r in rows)
    assert all(r["repeats"] == 2 and 0 < r["ms_min"] <= r["ms_per_token"] <= r["ms_max"] for r in rows)
    cache = {(r["method"], r["context"]): r["cache_bytes"] for r in rows}
    assert cache[("performer", 64)] == cache[("performer", 192)] > 0  # running sums: constant
    assert cache[("full", 192)] > 2 * cache[("full", 64)]  # keys and values: grow with the context
    spare = 1.5 + 64 / 194  # capacity: 1.5x the prefill plus 64 slots (194 = 192 + the 2 decoded tokens)
    assert cache[("full", 192)] <= cache[("full (growing cache)", 192)] <= spare * cache[("full", 192)]
    assert "× full" in (tmp_path / "decode.md").read_text()
    assert "| floor (attention removed) |" in (tmp_path / "decode.md").read_text()
