"""Thin entry point: `python scripts/finetune.py RECIPE.yaml` (also under torchrun / accelerate launch)."""

import sys

from hf_attn_variants.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
