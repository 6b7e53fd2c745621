"""Benchmarks, each a small module: ``methods`` (what is measured: our variants, their peers, the FLOP model),
``timing`` (one configuration, timed in its own process), ``layers`` (the one-layer suite against SDPA, the peers
and the floor), ``report`` (its tables, summary against the targets and plots), ``models`` (whole models) and
``decode`` (decoding). ``hf-attn-variants bench`` (``cli``) runs them."""
