"""How much calibration text do the maps need? The embedded SmolLM2 calibrated on growing prefixes of the
same LAMBADA windows (4 k to 128 k tokens, one pass: each size's sums are the previous size's plus the new
windows'); per size: the held-out error of the maps (relative to the residual stream, on windows no size
used), and the perplexity (Wikipedia stand-in) and SciQ perplexity at k layers chosen by the CCA bound,
with ridge 0 and with the per-layer ridge chosen on the held-out windows (replacement.ridge=auto).

    python scripts/calibration_size.py [--sizes 8 16 32 64 128 256] [--k 8] [--out docs/results/calibration_size]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

import nbl
from nbl.calib.result import CalibrationResult
from nbl.data import lambada_passages, sciq_passages, token_sequences, wikipedia_passages
from nbl.measure.evaluation import perplexity
from nbl.models import load_smollm2
from nbl.select.ranking import auto_ridge, lmmse_scores, select_layers


def _copy(stats: CalibrationResult) -> CalibrationResult:
    return CalibrationResult({i: copy.deepcopy(a) for i, a in stats.accumulators.items()}, dict(stats.cosine_sums))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="windows of 512")
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows after the largest size")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results/calibration_size"))
    args = parser.parse_args()
    sizes = sorted(args.sizes)

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    ids = token_sequences(tokenizer, lambada_passages(), sizes[-1] + args.heldout, args.seq_len, seed=0)
    wiki = token_sequences(tokenizer, wikipedia_passages(), args.eval_windows, args.seq_len, seed=0)
    sciq = token_sequences(tokenizer, sciq_passages(), args.eval_windows, args.seq_len, seed=0)
    held = nbl.calibrate(model, list(ids[sizes[-1] :].split(4)))
    base = {"wikipedia": perplexity(model, wiki), "sciq": perplexity(model, sciq)}

    rows, total, done = [], None, 0
    for size in sizes:
        part = nbl.calibrate(model, list(ids[done:size].split(4)))
        if total is None:
            total = part
        else:
            for i in total:
                total[i].merge(part[i])
                total.cosine_sums[i] += part.cosine_sums[i]
        done = size
        chosen = select_layers({i: nbl.cca_bound(total[i]) for i in total}, args.k, lowest_first=True)
        ridges = {"0": 0.0, "auto": auto_ridge(total, held)}
        for name, ridge in ridges.items():
            errors = lmmse_scores(total, held, ridge)
            replaced = copy.deepcopy(model)
            nbl.linearize(replaced, total, chosen, ridge=ridge)
            row = {
                "tokens": size * args.seq_len,
                "ridge": name,
                "heldout_error_mean": statistics.fmean(errors.values()),
                "heldout_error_chosen": statistics.fmean(errors[i] for i in chosen),
                "layers": chosen,
                "ridges": ridge if name == "0" else [ridge[i] for i in chosen],
                "ppl_wikipedia": perplexity(replaced, wiki),
                "ppl_sciq": perplexity(replaced, sciq),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_size.json").write_text(json.dumps({"base": base, "k": args.k, "rows": rows}, indent=2))
    lines = [
        f"Base perplexity: Wikipedia {base['wikipedia']:.2f}, SciQ {base['sciq']:.2f}; k = {args.k} (CCA bound).\n",
        "| tokens | ridge | held-out error, all layers | held-out error, chosen | perplexity | SciQ perplexity | layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['ridge']} | {r['heldout_error_mean']:.4f} | {r['heldout_error_chosen']:.4f} | "
            f"{r['ppl_wikipedia']:.2f} | {r['ppl_sciq']:.2f} | {' '.join(map(str, r['layers']))} |"
        )
    (args.out / "calibration_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
