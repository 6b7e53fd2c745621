#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its extras. Torch first, pinned to the CPU wheel that
# lies on this machine's disk, so no multi-GB CUDA build is pulled in; elsewhere pip fetches the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
# setuptools announces every editable install with an information-only warning; nothing else is silenced.
export PYTHONWARNINGS="ignore:Editable installation"
.venv/bin/python -m pip install -q -e ".[dev,demo]"
if [ "${WITH_BENCH:-0}" = 1 ]; then .venv/bin/python -m pip install -q -e ".[bench]"; fi
