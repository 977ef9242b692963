#!/usr/bin/env bash
# Set up (first time only) and run the experiment; arguments are Hydra overrides, e.g. num_layers=12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m nbl "$@"
