"""``python -m hf_attn_variants.bench``: the benchmark CLI (also how one configuration runs in its own process)."""

import sys

from .cli import main

sys.exit(main())
