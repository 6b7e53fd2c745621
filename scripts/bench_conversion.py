"""Conversion benchmark: peak memory and time of ``hf_attn_variants.convert`` against transformers' own load + save of
the same checkpoint, for synthetic bf16 Llama-shaped checkpoints built here (about 0.57B and 1.4B parameters).

    python scripts/bench_conversion.py [--sizes 0.5b 1.4b] [--out docs/benchmarks] [--work outputs/bench_conversion]

Each measurement runs in its own process; peak RSS is that process's high-water resident set (VmHWM), which
includes Python, torch and transformers themselves; the table also gives the peak above that import baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # name -> Llama config fields
    "0.5b": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=4, vocab_size=32000),
    "1.4b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
}

JOB = """
import json, sys, time

def high_water_mb():  # this process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a fork inherits)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import torch
from transformers import AutoModelForCausalLM
import hf_attn_variants as hv
job, source, target = sys.argv[1:4]
baseline = high_water_mb()
start = time.perf_counter()
if job == "transformers":
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target)
else:
    hv.convert(source, attention=job, output_dir=target)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": high_water_mb(), "import_mb": baseline}))
"""


def build_checkpoint(folder: Path, shape: dict) -> int:
    """A random bf16 Llama checkpoint (config + one safetensors file) in ``folder``; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16", **shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, param in skeleton.state_dict().items():
        tensors[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(job: str, source: Path, target: Path) -> dict:
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", JOB, job, str(source), str(target)], capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                                            "PATH": "/usr/bin:/bin"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    shutil.rmtree(target, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--variant", default="performer")
    parser.add_argument("--out", default="outputs/benchmarks")
    parser.add_argument("--work", default="outputs/bench_conversion")
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        source = Path(args.work) / f"llama-{size}"
        start = time.perf_counter()
        weight_bytes = build_checkpoint(source, SHAPES[size])
        print(f"{size}: checkpoint {weight_bytes / 2**30:.2f} GiB built in {time.perf_counter() - start:.0f} s")
        reference = measure("transformers", source, Path(args.work) / "saved")
        converted = measure(args.variant, source, Path(args.work) / "converted")
        rows.append({"size": size, "checkpoint_mb": weight_bytes / 2**20, "transformers": reference,
                     "convert": converted})
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Conversion: peak memory and time against transformers' load + save",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"| checkpoint | weights MB | transformers load+save: s · peak MB (above imports) | convert to {args.variant}: "
        "s · peak MB (above imports) | convert peak above imports / weights | convert time / transformers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, c = r["transformers"], r["convert"]
        above = (c["peak_mb"] - c["import_mb"]) / r["checkpoint_mb"]
        lines.append(f"| {r['size']} bf16 Llama | {r['checkpoint_mb']:.0f} | {t['seconds']:.1f} · {t['peak_mb']:.0f} "
                     f"({t['peak_mb'] - t['import_mb']:.0f}) | {c['seconds']:.1f} · {c['peak_mb']:.0f} "
                     f"({c['peak_mb'] - c['import_mb']:.0f}) | {above:.2f} | {c['seconds'] / t['seconds']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conversion.md").write_text("\n".join(lines) + "\n")
    (out / "conversion.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
