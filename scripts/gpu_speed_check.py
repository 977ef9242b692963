"""Paper speed protocol on the Llama-3.1-8B architecture with random weights (speed does not depend on them).

    python scripts/gpu_speed_check.py                 # bf16 on CUDA: base vs 8 and 12 linearized layers
    python scripts/gpu_speed_check.py --tiny          # a scaled-down shape on CPU, to check the script itself

Batch 1, 2048-token prompt (prefill tokens/s) and 2048 cached decode steps (tokens/s); base and replaced
models interleaved after warm-up, medians; the paper's ratios (NBL-8: 1.17x prefill, 1.20x throughput;
NBL-12: 1.28x / 1.27x, reported on Mistral-7B) printed beside ours.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from transformers import LlamaConfig

from nbl.accounting import FlopModel
from nbl.models import random_model
from nbl.speed import decode_memory, decode_timer, interleaved, prefill, random_prompt, timed
from nbl.surgery import apply_replacements

LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TINY = {**LLAMA_31_8B, "hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 4096}  # fmt: skip
PAPER = {8: {"prefill_x": 1.17, "throughput_x": 1.20}, 12: {"prefill_x": 1.28, "throughput_x": 1.27}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 12])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_speed_check.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_31_8B))
    with torch.device(device):
        base = random_model(config, dtype)
    prompt = random_prompt(base, 1, args.prompt)
    flops = FlopModel(config)
    # the last k layers: which layers are replaced does not change speed, only how many
    variants = {}
    for k in args.k:
        model = copy.deepcopy(base)
        apply_replacements(model, {i: "linear" for i in range(config.num_hidden_layers - k, config.num_hidden_layers)})
        variants[k] = model
    fns = {"prefill_base": timed(lambda: prefill(base, prompt), device)}
    fns["decode_base"] = decode_timer(base, prompt, args.new_tokens)
    for k, model in variants.items():
        fns[f"prefill_{k}"] = timed(lambda m=model: prefill(m, prompt), device)
        fns[f"decode_{k}"] = decode_timer(model, prompt, args.new_tokens)
    t = interleaved(fns, repeats=args.repeats, warmup=1)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "base": {
            "prefill_tok_s": args.prompt / t["prefill_base"].median_s,
            "decode_tok_s": args.new_tokens / t["decode_base"].median_s,
            **decode_memory(base, prompt, args.new_tokens),
        },
    }
    for k, model in variants.items():
        modes = {i: "linear" for i in range(config.num_hidden_layers - k, config.num_hidden_layers)}
        report[f"nbl_{k}"] = {
            "prefill_tok_s": args.prompt / t[f"prefill_{k}"].median_s,
            "decode_tok_s": args.new_tokens / t[f"decode_{k}"].median_s,
            "prefill_x": t["prefill_base"].median_s / t[f"prefill_{k}"].median_s,
            "throughput_x": t["decode_base"].median_s / t[f"decode_{k}"].median_s,
            "prefill_x_flop_model": flops.prefill_speedup(modes, args.prompt),
            "throughput_x_flop_model": flops.decode_speedup(modes, args.prompt + args.new_tokens // 2),
            "paper": PAPER.get(k),
            **decode_memory(model, prompt, args.new_tokens),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
