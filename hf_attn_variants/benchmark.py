"""Benchmark one attention layer (Q/K/V/O projections + attention) against SDPA, the peers and the FLOP floor.

Each (method, length, causal, mode) runs in its own process (so peak memory is its own): a warm-up, then the
median of ``repeats`` timed runs; peak memory is the growth of the process's max RSS over the run. The floor is the
method's FLOPs divided by this machine's measured fp32 matmul throughput (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HIDDEN, HEADS, HEAD_DIM = 768, 12, 64
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
VARIANTS = ("full", "linformer", "performer", "bigbird", "lsh")
# Our variants at a peer's setting (Reformer's 1 and 4 hashes): method -> (variant, settings).
MATCHED = {"lsh-1": ("lsh", {"num_hashes": 1}), "lsh-4": ("lsh", {"num_hashes": 4})}
PEERS = ("hf-bigbird", "hf-reformer-1", "hf-reformer-4", "lucidrains-performer", "lucidrains-linformer")
CAUSAL_CAPABLE = {"full", "performer", "bigbird", "lsh", "lsh-1", "lsh-4", "hf-reformer-1", "hf-reformer-4",
                  "lucidrains-performer"}
LSH_HASHES = {"lsh": 2, "lsh-1": 1, "lsh-4": 4}
# Peers that run out of memory or time on this machine beyond a length (BigBird builds N x N; lucidrains' causal
# Performer keeps an N x m x d tensor per position).
PEER_MAX_LENGTH = {("hf-bigbird", False): 8192, ("lucidrains-performer", True): 4096}


@dataclass
class Result:
    method: str
    length: int
    causal: bool
    mode: str  # "forward" (no grad) or "forward+backward"
    seconds: float | None
    peak_mb: float | None
    error: str | None = None


def build(method: str, length: int, causal: bool) -> torch.nn.Module:
    """The layer for ``method``: a function of x [1, N, 768] returning [1, N, 768]."""
    if method in VARIANTS or method in MATCHED:
        from .benchmark_layer import attention_layer

        variant, settings = MATCHED.get(method, (method, {}))
        layer = attention_layer(variant, HIDDEN, HEADS, max_positions=max(length, 512), **settings)
        layer.self.is_causal = causal
        return lambda x: layer(x)[0]
    if method == "hf-bigbird":
        from transformers import BigBirdConfig, BigBirdModel

        config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                               intermediate_size=8, attention_type="block_sparse", block_size=64,
                               num_random_blocks=3, max_position_embeddings=length, attention_probs_dropout_prob=0.0,
                               hidden_dropout_prob=0.0)
        model = BigBirdModel(config)
        attention = model.encoder.layer[0].attention.train()
        masks = model.create_masks_for_block_sparse_attn(torch.ones(1, length), 64)
        names = ("blocked_encoder_mask", "band_mask", "from_mask", "to_mask")
        kwargs = dict(zip(names, masks, strict=True))
        return lambda x: attention(x, band_mask=kwargs["band_mask"], from_mask=kwargs["from_mask"],
                                   to_mask=kwargs["to_mask"], from_blocked_mask=kwargs["blocked_encoder_mask"],
                                   to_blocked_mask=kwargs["blocked_encoder_mask"])[0]
    if method.startswith("hf-reformer"):
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import ReformerAttention

        hashes = int(method.rsplit("-", 1)[1])
        config = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM,
                                attn_layers=["lsh"], lsh_attn_chunk_length=64, num_hashes=hashes,
                                num_buckets=max(2, 2 * length // 64), is_decoder=causal,
                                lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                axial_pos_embds=False, max_position_embeddings=length)
        attention = ReformerAttention(config, layer_id=0).train()
        return lambda x: attention(x).hidden_states
    if method == "lucidrains-performer":
        from performer_pytorch import SelfAttention

        attention = SelfAttention(dim=HIDDEN, heads=HEADS, dim_head=HEAD_DIM, nb_features=256, causal=causal)
        return attention
    if method == "lucidrains-linformer":
        from linformer import LinformerSelfAttention

        return LinformerSelfAttention(dim=HIDDEN, seq_len=length, k=256, heads=HEADS, dim_head=HEAD_DIM)
    raise ValueError(f"unknown method {method!r}")


def build_model(name: str, variant: str, length: int):
    """A whole model as a function of input ids: a 2-layer BERT-base-shaped model, or the real all-MiniLM-L6-v2
    extended to ``length`` positions, converted to ``variant``."""
    from transformers import BertConfig, BertModel

    from .conversion import convert

    if name == "bert-base-2-layers":
        source = BertModel(BertConfig(num_hidden_layers=2, max_position_embeddings=length,
                                      attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))
    else:
        from .demo import minilm_path

        source = minilm_path()
    model = convert(source, attention=variant, max_position_embeddings=max(length, 512)).train()
    model.config.hidden_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return lambda ids: model(input_ids=ids).last_hidden_state


def run_single(method: str, length: int, causal: bool, mode: str, repeats: int) -> Result:
    """Time one configuration in this process."""
    torch.manual_seed(0)
    if method.startswith("model:"):  # model:<name>:<variant>
        _, name, variant = method.split(":")
        layer = build_model(name, variant, length)
        x = torch.randint(1000, 2000, (1, length))
    else:
        layer = build(method, length, causal)
        x = torch.randn(1, length, HIDDEN, requires_grad=mode != "forward")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                layer(x)
        else:
            layer(x).sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    return Result(method, length, causal, mode, statistics.median(times), peak_kib / 1024)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s) with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def attended_keys(method: str, length: int, causal: bool) -> float:
    """Keys each query attends in the method's algorithm (its FLOP-defining width), at default settings."""
    if method in ("full",):
        return length / 2 if causal else length
    if method in ("linformer", "lucidrains-linformer"):
        return 2 * 256  # projections of K and V (k = 256) plus attention over k
    if method in ("performer", "lucidrains-performer"):
        return 3 * 256  # feature maps of q and k plus the m x d state products (m = 256)
    if method in ("bigbird", "hf-bigbird"):
        window = 2 if causal else 3
        return min(length, (window + 2 + 3) * 64)
    if method in LSH_HASHES:  # positional window c + bucket window c per round
        return min(length, 64 * (1 + LSH_HASHES[method]))
    if method.startswith("hf-reformer"):
        return min(length, 2 * 64 * int(method.rsplit("-", 1)[1]))
    raise ValueError(method)


