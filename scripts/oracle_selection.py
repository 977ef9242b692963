"""How good can any choice of layers be? An oracle that peeks at the evaluation texts (for analysis only).

Every layer of the embedded SmolLM2 is linearized alone (maps fitted on the calibration text, as a run
fits them) and its log-perplexity increase is measured on the evaluation windows themselves (the Wikipedia
stand-in and SciQ, the same 16 x 512 tokens a run scores). The k layers with the smallest increase on one
text are then replaced together and scored on both. No selection rule may see these texts, so this bounds
from below what selection alone can reach with NBL's maps (up to interactions between layers, which the
sum of single-layer increases leaves out).

    python scripts/oracle_selection.py [--calibration lambada] [--k 4 8 12 16] [--out docs/results/oracle]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

import nbl
from nbl.data import load_texts, token_sequences
from nbl.measure.evaluation import perplexity
from nbl.models import load_smollm2
from nbl.select.damage import Probe, single_layer_damage
from nbl.select.ranking import select_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", default="lambada", help="calibration text (a nbl.data source)")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows of --seq-len tokens")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results/oracle"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    cal = token_sequences(tokenizer, load_texts(args.calibration), args.windows, args.seq_len, seed=0)
    stats = nbl.calibrate(model, list(cal.split(4)))
    texts = {name: token_sequences(tokenizer, load_texts(name), args.eval_windows, args.seq_len, seed=0)
             for name in ("wikipedia", "sciq")}  # fmt: skip
    base = {name: perplexity(model, ids) for name, ids in texts.items()}
    # loss increase in nats = log-perplexity increase; one window per batch, as nbl.measure.evaluation scores them
    damage = {
        name: single_layer_damage(Probe(model, stats, list(ids.split(1))), desc=f"single-layer damage on {name}")
        for name, ids in texts.items()
    }
    rows = []
    for peek in texts:
        for k in args.k:
            chosen = select_layers(damage[peek], k, lowest_first=True)
            replaced = copy.deepcopy(model)
            nbl.linearize(replaced, stats, chosen)
            row = {"peeks_at": peek, "k": k, "layers": chosen,
                   "sum_of_single": sum(damage[peek][i] for i in chosen),
                   **{f"ppl_{name}": perplexity(replaced, ids) for name, ids in texts.items()}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"calibration": args.calibration, "base": base, "single_layer": damage, "rows": rows}
    (args.out / f"oracle_{args.calibration}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Calibration: {args.calibration}, {args.windows} x {args.seq_len} tokens. Base perplexity: Wikipedia "
        f"{base['wikipedia']:.2f}, SciQ {base['sciq']:.2f}.\n",
        "| layers chosen on | k | sum of single-layer increases (nats) | predicted perplexity | perplexity "
        "| SciQ perplexity | layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        predicted = base[r["peeks_at"]] * math.exp(r["sum_of_single"])
        lines.append(
            f"| {r['peeks_at']} | {r['k']} | {r['sum_of_single']:.3f} | {predicted:.2f} | {r['ppl_wikipedia']:.2f} | "
            f"{r['ppl_sciq']:.2f} | {' '.join(map(str, r['layers']))} |"
        )
    (args.out / f"oracle_{args.calibration}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
