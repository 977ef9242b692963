#!/usr/bin/env bash
# Reproduce the paper's table layout for one hub model on a SLURM GPU cluster:
#   bash scripts/reproduce_paper.sh llama3.1-8b [extra Hydra overrides, e.g. hydra.launcher.partition=gpu]
# Launches the {cca, cosine, random} x {linear, drop} x k grid with the paper's calibration (C4, 256 x 2048),
# evaluation (lm-eval hub tasks) and speed protocol (batch 1, 2048 + 2048 tokens), then writes the report.
# Use LAUNCHER=local to run the jobs as local processes instead of SLURM jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: reproduce_paper.sh MODEL [overrides...]}
shift
sweep="outputs/paper/${model}/$(date +%Y-%m-%d_%H-%M-%S)"
bash scripts/setup.sh
.venv/bin/python -m nbl experiment=paper_grid "model=${model}" calibration=c4 eval=paper speed=gpu \
  "hydra/launcher=${LAUNCHER:-slurm}" "hydra.sweep.dir=${sweep}" "$@"
.venv/bin/python scripts/report.py "${sweep}" --out "${sweep}/report"
