"""In-place replacement of attention sub-blocks by a linear map (NBL) or by nothing (attention drop)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from nbl.adapters import get_adapter
from nbl.linalg import fit_lmmse
from nbl.stats import CovarianceAccumulator

ReplacementMode = Literal["linear", "drop"]
MODES: tuple[str, ...] = ("linear", "drop")


class LinearizedDecoderLayer(nn.Module):
    """A decoder layer whose attention sub-block ``h + Attn(LN1(h))`` became ``h + (W h + b)`` or ``h``.

    It keeps the original MLP and post-attention norm under their original names, so checkpoint keys
    of the untouched parts do not change. It mixes no information across tokens: no KV cache, no mask.
    """

    def __init__(self, mlp: nn.Module, post_attention_layernorm: nn.Module, attn_linear: nn.Linear | None) -> None:
        nn.Module.__init__(self)  # not super(): the family's decoder class may follow in the MRO
        self.mlp = mlp
        self.post_attention_layernorm = post_attention_layernorm
        self.attn_linear = attn_linear

    @property
    def mode(self) -> ReplacementMode:
        return "linear" if self.attn_linear is not None else "drop"

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.attn_linear is not None:
            hidden_states = hidden_states + self.attn_linear(hidden_states)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


_FAMILY_CLASSES: dict[type[nn.Module], type[LinearizedDecoderLayer]] = {}


def _linearized_class(original: type[nn.Module]) -> type[LinearizedDecoderLayer]:
    """LinearizedDecoderLayer that is also an instance of the family's decoder-layer class.

    transformers records ``output_hidden_states`` by hooking instances of that class; without this a
    replaced layer would silently drop out of the hidden-state tuple. Only ``forward`` and
    ``__init__`` of LinearizedDecoderLayer run: it comes first in the MRO.
    """
    if issubclass(original, LinearizedDecoderLayer):
        return original
    if original not in _FAMILY_CLASSES:
        _FAMILY_CLASSES[original] = type(f"Linearized{original.__name__}", (LinearizedDecoderLayer, original), {})
    return _FAMILY_CLASSES[original]


def replaced_layers(model: PreTrainedModel) -> dict[int, ReplacementMode]:
    """Layer index -> mode for every replaced layer of ``model``."""
    layers = get_adapter(model).layers(model)
    return {i: layer.mode for i, layer in enumerate(layers) if isinstance(layer, LinearizedDecoderLayer)}


def _validate_layers(model: PreTrainedModel, layers: Iterable[int]) -> list[int]:
    n = len(get_adapter(model).layers(model))
    chosen = [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise IndexError(f"layer indices {bad} out of range for a model with {n} decoder layers")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"duplicate layer indices in {chosen}")
    already = sorted(set(chosen) & set(replaced_layers(model)))
    if already:
        raise ValueError(f"layers {already} are already replaced")
    return sorted(chosen)


def _replace_layer(model: PreTrainedModel, index: int, linear: nn.Linear | None) -> None:
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    old = layers[index]
    cls = _linearized_class(type(old))
    layers[index] = cls(adapter.mlp(old), adapter.post_attention_norm(old), linear)


def assign_cache_slots(model: PreTrainedModel) -> None:
    """Number the remaining attention modules 0..m-1 so they fill the first m KV-cache slots.

    transformers reads the cache length (hence positions and masks) from slot 0; with layer 0
    replaced, slot 0 would stay empty forever and cached generation would break. Compact slots
    keep slot 0 live and leave the unused slots unallocated.
    """
    adapter = get_adapter(model)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    kept = [i for i, layer in enumerate(adapter.layers(model)) if not isinstance(layer, LinearizedDecoderLayer)]
    for slot, index in enumerate(kept):
        if layer_types is not None and layer_types[slot] != layer_types[index]:
            raise NotImplementedError(
                f"layer {index} ({layer_types[index]}) would use cache slot {slot} ({layer_types[slot]}): "
                "models mixing attention types need a type-aware cache layout"
            )
        adapter.attention(adapter.layers(model)[index]).layer_idx = slot


def apply_replacements(model: PreTrainedModel, modes: Mapping[int, ReplacementMode]) -> None:
    """Structural surgery with freshly initialised linear maps (used to rebuild saved checkpoints)."""
    indices = _validate_layers(model, modes)
    d = get_adapter(model).hidden_size(model.config)
    param = next(model.parameters())
    for i in indices:
        if modes[i] not in MODES:
            raise ValueError(f"unknown replacement mode {modes[i]!r}; use one of {MODES}")
        linear = nn.Linear(d, d, bias=True, device=param.device, dtype=param.dtype) if modes[i] == "linear" else None
        _replace_layer(model, i, linear)
    assign_cache_slots(model)


@torch.no_grad()
def linearize(
    model: PreTrainedModel,
    stats: Mapping[int, CovarianceAccumulator],
    layers: Iterable[int],
    mode: ReplacementMode = "linear",
    ridge: float = 0.0,
) -> dict[int, ReplacementMode]:
    """Replace LN1 + attention of each listed layer in place; returns the replaced layers and modes.

    ``stats`` maps a layer index to its calibration accumulator (``CalibrationResult`` works). Every
    map is fitted before the model is touched, so a bad layer leaves the model unchanged.
    """
    if mode not in MODES:
        raise ValueError(f"unknown replacement mode {mode!r}; use one of {MODES}")
    indices = _validate_layers(model, layers)
    param = next(model.parameters())
    linears: dict[int, nn.Linear | None] = {}
    for i in indices:
        if mode == "drop":
            linears[i] = None
            continue
        if i not in stats:
            raise KeyError(f"no calibration statistics for layer {i}")
        w, b = fit_lmmse(stats[i], ridge=ridge)
        d_out, d_in = w.shape
        linear = nn.Linear(d_in, d_out, bias=True, device=param.device, dtype=param.dtype)
        linear.weight.copy_(w.to(linear.weight))
        linear.bias.copy_(b.to(linear.bias))
        linears[i] = linear
    for i, linear in linears.items():
        _replace_layer(model, i, linear)
    assign_cache_slots(model)
    return {i: mode for i in indices}
