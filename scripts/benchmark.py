"""Thin entry point: `python scripts/benchmark.py [--quick] ...` (see hf_attn_variants/benchmark.py)."""

import sys

from hf_attn_variants.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