def flops(method: str, length: int, causal: bool, mode: str) -> float:
    """Forward FLOPs of projections (4 x 2 N h^2) and attention core (4 N keys h); x3 with the backward."""
    forward = 4 * 2 * length * HIDDEN**2 + 4 * length * attended_keys(method, length, causal) * HIDDEN
    return forward * (3 if mode != "forward" else 1)


def run_all(methods, lengths, modes, causal_modes, repeats, out_dir: Path, timeout: int) -> list[dict]:
    """Every configuration in its own process; rows with the floor and ratio to SDPA added."""
    gflops = matmul_gflops()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "machine.json").write_text(json.dumps({"matmul_gflops": gflops, "threads": torch.get_num_threads()}))
    rows = []
    for causal in causal_modes:
        for mode in modes:
            for length in lengths:
                for method in methods:
                    if causal and method not in CAUSAL_CAPABLE:
                        continue
                    if length > PEER_MAX_LENGTH.get((method, causal), 1 << 30):
                        continue
                    command = [sys.executable, "-m", "hf_attn_variants.benchmark", "--single", method, str(length),
                               str(int(causal)), mode, str(repeats)]
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

    methods = [m for m in (*VARIANTS, *MATCHED, *PEERS) if m != "full"]
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
                style = "-" if method in VARIANTS or method in MATCHED else "--"
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


def model_table(out: Path, length: int, repeats: int, timeout: int) -> int:
    """Whole models at ``length`` tokens, forward and forward+backward, every variant against 'full'."""
    rows = []
    for name in ("bert-base-2-layers", "all-MiniLM-L6-v2"):
        for variant in VARIANTS:
            for mode in ("forward", "forward+backward"):
                command = [sys.executable, "-m", "hf_attn_variants.benchmark", "--single", f"model:{name}:{variant}",
                           str(length), "0", mode, str(repeats)]
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                    "method": f"model:{name}:{variant}", "mode": mode, "seconds": None, "peak_mb": None,
                    "error": done.stderr.strip()[-200:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["# Model-level benchmark", "",
             f"Whole models at {length} tokens (batch 1, fp32, {torch.get_num_threads()} threads, dropout 0, median "
             f"of {repeats} after a warm-up): a 2-layer BERT-base-shaped model (hidden 768, 12 heads, FFN 3072) and "
             f"the real all-MiniLM-L6-v2 with its positions tiled to {length}, each converted to every variant.", "",
             "| model | variant | forward s | × full | forward+backward s | × full | peak MB (fwd+bwd) |",
             "|---|---|---|---|---|---|---|"]
    def get(name, variant, mode):
        return next(r for r in rows if r["method"] == f"model:{name}:{variant}" and r["mode"] == mode)

    for name in ("bert-base-2-layers", "all-MiniLM-L6-v2"):
        base_f, base_b = get(name, "full", "forward")["seconds"], get(name, "full", "forward+backward")["seconds"]
        for variant in VARIANTS:
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


def main(argv=None) -> int:
    """CLI: ``hf-attn-variants bench [--quick] [--lengths ...] [--methods ...] [--out docs/benchmarks]``;
    ``bench --decode ...`` runs the decoding benchmark (hf_attn_variants.bench_decode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--decode" in argv:
        from .bench_decode import main as decode_main

        return decode_main(argv)
    parser = argparse.ArgumentParser(prog="hf-attn-variants bench", description=__doc__)
    parser.add_argument("--single", nargs=5, metavar=("METHOD", "LENGTH", "CAUSAL", "MODE", "REPEATS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, forward+backward, 1 run")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=[*VARIANTS, *MATCHED, *PEERS])
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
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
        method, length, causal, mode, repeats = args.single
        result = run_single(method, int(length), bool(int(causal)), mode, int(repeats))
        print(json.dumps(asdict(result)))
        return 0
    if args.models:
        return model_table(Path(args.out), args.model_length, args.repeats, args.timeout)
    if args.from_partial:  # render what an interrupted run measured
        out = Path(args.out)
        rows = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
        gflops = json.loads((out / "machine.json").read_text())["matmul_gflops"]
        rows = finish(rows, gflops, out)
        (out / "results.md").write_text(report(rows, gflops))
        plot(rows, out)
        return 0
    if args.quick:  # a smoke run: no timing claims
        args.lengths, args.repeats, args.modes = [256], 1, ["forward+backward"]
    causal_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    out = Path(args.out)
    (out / "partial.jsonl").unlink(missing_ok=True)
    rows = run_all(args.methods, args.lengths, args.modes, causal_modes, args.repeats, out, args.timeout)
    gflops = json.loads((out / "results.json").read_text())["matmul_gflops"]
    text = render(rows, gflops)
    (out / "results.md").write_text(report(rows, gflops))
    paths = plot(rows, out) if not args.quick else []
    print(text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}" + "".join(f", {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
