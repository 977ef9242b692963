"""The estimated single-layer damages (selection.damage=estimated) against the measured ones, with both costs.

    python scripts/damage_estimate.py --out docs/results/damage_estimate     # about 6 minutes on 2 cores

SmolLM2, the default calibration (32 x 512 LAMBADA tokens, batches of 4), the held-out windows selection=recommended
measures on (8 x 512 tokens of the packaged mixed-genre text). Per layer: the measured loss increase
(nbl.select.damage.single_layer_damage, each layer replaced in turn and the held-out windows run from it to the top),
the estimate (nbl.select.estimate: the replaced layer run exactly, the loss above it to second order) and its
first-order term alone. Prints and writes the Spearman correlations, the top-k sets of each, and the seconds of the
calibration pass, the estimate and the measurement, all in this one run (damage_estimate.json, damage_estimate.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import spearmanr

from nbl.calib.hooks import calibrate
from nbl.data import lambada_passages, load_texts, token_sequences
from nbl.models import load_smollm2
from nbl.select.damage import Probe, single_layer_damage
from nbl.select.estimate import taylor_terms
from nbl.select.ranking import select_layers

KS = (4, 8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/damage_estimate"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    calibration = list(token_sequences(tokenizer, lambada_passages(), 32, 512, seed=0).split(4))
    heldout = list(token_sequences(tokenizer, load_texts("mixed"), 8, 512, seed=0).split(4))
    seconds = {}
    start = time.perf_counter()
    stats = calibrate(model, calibration)
    seconds["calibration pass"] = time.perf_counter() - start
    start = time.perf_counter()
    terms, _ = taylor_terms(Probe(model, stats, heldout))
    seconds["estimate"] = time.perf_counter() - start
    start = time.perf_counter()
    measured = single_layer_damage(Probe(model, stats, heldout))
    seconds["measured"] = time.perf_counter() - start
    layers = sorted(measured)
    rankings = {
        "measured": measured,
        "estimate": {i: terms[i].damage for i in layers},
        "first order": {i: terms[i].first / terms[i].tokens for i in layers},
    }
    result = {
        "damage": {name: [values[i] for i in layers] for name, values in rankings.items()},
        "seconds": seconds,
        "spearman": {
            name: float(spearmanr([values[i] for i in layers], [measured[i] for i in layers])[0])
            for name, values in rankings.items() if name != "measured"
        },
        "sets": {name: {k: select_layers(values, k, lowest_first=True) for k in KS} for name, values in rankings.items()},
    }
    (args.out / "damage_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| k | measured damage's layers | estimate's layers | shared |",
        "|---|---|---|---|",
        *(
            f"| {k} | {' '.join(map(str, result['sets']['measured'][k]))} | "
            f"{' '.join(map(str, result['sets']['estimate'][k]))} | "
            f"{len(set(result['sets']['measured'][k]) & set(result['sets']['estimate'][k]))} |"
            for k in KS
        ),
        "",
        "Spearman against the measured damages: "
        + ", ".join(f"{name} {rho:.2f}" for name, rho in result["spearman"].items()),
        "",
        "Seconds in this run: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items()),
    ]
    (args.out / "damage_estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
