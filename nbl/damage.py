"""Measured selection: the damage each layer's replacement does on held-out tokens, one layer at a time.

Damage is measured either as the increase of the next-token loss (``measure="loss"``) or as the increase of
the KL divergence from the unmodified model's next-token distributions (``measure="kl"``). The KL measures
how far the model moves from what it was, on any text; the loss also rewards a map that happens to fit the
calibration text better than the attention it replaces, which does not carry over to other text.

The decoder layers' inputs on held-out tokens are computed once; replacing layer i then only needs layers
i..L-1, the final norm and the LM head again, so scoring every layer costs about L/2 forwards, not L.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from nbl.adapters import get_adapter
from nbl.layerwise import LayerInput, capture_layer_inputs, to_device
from nbl.linalg import Ridge, fit_lmmse, ridge_of
from nbl.stats import CovarianceAccumulator
from nbl.surgery import LinearizedDecoderLayer, ReplacementMode, assign_cache_slots, linearize, new_linear

Measure = Literal["loss", "kl"]


@torch.no_grad()
def _final_hidden(model: PreTrainedModel, start: int, item: LayerInput, replacement: nn.Module | None = None
                  ) -> torch.Tensor:  # fmt: skip
    """The final-normed hidden states when layers start..L-1 run on one batch's ``item`` (layer ``start``
    swapped for ``replacement`` if given)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.get_output_embeddings().parameters()).device
    hidden = item.hidden.to(device)
    kwargs = {k: to_device(v, device) for k, v in item.kwargs.items()}
    for i in range(start, len(layers)):
        layer = replacement if (i == start and replacement is not None) else layers[i]
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return adapter.final_norm(model)(hidden)


@torch.no_grad()
def _loss_from(model: PreTrainedModel, start: int, inputs: list[LayerInput], ids: list[torch.Tensor],
               replacement: nn.Module | None = None, reference: Reference | None = None
               ) -> float:  # fmt: skip
    """Mean next-token loss when layers start..L-1 run on ``inputs`` (layer ``start`` swapped for
    ``replacement`` if given); with ``reference`` (the unmodified model's next-token distributions), the mean
    KL(reference || model) instead."""
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for b, (item, batch) in enumerate(zip(inputs, ids, strict=True)):
        log_q = torch.log_softmax(head(_final_hidden(model, start, item, replacement))[:, :-1].float(), dim=-1)
        if reference is None:
            target = batch.to(log_q.device)[:, 1:]
            total -= float(log_q.gather(-1, target.unsqueeze(-1)).sum())
        else:
            probs, plogp = reference[b]
            total += plogp - float((probs.to(log_q.device) * log_q).sum())  # sum p log p - sum p log q
        count += log_q.shape[0] * log_q.shape[1]
    return total / count


@torch.no_grad()
def _inputs_of_every_layer(model: PreTrainedModel, heldout: list[torch.Tensor]) -> list[list[LayerInput]]:
    """What each decoder layer receives on the held-out batches: one forward, every layer's inputs kept."""
    layers = get_adapter(model).layers(model)
    inputs = capture_layer_inputs(model, heldout, _device(model))
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
    measure: Measure = "loss",
    reference: Reference | None = None,
) -> dict[int, float]:
    """Layer -> increase of the damage measure on ``heldout`` (batches of token ids) when that layer alone is
    replaced (its map fitted on ``stats``) in the model as it is. Lower = safer to replace.
    ``candidates``: the layers to try (default: every attention layer in ``stats``); ``reference`` (kl): the
    distributions KL is measured from (default: the model's as it is). The model is not changed."""
    layers = get_adapter(model).layers(model)
    per_layer = _inputs_of_every_layer(model, heldout)
    if measure == "kl" and reference is None:
        reference = reference_states(model, heldout)
    elif measure == "loss":
        reference = None
    base = _loss_from(model, 0, per_layer[0], heldout, reference=reference)
    live = [i for i in stats if not isinstance(layers[i], LinearizedDecoderLayer)]
    todo = live if candidates is None else [i for i in candidates if i in live]
    damage = {}
    for i in tqdm(todo, desc=desc, disable=not progress):
        probe = _probe(model, stats, i, mode, ridge)
        damage[i] = _loss_from(model, i, per_layer[i], heldout, replacement=probe, reference=reference) - base
    return damage


Reference = list[tuple[torch.Tensor, float]]  # per batch: next-token probabilities p, and sum p log p


@torch.no_grad()
def reference_states(model: PreTrainedModel, heldout: list[torch.Tensor]) -> Reference:
    """The model's next-token distributions on every held-out batch, computed once (tokens x vocabulary
    floats: 4 x 512 tokens of a 128 k vocabulary hold 1 GB)."""
    head = model.get_output_embeddings()
    out = []
    for item in capture_layer_inputs(model, heldout, _device(model)):
        log_p = torch.log_softmax(head(_final_hidden(model, 0, item))[:, :-1].float(), dim=-1)
        probs = log_p.exp()
        out.append((probs, float((probs * log_p).sum())))
    return out


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.get_input_embeddings().parameters()).device


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
    measure: Measure = "loss",
) -> list[GreedyStep]:
    """Choose k layers one at a time: each step adds the candidate whose replacement raises the held-out loss
    of the model with the earlier choices already replaced the least (interactions between replaced layers
    count; single-layer damage ignores them). With ``measure="kl"`` the damage is the KL from the unmodified
    model.

    Maps are fitted on ``stats`` (the one-pass statistics; refitting every candidate on the partially
    replaced model's inputs would cost a calibration pass per candidate). Cost: k steps of one forward plus,
    per remaining candidate, the layers from it to the top. ``start``: the first steps of an earlier run with
    the same inputs (greedy steps do not depend on k), continued from there. The model is left as it was.
    """
    pool = sorted(stats) if candidates is None else sorted(set(candidates))
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot choose k={k} layers out of {len(pool)} candidates")
    steps: list[GreedyStep] = list(start[:k])
    reference = reference_states(model, heldout) if measure == "kl" else None
    with layers_restored(model, pool):
        linearize(model, stats, [s.layer for s in steps], mode=mode, ridge=ridge)
        for n in range(len(steps), k):
            left = [i for i in pool if i not in {s.layer for s in steps}]
            damage = single_layer_damage(
                model, stats, heldout, mode, ridge, progress, left, f"greedy step {n + 1}/{k}", measure, reference
            )
            best = min(damage, key=lambda i: (damage[i], i))
            linearize(model, stats, [best], mode=mode, ridge=ridge)
            steps.append(GreedyStep(best, damage[best], (steps[-1].total if steps else 0.0) + damage[best]))
    return steps


@contextmanager
def layers_restored(model: PreTrainedModel, indices: Iterable[int]) -> Iterator[None]:
    """Whatever the block replaces among the decoder layers ``indices``, they are the originals again after it
    (also on errors), with the cache slots of the original layout."""
    layers = get_adapter(model).layers(model)
    originals = {i: layers[i] for i in indices}
    try:
        yield
    finally:
        for i, layer in originals.items():
            layers[i] = layer
        assign_cache_slots(model)


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


def cost_in_passes(n_layers: int, candidates: int, steps: int, heldout_tokens: int, calibration_tokens: int) -> float:
    """What measuring costs, in calibration passes: each step runs the held-out tokens through the model once
    and, per candidate, through the layers from that candidate to the top (about half of them on average)."""
    forwards = steps * (1 + candidates * (n_layers + 1) / (2 * n_layers))
    return forwards * heldout_tokens / calibration_tokens
