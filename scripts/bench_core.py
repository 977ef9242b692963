"""Core benchmark on the embedded SmolLM2-135M (fp32, CPU): calibration overhead, its memory, prefill speed-up.

    python scripts/bench_core.py [--tokens 4096] [--repeats 5] [--out outputs/bench_core.json]

All ratios come from one process, interleaved after warm-up, medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import nbl
from nbl.core.accounting import FlopModel
from nbl.data import lambada_passages, token_sequences
from nbl.measure.speed import current_rss_bytes, interleaved, peak_rss_bytes, prefill, random_prompt, timed
from nbl.models import load_smollm2
from nbl.select.ranking import select_layers


def _child_peak(phase: str, args: argparse.Namespace) -> int:
    """Peak RSS beyond the loaded model and data of one phase, measured in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--child", phase, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def _phases(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """A plain no-grad forward (LM head included) and a calibration pass over the same tokens."""

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(b, use_cache=False)

    def calibrate() -> None:
        nbl.calibrate(model, batches, progress=False)

    return {"forward": forward, "calibrate": calibrate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (sequences of --seq-len)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replace", type=int, default=15, help="layers linearized for the prefill test")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_core.json"))
    parser.add_argument("--child", choices=["forward", "calibrate"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    n_seq = args.tokens // args.seq_len
    ids = token_sequences(tokenizer, lambada_passages(), n_seq, args.seq_len, seed=0)
    batches = list(ids.split(1))
    phases = _phases(model, batches)
    if args.child:  # one phase in a fresh process: print its peak RSS beyond the loaded model and data
        start = current_rss_bytes()
        phases[args.child]()
        print(peak_rss_bytes() - start)
        return
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    results: dict[str, object] = {"model": "SmolLM2-135M-Instruct fp32", "threads": torch.get_num_threads()}

    # 1. calibration vs a plain no-grad forward (full model, LM head included) over the same tokens
    t = interleaved({name: timed(fn) for name, fn in phases.items()}, repeats=args.repeats, warmup=1)
    results["calibration"] = {
        "tokens": n_seq * args.seq_len,
        "forward_s": t["forward"].median_s,
        "calibrate_s": t["calibrate"].median_s,
        "ratio": t["calibrate"].median_s / t["forward"].median_s,
        "ratio_range": [t["calibrate"].min_s / t["forward"].max_s, t["calibrate"].max_s / t["forward"].min_s],
    }

    # 2. peak memory beyond the loaded model, each phase in a fresh process (VmHWM only grows)
    predicted = n_layers * (3 * d * d + 2 * d) * 8  # five float64 sums per layer
    peaks = {phase: _child_peak(phase, args) for phase in ("forward", "calibrate")}
    results["memory"] = {
        "forward_extra_peak_mb": peaks["forward"] / 2**20,
        "calibration_extra_peak_mb": peaks["calibrate"] / 2**20,
        "calibration_minus_forward_mb": (peaks["calibrate"] - peaks["forward"]) / 2**20,
        "predicted_statistics_mb": predicted / 2**20,
        "formula": "L * (3 d^2 + 2 d) * 8 bytes",
    }

    # 3. prefill speed-up with --replace layers linearized, against the FLOP model
    stats = nbl.calibrate(model, batches, progress=False)
    chosen = select_layers({i: nbl.cca_bound(stats[i]) for i in stats}, args.replace, lowest_first=True)
    linear = copy.deepcopy(model)
    replaced = nbl.linearize(linear, stats, chosen)
    flops = FlopModel(model.config)
    results["prefill"] = {"replaced_layers": chosen}
    for n in args.lengths:
        prompt = random_prompt(model, 1, n)
        t = interleaved(
            {"base": timed(lambda p=prompt: prefill(model, p)), "nbl": timed(lambda p=prompt: prefill(linear, p))},
            repeats=args.repeats,
            warmup=1,
        )
        measured = t["base"].median_s / t["nbl"].median_s
        predicted_x = flops.prefill_speedup(replaced, n)
        results["prefill"][str(n)] = {
            "base_tok_s": n / t["base"].median_s,
            "nbl_tok_s": n / t["nbl"].median_s,
            "measured_speedup": measured,
            "predicted_speedup": predicted_x,
            "measured_over_predicted": measured / predicted_x,
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
