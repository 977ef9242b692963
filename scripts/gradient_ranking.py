"""A first-order estimate of single-layer damage against the measured one (issue 21, cheaper selection).

    python scripts/gradient_ranking.py --out docs/results/gradient_ranking     # about 5 minutes on 2 cores

SmolLM2, the default calibration (32 x 512 LAMBADA tokens), the held-out windows selection=recommended measures
on (8 x 512 tokens of the packaged mixed-genre text). One forward and backward pass over those windows gives, for
every layer at once, the gradient g_t of the summed held-out loss at the attention's output and the error e_t the
layer's one-token map would make there (W x_t + b - a_t); per layer:
- first order: sum_t g_t . e_t / N, the loss change a small perturbation e would cause;
- squared: sum_t (g_t . e_t)^2, the per-token first-order changes squared (a Gauss-Newton-like proxy for the
  curvature term, which the first-order term misses when e is uncorrelated with g on average).
Both are compared (Spearman) with the measured single-layer damages (nbl.select.damage.single_layer_damage, the
ranking selection=validated uses) and their top-k sets are printed for evaluation. Writes gradient_ranking.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from nbl.calib.hooks import calibrate
from nbl.core.linalg import fit_lmmse
from nbl.data import lambada_passages, load_texts, token_sequences
from nbl.models import load_smollm2
from nbl.select.damage import Probe, single_layer_damage


def gradient_estimates(model, stats, heldout: list[torch.Tensor]) -> dict[str, list[float]]:
    layers = model.model.layers
    maps = {i: [t.float() for t in fit_lmmse(stats[i])] for i in range(len(layers))}
    first = torch.zeros(len(layers), dtype=torch.float64)
    squared = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))

        def attention_output(module, args, out, i=i):
            w, b = maps[i]
            error = (inputs.pop(i).detach() @ w.T + b - out[0].detach()).double()

            def on_gradient(g: torch.Tensor) -> None:
                change = (g.double() * error).sum(-1)
                first[i] += change.sum()
                squared[i] += (change**2).sum()

            out[0].register_hook(on_gradient)

        handles.append(layer.self_attn.register_forward_hook(attention_output))
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = 0
    try:
        for ids in heldout:
            embeds = model.get_input_embeddings()(ids).requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            loss.backward()
            tokens += ids[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    return {"first_order": (first / tokens).tolist(), "squared": squared.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gradient_ranking"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_smollm2()
    calibration = list(token_sequences(tokenizer, lambada_passages(), 32, 512, seed=0).split(1))
    heldout = list(token_sequences(tokenizer, load_texts("mixed"), 8, 512, seed=0).split(1))
    stats = calibrate(model, calibration)
    start = time.perf_counter()
    estimates = gradient_estimates(model, stats, heldout)
    gradient_s = time.perf_counter() - start
    start = time.perf_counter()
    damage = single_layer_damage(Probe(model, stats, heldout))
    damage_s = time.perf_counter() - start
    measured = [damage[i] for i in range(len(damage))]
    result = {
        "measured_damage": measured,
        **estimates,
        "seconds": {"gradient": gradient_s, "measured": damage_s},
        "spearman": {name: float(spearmanr(estimates[name], measured)[0]) for name in estimates},
        "sets": {
            name: {k: sorted(sorted(range(len(values)), key=values.__getitem__)[:k]) for k in (4, 8, 12, 16)}
            for name, values in (("measured_damage", measured), ("squared", estimates["squared"]))
        },
    }
    (args.out / "gradient_ranking.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "spearman", "sets")}, indent=2))


if __name__ == "__main__":
    main()
