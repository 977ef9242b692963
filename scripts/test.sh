#!/usr/bin/env bash
# Set up (first time only), lint, and run the whole test suite (CPU only; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=15 "$@"
