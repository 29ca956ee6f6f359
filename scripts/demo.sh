#!/usr/bin/env bash
# Main job end to end on the embedded default model, CPU only:
# engine (FP8 + accuracy gate) -> local generation with the reference runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ENGINE=engines/SmolLM2-135M-Instruct
nim_build engine default --out "$ENGINE" --quant fp8 --backend auto --max-seq-len 2048 --force
nim_build run "$ENGINE" --prompt "What is the capital of France?" --chat --max-tokens 32 --stream
