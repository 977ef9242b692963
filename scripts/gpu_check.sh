#!/usr/bin/env bash
# The one prepared accelerator run: GPU tests, then the paper-setting calibration and speed check.
# The accelerator machine has its own CUDA PyTorch and transformers and no package registry, so this runs the
# checkout in place (PYTHONPATH) with ${PYTHON:-python3} instead of scripts/setup.sh's CPU environment.
# Results go to ${OUT:-outputs/gpu_check}. On a CPU, --tiny checks the script itself:
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
} | tee "$OUT/environment.txt"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt" || true
"$PY" scripts/gpu_speed_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_speed_check.log"
# vLLM serving (the nbl plugin), where the machine has vLLM: it cannot be installed there (no registry)
if "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" scripts/gpu_vllm_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_vllm_check.log"
else
  echo "no vllm on this machine: the serving check is skipped" | tee "$OUT/gpu_vllm_check.log"
fi
