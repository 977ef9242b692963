"""Measured selection: the language-model loss each layer's replacement adds, one layer at a time.

The decoder layers' inputs on held-out tokens are computed once; replacing layer i then only needs layers
i..L-1, the final norm and the LM head again, so scoring every layer costs about L/2 forwards, not L.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from nbl.adapters import get_adapter
from nbl.layerwise import LayerInput, capture_layer_inputs, to_device
from nbl.linalg import fit_lmmse
from nbl.stats import CovarianceAccumulator
from nbl.surgery import LinearizedDecoderLayer, ReplacementMode, new_linear


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
def single_layer_damage(
    model: PreTrainedModel,
    stats: Mapping[int, CovarianceAccumulator],
    heldout: list[torch.Tensor],
    mode: ReplacementMode = "linear",
    ridge: float = 0.0,
    progress: bool = True,
) -> dict[int, float]:
    """Layer -> increase of the mean next-token loss on ``heldout`` (batches of token ids) when that layer
    alone is replaced (its map fitted on ``stats``). Lower = safer to replace. The model is not changed."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    device = next(model.get_input_embeddings().parameters()).device
    inputs = capture_layer_inputs(model, heldout, device)
    per_layer: list[list[LayerInput]] = []
    for i in range(len(layers)):  # the inputs of every layer, once
        per_layer.append([LayerInput(item.hidden, item.kwargs, item.mask) for item in inputs])
        for item in inputs:
            out = layers[i](item.hidden, **item.kwargs)
            item.hidden = out[0] if isinstance(out, tuple) else out
    base = _loss_from(model, 0, per_layer[0], heldout)
    damage = {}
    candidates = [i for i in stats if not isinstance(layers[i], LinearizedDecoderLayer)]
    for i in tqdm(candidates, desc="single-layer damage", disable=not progress):
        probe = _probe(model, stats, i, mode, ridge)
        damage[i] = _loss_from(model, i, per_layer[i], heldout, replacement=probe) - base
    return damage


def _probe(model: PreTrainedModel, stats: Mapping[int, CovarianceAccumulator], i: int, mode: ReplacementMode,
           ridge: float) -> nn.Module:  # fmt: skip
    """Layer i as :func:`nbl.linearize` would replace it, built beside the model (which stays unchanged)."""
    adapter = get_adapter(model)
    original = adapter.layers(model)[i]
    linear = None
    if mode == "linear":
        w, b = fit_lmmse(stats[i], ridge=ridge)
        linear = new_linear(model, i, w.shape[0])
        linear.weight.copy_(w.to(linear.weight))
        linear.bias.copy_(b.to(linear.bias))
    return LinearizedDecoderLayer(adapter.mlp(original), adapter.post_attention_norm(original), linear)
