#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs ruff and the test suite. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hf_attn_variants tests scripts
# Every test, the slow ones too (plain `pytest` leaves them out: see pyproject.toml).
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "slow or not slow" "$@"
