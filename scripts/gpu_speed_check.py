"""The paper's setting on the Llama-3.1-8B architecture with random bf16 weights (speed does not depend on them).

    python scripts/gpu_speed_check.py --out docs/results/gpu      # on a CUDA device (about 6 minutes on an H200)
    python scripts/gpu_speed_check.py --tiny --out /tmp/check      # a scaled-down shape on the CPU: checks the script

1. Calibration of --cal-sequences x --cal-len tokens (paper: 256 x 2048): wall time split into the plain forward
   over the same tokens, the statistics (calibration pass minus forward; float64 and float32 Gram products) and
   the scoring of every layer (CCA bound) plus 12 LMMSE fits.
2. Speed, batch 1: prefill of --prompt tokens, then --new-tokens cached decode steps timed one by one (median per
   token), for base, NBL-8, NBL-12, DROP-8, DROP-12 eager with a dynamic cache (the paper's protocol) and, unless
   --no-compile, a compiled step with a compact static cache for --compiled (default base, NBL-12, DROP-12: each
   model compiles once, which is most of a GPU run's time). Beside each: the FLOP model and the bytes model.
   Peak memory of each model alone (weights + what its decode allocates); models interleaved after warm-up.
3. bf16 greedy tokens with and without the KV cache, NBL-12.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

import nbl
from nbl.core.accounting import BytesModel, FlopModel
from nbl.core.surgery import apply_replacements
from nbl.measure.speed import compiled_step, decode_memory, prefill, random_prompt, static_cache, synchronize
from nbl.models import random_model

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
        "num_key_value_heads": 2, "vocab_size": 4096, "num_hidden_layers": 16}  # fmt: skip
PAPER = {"NBL-8": {"prefill_x": 1.17, "throughput_x": 1.20}, "NBL-12": {"prefill_x": 1.28, "throughput_x": 1.27}}
VARIANTS = {"NBL-8": (8, "linear"), "NBL-12": (12, "linear"), "DROP-8": (8, "drop"), "DROP-12": (12, "drop")}


def _timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def calibration(model, config, device, sequences: int, length: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (batch, length), generator=g) for _ in range(sequences // batch)]

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model.model(input_ids=b.to(device), use_cache=False)

    out = {"tokens": sequences * length, "forward_s": _timed(forward, device)}
    for gram in ("float64", "float32"):
        synchronize(device)
        start = time.perf_counter()
        stats = nbl.calibrate(model, batches, progress=False, gram_dtype=gram)
        synchronize(device)
        out[f"calibrate_{gram}_s"] = time.perf_counter() - start
        out[f"statistics_{gram}_s"] = out[f"calibrate_{gram}_s"] - out["forward_s"]
    out["scoring_s"] = _timed(lambda: [nbl.cca_bound(stats[i]) for i in stats], device)
    out["fit_12_s"] = _timed(lambda: [nbl.fit_lmmse(stats[i]) for i in list(stats)[:12]], device)
    out["total_float32_s"] = out["calibrate_float32_s"] + out["scoring_s"] + out["fit_12_s"]
    return out


@torch.no_grad()
def _step_times(model, prompt, new_tokens: int, device, step=None, static: bool = False) -> list[float]:
    """Seconds of each single-token decode step after an untimed prefill (cache carried step to step)."""
    n = prompt.shape[1]
    if static:
        cache = static_cache(model, n + new_tokens)
        out = model(prompt, past_key_values=cache, cache_position=torch.arange(n, device=device), use_cache=True,
                    logits_to_keep=1)  # fmt: skip
    else:
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    step = step or model
    times = []
    for t in range(new_tokens):
        kwargs = {"cache_position": torch.tensor([n + t], device=device)} if static else {}
        synchronize(device)
        start = time.perf_counter()
        out = step(token, past_key_values=cache, use_cache=True, **kwargs)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cal-sequences", type=int, default=256)
    parser.add_argument("--cal-len", type=int, default=2048)
    parser.add_argument("--cal-batch", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--compiled", nargs="+", default=["base", "NBL-12", "DROP-12"], choices=["base", *VARIANTS],
        help="models timed with the compiled protocol (each compiles once, about a minute on a GPU)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    args = parser.parse_args()
    if args.tiny:
        args.prompt, args.new_tokens, args.repeats = min(args.prompt, 64), min(args.new_tokens, 8), 1
        args.cal_sequences, args.cal_len, args.cal_batch = 8, 64, 4

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_31_8B))
    with torch.device(device):
        base = random_model(config, dtype)
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "llama-3.1-8b",
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short still leaves what it measured
        (args.out / "gpu_speed_check.json").write_text(json.dumps(report, indent=2) + "\n")

    report["calibration"] = calibration(base, config, device, args.cal_sequences, args.cal_len, args.cal_batch)
    save()
    print(json.dumps(report["calibration"], indent=2), flush=True)

    n = config.num_hidden_layers
    models = {"base": base}
    modes = {"base": {}}
    for name, (k, mode) in VARIANTS.items():
        modes[name] = dict.fromkeys(range(n - k, n), mode)  # which layers does not change speed, only how many
        models[name] = copy.deepcopy(base)
        apply_replacements(models[name], modes[name])
    prompt = random_prompt(base, 1, args.prompt)
    protocols = {"eager": dict.fromkeys(models)}
    if not args.no_compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        names = ["base", *[n for n in args.compiled if n != "base"]]  # ratios need the base row
        protocols["compiled"] = {name: compiled_step(models[name], mode) for name in names}
    samples: dict = {}
    for _ in range(args.repeats + 1):  # first round: warm-up (and compilation)
        for protocol, steps in protocols.items():
            for name in steps:
                m = models[name]
                pre = _timed(lambda m=m: prefill(m, prompt), device)
                per_token = statistics.median(
                    _step_times(m, prompt, args.new_tokens, device, steps[name], static=protocol == "compiled")
                )
                samples.setdefault((protocol, name), []).append((pre, per_token))
    flops, moved = FlopModel(config), BytesModel(config, bytes_per_value=2 if dtype == torch.bfloat16 else 4)
    context = args.prompt + args.new_tokens // 2
    for protocol, steps in protocols.items():
        rows = {}
        for name in steps:
            pre = statistics.median(s[0] for s in samples[(protocol, name)][1:])
            tok = statistics.median(s[1] for s in samples[(protocol, name)][1:])
            rows[name] = {"prefill_tok_s": args.prompt / pre, "decode_ms_per_token": 1000 * tok}
        for name in steps:
            base_row, row = rows["base"], rows[name]
            row["prefill_x"] = row["prefill_tok_s"] / base_row["prefill_tok_s"]
            row["throughput_x"] = base_row["decode_ms_per_token"] / row["decode_ms_per_token"]
            row["prefill_x_flop_model"] = flops.prefill_speedup(modes[name], args.prompt)
            row["throughput_x_flop_model"] = flops.decode_speedup(modes[name], context)
            row["throughput_x_bytes_model"] = moved.decode_speedup(modes[name], context)
            row["paper"] = PAPER.get(name)
        report[protocol] = rows
    save()
    report["memory"] = {name: decode_memory(m, prompt, args.new_tokens) for name, m in models.items()}
    ids = prompt[:, :32]
    kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": 0}
    nbl12 = models["NBL-12"]
    report["cached_equals_uncached_nbl12"] = bool(
        torch.equal(nbl12.generate(ids, use_cache=True, **kwargs), nbl12.generate(ids, use_cache=False, **kwargs))
    )
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
