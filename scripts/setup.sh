#!/usr/bin/env bash
# Creates .venv and installs nim_build with everything the demo and the tests need (idempotent).
# torch is installed first, pinned, so pip takes the CPU build and never a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[serve,default-model,test]"
.venv/bin/python -c "import nim_build, torch, tritonclient, modelopt" >/dev/null
