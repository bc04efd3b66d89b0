#!/usr/bin/env bash
# Creates .venv and installs what the service (and, with --dev, the tests) need.
# Idempotent: a second run only checks.  torch is installed first at a pinned
# version so pip does not pull a multi-GB CUDA build on CPU machines; set
# TORCH_SPEC (e.g. "torch>=2.4" with a CUDA index) to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -r requirements-dev.txt
else
  python -m pip install -q -r requirements.txt
fi
