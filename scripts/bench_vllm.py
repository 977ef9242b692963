"""SmolLM2 base vs NBL (k = 8, 12), the recommended conv maps (k = 8) and attention drop (k = 8) served by vLLM:
exactness, KV capacity and speed.

    python scripts/bench_vllm.py --out docs/results/vllm            # about 45 minutes on 2 CPU cores, run alone
    python scripts/bench_vllm.py --out /tmp/check --quick           # smaller cases, eager engines

Checkpoints: the paper's rule (CCA bound, linear maps), the same layers with convolution maps of width 2 and rank
d / 4 (the map docs/results.md recommends, without its validation step) and attention drop (cosine), calibrated on
32 x 512 tokens of the packaged LAMBADA text, written by nbl.save_linearized and served by the NBL vLLM plugin. Exactness: vLLM's
greedy tokens and their log-probabilities against transformers on the same checkpoint (nbl.load_linearized), float32.
Speed and capacity: nbl.serve.bench (every engine alive at once, rounds alternating, medians), beside the FLOP and
bytes models' predictions. Writes vllm.json and vllm.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import nbl
from nbl.core.accounting import predicted_speedups
from nbl.data import lambada_passages, token_sequences, wikipedia_passages
from nbl.models import load_smollm2
from nbl.select.ranking import select_layers
from nbl.serve.bench import ServeSettings, measure, ratio_table, transformers_greedy

VARIANTS = {"NBL-8": ("cca", 8, "linear"), "NBL-12": ("cca", 12, "linear"), "CONV-8": ("cca", 8, "conv"),
            "DROP-8": ("cosine", 8, "drop")}  # fmt: skip


def checkpoints(out: Path) -> dict[str, Path]:
    """Base and every variant, written once into ``out``."""
    model, tokenizer = load_smollm2()
    batches = list(token_sequences(tokenizer, lambada_passages(), 32, 512, seed=0).split(4))
    stats = nbl.calibrate(model, batches)
    scores = {"cca": {i: nbl.cca_bound(stats[i]) for i in stats}, "cosine": stats.mean_cosines()}
    folders = {"base": nbl.save_linearized(model, out / "ckpt_base", tokenizer)}
    for name, (rule, k, mode) in VARIANTS.items():
        replaced, _ = load_smollm2()
        layers = select_layers(scores[rule], k, lowest_first=rule == "cca")
        if mode == "conv":  # the shifted inputs' statistics of the chosen layers, one more pass
            conv = nbl.calibrate(replaced, batches, layers=layers, width=2)
            nbl.linearize(replaced, conv, layers, mode="conv", rank=replaced.config.hidden_size // 4)
        else:
            nbl.linearize(replaced, stats, layers, mode=mode)
        folders[name] = nbl.save_linearized(replaced, out / f"ckpt_{name}", tokenizer)
    return folders


def _replaced(folder: Path) -> dict[int, str]:
    return {int(i): m for i, m in json.loads((folder / "nbl.json").read_text())["replaced_layers"].items()}


def exactness(folders: dict[str, Path], served: dict, prompts: list[list[int]], tokens: int) -> dict[str, dict]:
    out = {}
    for name, folder in folders.items():
        reference = transformers_greedy(nbl.load_linearized(folder), prompts, tokens)
        vllm = [[tuple(pair) for pair in row] for row in served[name]["greedy"]]
        same = [[t for t, _ in r] == [t for t, _ in v] for r, v in zip(reference, vllm, strict=True)]
        diffs = [
            abs(a[1] - b[1])
            for r, v in zip(reference, vllm, strict=True)
            for a, b in zip(r, v, strict=True)
            if a[0] == b[0]
        ]
        out[name] = {"same_tokens": same, "max_logprob_diff": max(diffs), "prompts": len(prompts), "tokens": tokens}
    return out


def _rate(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"  # None: noise left the rate unmeasurable


def _budget(results: dict) -> str:
    """The KV budget the engines took (vLLM's own kv_cache_memory_bytes), in GiB."""
    taken = {r.get("kv_cache_bytes") for r in results["served"].values()}
    return " / ".join("?" if b is None else f"{b / 2**30:g} GiB" for b in sorted(taken, key=str))


def table(results: dict, settings: ServeSettings) -> str:
    exact = {
        name: f"{sum(e['same_tokens'])} of {e['prompts']} (max logprob diff {e['max_logprob_diff']:.1e})"
        for name, e in results["exactness"].items()
    }
    lines = ratio_table(results["served"], results["predicted"], ("same greedy tokens", exact))
    lines += [
        "",
        "| model | prefill tok/s | decode tok/s | long-context decode tok/s | batch throughput tok/s "
        "| KV-bound throughput tok/s | prefix-cache hits | preemptions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r['prefill_tok_s']:.0f} | {_rate(r['decode_tok_s'], 2)} | {_rate(r['long_decode_tok_s'], 2)} "
        f"| {r['throughput_tok_s']:.0f} | {_rate(r['concurrent_tok_s'], 1)} | {r['prefix_cache_hits']} "
        f"| {r['preemptions']} |"
        for n, r in results["served"].items()
    ]
    s = settings
    lines += [
        "",
        f"Settings: prompt {s.prompt_len} + {s.new_tokens} tokens at batch 1; {s.batch} prompts of "
        f"{s.batch_prompt_len} + {s.new_tokens}; long context {s.long_prompt_len} + {s.new_tokens}; KV-bound: as "
        f"many requests of {s.long_prompt_len} + {s.new_tokens} at once as the KV budget holds; every prompt new, "
        f"no prefix caching; {s.repeats} rounds after {s.warmup} warm-up, medians; KV budget {_budget(results)} "
        f"each; {s.dtype}; {'eager' if s.enforce_eager else 'compiled'} engines.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_vllm"))
    parser.add_argument("--quick", action="store_true", help="small cases and eager engines (checks the script)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # 32 new tokens and a batch of 32 keep the run under an hour on 2 cores (64 x 64 took 72 s a round); the KV
    # budget holds 10 requests of 2,048 + 32 tokens for the base model
    settings = ServeSettings(new_tokens=32, batch=32, kv_cache_gib=1)
    if args.quick:
        settings = ServeSettings(
            prompt_len=64,
            new_tokens=8,
            batch=4,
            batch_prompt_len=32,
            long_prompt_len=128,
            repeats=1,
            kv_cache_gib=0.05,
            enforce_eager=True,
        )
    folders = checkpoints(args.out)
    _, tokenizer = load_smollm2()
    prompts = token_sequences(tokenizer, wikipedia_passages(), 2, 64, seed=1).tolist()  # text no map was fitted on
    served = measure(folders, settings, greedy=prompts, greedy_tokens=32)
    config = nbl.load_linearized(folders["base"]).config
    conv = (2, config.hidden_size // 4)  # the CONV-8 maps' (width, rank)
    predicted = {
        name: predicted_speedups(config, _replaced(folder), settings.prompt_len, settings.new_tokens, conv=conv)
        for name, folder in folders.items()
        if name != "base"
    }
    results = {
        "served": served,
        "predicted": predicted,
        "exactness": exactness(folders, served, prompts, 32),
        "settings": settings.__dict__,
        "torch_threads": torch.get_num_threads(),
    }
    for r in results["served"].values():
        r.pop("greedy", None)
    (args.out / "vllm.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "vllm.md").write_text(table(results, settings))
    print(table(results, settings))


if __name__ == "__main__":
    main()
