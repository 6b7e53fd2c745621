#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs ruff and the test suite. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hf_attn_variants tests scripts
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
