#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/setup.sh), runs the static checks (ruff lint and format), then
# pytest on real components.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
