"""Served by vLLM on the accelerator: the Llama-3.1-8B architecture with random bf16 weights, base vs NBL-8 and NBL-12.

    python scripts/gpu_vllm_check.py --out docs/results/gpu       # on a CUDA device with vLLM (part of gpu_check.sh)
    python scripts/gpu_vllm_check.py --tiny --out /tmp/check       # a scaled-down shape on the CPU: checks the script

Speed does not depend on the weights' values, only on which modules exist, so the checkpoints are random models with
the last k attention layers replaced by (random) linear maps, written by nbl.save_linearized and served through
the NBL plugin. nbl.serve.bench measures every engine alike (batch-1 prefill and decode, a saturating batch, a long
context, the KV capacity vLLM reports for the same budget), rounds alternating, medians; beside each ratio the
FLOP and bytes models' predictions. Checkpoints go to --scratch (about 16 GB each at full size; /dev/shm by default
where it exists, so the machine's disk is spared) and are deleted after. Writes vllm.json and vllm.md into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig

import nbl
from nbl.core.accounting import predicted_speedups
from nbl.core.surgery import apply_replacements
from nbl.models import random_model
from nbl.serve.bench import ServeSettings, measure, ratio_table

LLAMA_31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
}  # fmt: skip
# vLLM's CPU attention needs head_dim 64 or more: 512 / 8
TINY = {**LLAMA_31_8B, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 4096, "num_hidden_layers": 16, "max_position_embeddings": 4096}  # fmt: skip
VARIANTS = {"NBL-8": 8, "NBL-12": 12}


def checkpoints(config: LlamaConfig, dtype: torch.dtype, scratch: Path) -> dict[str, Path]:
    n = config.num_hidden_layers
    folders = {}
    for name, k in {"base": 0, **VARIANTS}.items():
        model = random_model(config, dtype=dtype, seed=0)
        apply_replacements(model, dict.fromkeys(range(n - k, n), "linear"))  # which layers does not change speed
        folders[name] = nbl.save_linearized(model, scratch / name)
        del model
    return folders


def table(served: dict, predicted: dict) -> str:
    return "\n".join(ratio_table(served, predicted)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_31_8B))
    if args.tiny:  # the CPU: float32, eager engines, small cases
        dtype, settings = torch.float32, ServeSettings(prompt_len=64, new_tokens=8, batch=4, batch_prompt_len=32,
                                                       long_prompt_len=256, repeats=1, kv_cache_gib=1,
                                                       enforce_eager=True)  # fmt: skip
    else:  # the paper's batch-1 protocol (2048 + 256), a saturating batch, a long context. The three engines live
        # at once on one 80 GB GPU: about 15 GiB of bf16 weights each, 5 GiB of KV each, and each engine's share of
        # the memory set from what is free when they start (nbl.serve.bench.memory_share): about 64 GiB in all
        dtype, settings = torch.bfloat16, ServeSettings(prompt_len=2048, new_tokens=256, batch=128,
                                                        batch_prompt_len=512, long_prompt_len=7680, repeats=3,
                                                        kv_cache_gib=5, dtype="bfloat16")  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="nbl-vllm-", dir=args.scratch))
    try:
        folders = checkpoints(config, dtype, scratch)
        served = measure(folders, settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n = config.num_hidden_layers
    lengths = (settings.prompt_len, settings.new_tokens)
    predicted = {name: predicted_speedups(config, dict.fromkeys(range(n - k, n), "linear"), *lengths)
                 for name, k in VARIANTS.items()}  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device, "served": served, "predicted": predicted, "settings": settings.__dict__}
    (args.out / "vllm.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "vllm.md").write_text(table(served, predicted))
    print(table(served, predicted))


if __name__ == "__main__":
    main()
