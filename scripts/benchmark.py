"""Thin entry point: `python scripts/benchmark.py [--quick] ...` (see hf_attn_variants/bench/)."""

import sys

from hf_attn_variants.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
