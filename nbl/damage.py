"""Measured selection: the language-model loss each layer's replacement adds, one layer at a time.

The decoder layers' inputs on held-out tokens are computed once; replacing layer i then only needs layers
i..L-1, the final norm and the LM head again, so scoring every layer costs about L/2 forwards, not L.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from nbl.adapters import get_adapter
from nbl.layerwise import LayerInput, capture_layer_inputs, to_device
from nbl.linalg import Ridge, fit_lmmse, ridge_of
from nbl.stats import CovarianceAccumulator
from nbl.surgery import LinearizedDecoderLayer, ReplacementMode, assign_cache_slots, linearize, new_linear


@torch.no_grad()
def _loss_from(model: PreTrainedModel, start: int, inputs: list[LayerInput], ids: list[torch.Tensor],
               replacement: nn.Module | None = None) -> float:  # fmt: skip
    """Mean next-token loss when layers start..L-1 run on ``inputs`` (layer ``start`` swapped for
    ``replacement`` if given)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    head = model.get_output_embeddings()
    device = next(head.parameters()).device
    total, count = 0.0, 0
    for item, batch in zip(inputs, ids, strict=True):
        hidden = item.hidden.to(device)
        kwargs = {k: to_device(v, device) for k, v in item.kwargs.items()}
        for i in range(start, len(layers)):
            layer = replacement if (i == start and replacement is not None) else layers[i]
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = head(adapter.final_norm(model)(hidden))[:, :-1].float()
        target = batch.to(device)[:, 1:]
        total += float(
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        count += target.numel()
    return total / count


@torch.no_grad()
def _inputs_of_every_layer(model: PreTrainedModel, heldout: list[torch.Tensor]) -> list[list[LayerInput]]:
    """What each decoder layer receives on the held-out batches: one forward, every layer's inputs kept."""
    layers = get_adapter(model).layers(model)
    device = next(model.get_input_embeddings().parameters()).device
    inputs = capture_layer_inputs(model, heldout, device)
    per_layer: list[list[LayerInput]] = []
    for i in range(len(layers)):
        per_layer.append([LayerInput(item.hidden, item.kwargs, item.mask) for item in inputs])
        for item in inputs:
            out = layers[i](item.hidden, **item.kwargs)
            item.hidden = out[0] if isinstance(out, tuple) else out
    return per_layer


@torch.no_grad()
def single_layer_damage(
    model: PreTrainedModel,
    stats: Mapping[int, CovarianceAccumulator],
    heldout: list[torch.Tensor],
    mode: ReplacementMode = "linear",
    ridge: Ridge = 0.0,
    progress: bool = True,
    candidates: Iterable[int] | None = None,
    desc: str = "single-layer damage",
) -> dict[int, float]:
    """Layer -> increase of the mean next-token loss on ``heldout`` (batches of token ids) when that layer
    alone is replaced (its map fitted on ``stats``) in the model as it is. Lower = safer to replace.
    ``candidates``: the layers to try (default: every attention layer in ``stats``). The model is not changed."""
    layers = get_adapter(model).layers(model)
    per_layer = _inputs_of_every_layer(model, heldout)
    base = _loss_from(model, 0, per_layer[0], heldout)
    live = [i for i in stats if not isinstance(layers[i], LinearizedDecoderLayer)]
    todo = live if candidates is None else [i for i in candidates if i in live]
    damage = {}
    for i in tqdm(todo, desc=desc, disable=not progress):
        probe = _probe(model, stats, i, mode, ridge)
        damage[i] = _loss_from(model, i, per_layer[i], heldout, replacement=probe) - base
    return damage


@dataclass
class GreedyStep:
    layer: int
    damage: float  # loss increase this layer added, given the layers chosen before it
    total: float  # loss increase of all layers chosen so far (one-pass maps)


@torch.no_grad()
def greedy_selection(
    model: PreTrainedModel,
    stats: Mapping[int, CovarianceAccumulator],
    heldout: list[torch.Tensor],
    k: int,
    mode: ReplacementMode = "linear",
    ridge: Ridge = 0.0,
    candidates: Iterable[int] | None = None,
    progress: bool = True,
    start: Sequence[GreedyStep] = (),
) -> list[GreedyStep]:
    """Choose k layers one at a time: each step adds the candidate whose replacement raises the held-out loss
    of the model with the earlier choices already replaced the least (interactions between replaced layers
    count; single-layer damage ignores them).

    Maps are fitted on ``stats`` (the one-pass statistics; refitting every candidate on the partially
    replaced model's inputs would cost a calibration pass per candidate). Cost: k steps of one forward plus,
    per remaining candidate, the layers from it to the top. ``start``: the first steps of an earlier run with
    the same inputs (greedy steps do not depend on k), continued from there. The model is left as it was.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    pool = sorted(stats) if candidates is None else sorted(set(candidates))
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot choose k={k} layers out of {len(pool)} candidates")
    originals = {i: layers[i] for i in pool}
    steps: list[GreedyStep] = list(start[:k])
    try:
        linearize(model, stats, [s.layer for s in steps], mode=mode, ridge=ridge)
        for n in range(len(steps), k):
            left = [i for i in pool if i not in {s.layer for s in steps}]
            damage = single_layer_damage(
                model, stats, heldout, mode, ridge, progress, candidates=left, desc=f"greedy step {n + 1}/{k}"
            )
            best = min(damage, key=lambda i: (damage[i], i))
            linearize(model, stats, [best], mode=mode, ridge=ridge)
            steps.append(GreedyStep(best, damage[best], (steps[-1].total if steps else 0.0) + damage[best]))
    finally:
        for i, layer in originals.items():
            layers[i] = layer
        assign_cache_slots(model)
    return steps


def _probe(model: PreTrainedModel, stats: Mapping[int, CovarianceAccumulator], i: int, mode: ReplacementMode,
           ridge: Ridge) -> nn.Module:  # fmt: skip
    """Layer i as :func:`nbl.linearize` would replace it, built beside the model (which stays unchanged)."""
    adapter = get_adapter(model)
    original = adapter.layers(model)[i]
    linear = None
    if mode == "linear":
        w, b = fit_lmmse(stats[i], ridge=ridge_of(ridge, i))
        linear = new_linear(model, i, w.shape[0])
        linear.weight.copy_(w.to(linear.weight))
        linear.bias.copy_(b.to(linear.bias))
    return LinearizedDecoderLayer(adapter.mlp(original), adapter.post_attention_norm(original), linear)
