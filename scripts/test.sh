#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/setup.sh), then runs pytest on real components.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
