"""In-place replacement of decoder sub-blocks by a linear map (NBL) or by nothing (drop).

Three granularities (``Part``), all expressed with two module swaps, so a model may mix them (a sub-block is the
path of modules its family's adapter names, norms on either side included; ``s`` the family's residual scale):
- attention: the decoder layer becomes a :class:`LinearizedDecoderLayer`, ``h + s * path(h)`` ->
  ``h + s * (W h + b)``;
- mlp: inside the layer, the MLP becomes an :class:`MlpMap` and the path's norms the identity, ``h + s * path(h)``
  -> ``h + s * (W h + b)``; the attention (and its KV cache) stays;
- block: the whole layer ``x -> x + Attn(..) + MLP(..)`` becomes ``x + s * (W x + b)``: stored as the layer's
  attention map with its MLP dropped, the same function, so checkpoints and accounting need no third case.

An attention sub-block may also become a :class:`ConvMap` (``mode="conv"``): a map of the last T inputs, whose
decode state (T - 1 hidden vectors per replaced layer) rides on transformers' cache object.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from nbl.core.adapters import get_adapter
from nbl.core.decode_state import ConvSlot, ReplacedSlot, padding_of, slot_of
from nbl.core.linalg import Ridge, fit_lmmse, reduce_rank, ridge_of
from nbl.core.stats import CovarianceAccumulator

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

ReplacementMode = Literal["linear", "drop", "conv"]
ConvShape = tuple[int, "int | None"]  # a conv map's (width, rank): rank None is full rank
MODES: tuple[str, ...] = ("linear", "drop", "conv")
Part = Literal["attention", "mlp", "block"]
PARTS: tuple[str, ...] = ("attention", "mlp", "block")


class MlpMap(nn.Module):
    """Stands in for the MLP path: ``W h + b``, or zero (MLP drop). The layer adds it to the residual stream."""

    def __init__(self, linear: nn.Linear | None) -> None:
        super().__init__()
        self.linear = linear

    @property
    def mode(self) -> ReplacementMode:
        return "linear" if self.linear is not None else "drop"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states) if self.linear is not None else torch.zeros_like(hidden_states)


class ConvMap(nn.Module):
    """``a_t = W [x_t, x_(t-1), ..., x_(t-T+1)] + b``: a causal convolution of width T over the residual stream,
    zeros before a sequence starts (as in :func:`shifted_features`, which its statistics are gathered on).

    ``forward`` takes the T - 1 inputs before a step's together with the step's, so decoding one token at a time
    (the earlier inputs kept in a :class:`~nbl.core.decode_state.ConvSlot`) gives exactly the full-sequence result.

    With a ``rank`` r, W = U V is stored and applied as its two factors (``up``: d x r, ``down``: r x T d):
    2 r (T + 1) d FLOPs per token instead of 2 T d^2 (:func:`~nbl.core.linalg.reduce_rank` fits them).
    """

    def __init__(
        self,
        d: int,
        width: int,
        rank: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if width < 2:
            raise ValueError(f"a convolution map needs width >= 2 (width 1 is mode='linear'), got {width}")
        if rank is not None and not 0 < rank <= d:
            raise ValueError(f"rank must be in 1..{d}, got {rank}")
        self.width = width
        if rank is None:
            self.weight = nn.Parameter(torch.empty(d, width * d, device=device, dtype=dtype))
        else:
            self.down = nn.Parameter(torch.empty(rank, width * d, device=device, dtype=dtype))
            self.up = nn.Parameter(torch.empty(d, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(d, device=device, dtype=dtype))

    @property
    def rank(self) -> int | None:
        return self.down.shape[0] if hasattr(self, "down") else None

    @property
    def shape(self) -> ConvShape:
        return self.width, self.rank

    def load_fit(self, w: torch.Tensor, b: torch.Tensor, up: torch.Tensor | None = None) -> None:
        """Copy a fitted map in: W (d x T d) and b, or, with ``up``, the factors U = ``up`` and V = ``w``."""
        if (up is None) != (self.rank is None):
            raise ValueError(f"a map of rank {self.rank} needs {'no ' if self.rank is None else ''}factors")
        for param, value in ((self.weight, w),) if up is None else ((self.down, w), (self.up, up)):
            param.copy_(value.to(param))
        self.bias.copy_(b.to(self.bias))

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return nn.functional.linear(features, self.weight, self.bias)
        return nn.functional.linear(nn.functional.linear(features, self.down), self.up, self.bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """``window``: (batch, T - 1 + steps, d), the T - 1 inputs before this step's, then the step's; returns the
        map's output at the step's positions, (batch, steps, d)."""
        t = self.width - 1
        steps = window.shape[1] - t
        shifted = [window[:, t - j : t - j + steps] for j in range(self.width)]  # x_t, x_(t-1), ...
        return self._project(torch.cat(shifted, dim=-1))


def shifted_features(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S, d) -> (B, S, width * d): [x_t, x_(t-1), ..., x_(t-width+1)], zeros before each sequence starts."""
    return torch.cat([nn.functional.pad(x, (0, 0, j, 0))[:, : x.shape[1]] for j in range(width)], dim=-1)


class LinearizedDecoderLayer(nn.Module):
    """A decoder layer whose attention sub-block ``h + s * path(h)`` became ``h + s * (W h + b)``, ``h``, or a
    :class:`ConvMap` of the last T inputs (``s``: the family's residual scale, 1 but Granite).

    It keeps the modules of the MLP path under their original names (``mlp_path``, in the order they apply), so
    checkpoint keys of the untouched parts do not change. No KV cache, no mask: a linear map mixes no information
    across tokens, a conv map only the last T inputs. With a cache it owns the slot ``cache_slot`` there
    (:mod:`nbl.core.decode_state`): empty, or a conv map's last T - 1 inputs.
    """

    def __init__(self, mlp_path: dict[str, nn.Module], attn_linear: nn.Linear | ConvMap | None, scale: float = 1.0
                 ) -> None:  # fmt: skip
        nn.Module.__init__(self)  # not super(): the family's decoder class may follow in the MRO
        for name, module in mlp_path.items():
            setattr(self, name, module)
        self.mlp_path = tuple(mlp_path)
        self.residual_scale = scale
        self.attn_linear = attn_linear
        self.cache_slot: int | None = None  # set by assign_cache_slots

    _family: type[nn.Module] | None = None  # the decoder-layer class it stands in for (set per family)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # the per-family class is built at run time and cannot be found by name: pickle the family instead
        return _rebuild_linearized, (self._family,), self.__dict__

    @property
    def mode(self) -> ReplacementMode:
        if isinstance(self.attn_linear, ConvMap):
            return "conv"
        return "linear" if self.attn_linear is not None else "drop"

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: Any) -> torch.Tensor:
        cache = kwargs.get("past_key_values") if kwargs.get("use_cache", True) else None
        slot = self.slot(cache) if cache is not None and self.cache_slot is not None else None
        conv = self.attn_linear if isinstance(self.attn_linear, ConvMap) else None
        if conv is not None:
            x = hidden_states
            padding = padding_of(x)
            if padding is not None:  # padding enters the convolution as zeros (the statistics count it so)
                x = x * padding
            state = slot if isinstance(slot, ConvSlot) else ConvSlot(conv.width)  # no cache: a sequence's start
            hidden_states = hidden_states + self._scaled(conv(state.extend(x)))
        elif self.attn_linear is not None:
            hidden_states = hidden_states + self._scaled(self.attn_linear(hidden_states))
        added = hidden_states
        for name in self.mlp_path:
            added = getattr(self, name)(added)
        return hidden_states + self._scaled(added)

    def _scaled(self, added: torch.Tensor) -> torch.Tensor:
        return added if self.residual_scale == 1.0 else added * self.residual_scale

    def slot(self, cache: Cache) -> ReplacedSlot:
        """This layer's slot in ``cache``, put in place if the cache has none there yet."""
        conv = self.attn_linear
        return slot_of(cache, self.cache_slot, (lambda: ConvSlot(conv.width)) if isinstance(conv, ConvMap) else ReplacedSlot)


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
        _FAMILY_CLASSES[original] = type(
            f"Linearized{original.__name__}", (LinearizedDecoderLayer, original), {"_family": original}
        )
    return _FAMILY_CLASSES[original]


def _rebuild_linearized(family: type[nn.Module] | None) -> LinearizedDecoderLayer:
    """Unpickling: an empty instance of the family's linearized class (pickle then restores its state)."""
    cls = LinearizedDecoderLayer if family is None else _linearized_class(family)
    return cls.__new__(cls)


def replaced_layers(model: PreTrainedModel) -> dict[int, ReplacementMode]:
    """Layer index -> mode for every layer of ``model`` whose attention is replaced (attention or block)."""
    layers = get_adapter(model).layers(model)
    return {i: layer.mode for i, layer in enumerate(layers) if isinstance(layer, LinearizedDecoderLayer)}


def replaced_mlps(model: PreTrainedModel) -> dict[int, ReplacementMode]:
    """Layer index -> mode for every layer of ``model`` whose MLP is replaced (mlp, or block: dropped there)."""
    adapter = get_adapter(model)
    return {i: m.mode for i, layer in enumerate(adapter.layers(model)) if isinstance(m := adapter.mlp(layer), MlpMap)}


def conv_shapes(model: PreTrainedModel) -> dict[int, ConvShape]:
    """Layer index -> (width, rank) of each attention replaced by a :class:`ConvMap`."""
    layers = get_adapter(model).layers(model)
    return {i: m.shape for i, layer in enumerate(layers) if isinstance(m := getattr(layer, "attn_linear", None), ConvMap)}


def first_conv_shape(model: PreTrainedModel) -> ConvShape:
    """The (width, rank) of the model's conv maps (a run fits all of them alike; (2, None) when it has none): what
    the FLOP and bytes models count them as."""
    return next(iter(conv_shapes(model).values()), (2, None))


def live_layers(model: PreTrainedModel, part: Part) -> list[int]:
    """The layers whose ``part`` is still there to calibrate or replace (a block: attention and MLP both)."""
    gone = set(replaced_layers(model)) if part != "mlp" else set()
    if part != "attention":
        gone |= set(replaced_mlps(model))
    return [i for i in range(len(get_adapter(model).layers(model))) if i not in gone]


def validate_layers(model: PreTrainedModel, layers: Iterable[int], part: Part = "attention") -> list[int]:
    """``layers`` as sorted ints, refused unless they are integer indices, in range, distinct and their ``part``
    is not replaced yet (a block: neither its attention nor its MLP)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; use one of {PARTS}")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of layer indices, got {layers!r}")
    chosen = []
    for i in layers:
        if isinstance(i, bool):
            raise TypeError(f"layer index {i!r} is not an integer")
        try:
            chosen.append(operator.index(i))  # ints and integer tensors/numpy scalars; never 1.5 or "1"
        except TypeError:
            raise TypeError(f"layer index {i!r} is not an integer") from None
    n = len(get_adapter(model).layers(model))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise IndexError(f"layer indices {bad} out of range for a model with {n} decoder layers")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"duplicate layer indices in {chosen}")
    already = sorted(set(chosen) - set(live_layers(model, part)))
    if already:
        raise ValueError(f"layers {already} already have a replaced {'sub-block' if part == 'block' else part}")
    return sorted(chosen)


def _replace_layer(model: PreTrainedModel, index: int, linear: nn.Linear | ConvMap | None) -> None:
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    old = layers[index]
    cls = _linearized_class(type(old))
    new = cls(adapter.path(old, "mlp"), linear, adapter.residual_scale(model.config))
    if _accelerate_hook(old) is not None:
        # a dispatched model (device_map): the old layer's hook moved the hidden states onto its device;
        # the new layer gets one that does the same (the MLP and norm keep their own, offloading, hooks)
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(new, AlignDevicesHook(execution_device=execution_device(old), io_same_device=False))
    layers[index] = new


def _replace_mlp(model: PreTrainedModel, index: int, linear: nn.Linear | None) -> None:
    """The MLP path of layer ``index`` (its norms and the MLP) -> :class:`MlpMap` where the MLP was, the identity
    where its norms were (works in original and linearized layers alike)."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[index]
    path = adapter.path(layer, "mlp")
    adapter.set_mlp_path(layer, {name: MlpMap(linear) if m is adapter.mlp(layer) else nn.Identity()
                                 for name, m in path.items()})  # fmt: skip


def _replace(model: PreTrainedModel, index: int, part: Part, linear: nn.Linear | ConvMap | None) -> None:
    if part == "mlp":
        _replace_mlp(model, index, linear)
        return
    _replace_layer(model, index, linear)
    if part == "block":  # x + (W x + b): the map where the attention was, nothing where the MLP was
        _replace_mlp(model, index, None)


def _accelerate_hook(module: nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it is dispatched (its weights may then
    be offloaded to the meta device), else the device of its parameters."""
    for sub in module.modules():
        hook = _accelerate_hook(sub)
        hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
        for h in hooks:
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def _slot_types(model: PreTrainedModel) -> list[str]:
    """The attention type of each slot of a cache made for the model's configuration (one slot per layer)."""
    n = len(get_adapter(model).layers(model))
    types = getattr(model.config, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * n


def slot_plan(model: PreTrainedModel, replaced: Iterable[int]) -> dict[int, int]:
    """Layer index -> KV-cache slot for the layers that keep attention once ``replaced`` are gone.

    A cache made for the model's configuration has one slot per layer, of that layer's attention type (full, or
    sliding within a window: ``config.layer_types``). Each kept layer takes the first free slot of its own type, so
    the kept attentions of each type fill that type's first slots, in layer order (with one type: slots 0..m-1);
    the replaced layers own the slots left over (:func:`assign_cache_slots`), which hold no keys or values.
    transformers reads the cache length (hence positions) from slot 0 and each type's masks from the first slot of
    that type, so those are live. Raises before any surgery when every kept layer differs in type from slot 0.
    """
    gone, types = set(replaced), _slot_types(model)
    free: dict[str, list[int]] = {}
    for slot, kind in enumerate(types):
        free.setdefault(kind, []).append(slot)
    plan = {i: free[types[i]].pop(0) for i in range(len(types)) if i not in gone}
    if plan and 0 not in plan.values():
        raise NotImplementedError(
            f"every {types[0]} layer would be replaced while others keep their attention: transformers reads "
            f"positions from cache slot 0, which only a {types[0]} layer fills; keep one of them"
        )
    return plan


def assign_cache_slots(model: PreTrainedModel) -> None:
    """Renumber the remaining attention modules into their cache slots (see :func:`slot_plan`); each replaced layer
    takes one of the slots left over, in layer order (:mod:`nbl.core.decode_state`)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    kept = slot_plan(model, replaced_layers(model))
    for index, slot in kept.items():
        adapter.attention(layers[index]).layer_idx = slot
    left = [slot for slot in range(len(layers)) if slot not in set(kept.values())]
    replaced = [layer for layer in layers if isinstance(layer, LinearizedDecoderLayer)]
    for slot, layer in zip(left, replaced, strict=True):
        layer.cache_slot = slot
    from nbl.core.causal_lm import adopt

    adopt(model)


def install_cache_slots(model: PreTrainedModel, cache: Cache) -> None:
    """Put every replaced layer's slot in ``cache`` (generation does it as soon as it makes the cache)."""
    for layer in get_adapter(model).layers(model):
        if isinstance(layer, LinearizedDecoderLayer) and layer.cache_slot is not None:
            layer.slot(cache)


def _placement(model: PreTrainedModel, index: int) -> dict[str, Any]:
    """Where a new map of layer ``index`` lives: the layer's execution device, its dtype."""
    layer = get_adapter(model).layers(model)[index]
    dtype = next(itertools.chain(layer.parameters(), model.parameters())).dtype  # a dropped block has none
    return {"device": execution_device(layer), "dtype": dtype}


def new_linear(model: PreTrainedModel, index: int, d: int) -> nn.Linear:
    """An empty d x d map for layer ``index``: on the layer's execution device, in its dtype."""
    return nn.Linear(d, d, bias=True, **_placement(model, index))


def new_conv(model: PreTrainedModel, index: int, d: int, shape: ConvShape) -> ConvMap:
    """An empty convolution map of ``shape`` (width, rank) for layer ``index``, placed like :func:`new_linear`."""
    return ConvMap(d, *shape, **_placement(model, index))


def apply_replacements(
    model: PreTrainedModel,
    modes: Mapping[int, ReplacementMode],
    part: Part = "attention",
    conv: Mapping[int, ConvShape] | None = None,
) -> None:
    """Structural surgery with freshly initialised maps (used to rebuild saved checkpoints); ``conv``: the
    (width, rank) of each conv map."""
    indices = validate_layers(model, modes, part)
    bad = {i: modes[i] for i in indices if modes[i] not in MODES or (modes[i] == "conv" and part != "attention")}
    if bad:
        raise ValueError(f"unknown replacement modes {bad} for part {part}; use one of {MODES} (conv: attention)")
    missing = [i for i in indices if modes[i] == "conv" and (conv is None or i not in conv)]
    if missing:
        raise ValueError(f"conv maps of layers {missing} have no width")
    if part != "mlp":
        slot_plan(model, set(indices) | set(replaced_layers(model)))
    d = get_adapter(model).hidden_size(model.config)
    for i in indices:
        if modes[i] == "linear":
            new: nn.Linear | ConvMap | None = new_linear(model, i, d)
        else:
            new = new_conv(model, i, d, conv[i]) if modes[i] == "conv" else None  # type: ignore[index]
        _replace(model, i, part, new)
    assign_cache_slots(model)


def _fitted_map(
    model: PreTrainedModel,
    index: int,
    acc: CovarianceAccumulator,
    fitted: tuple[torch.Tensor, torch.Tensor],
    conv: ConvShape | None,
) -> nn.Linear | ConvMap:
    """The map of layer ``index`` holding the fitted (W, b): a d x d linear map, or a conv map of ``conv``'s
    (width, rank), cut to that rank on ``acc`` (reduced-rank regression)."""
    (w, b), d = fitted, acc.d_out
    if conv is None:
        linear = new_linear(model, index, d)
        linear.weight.copy_(w.to(linear.weight))
        linear.bias.copy_(b.to(linear.bias))
        return linear
    new = new_conv(model, index, d, conv)
    if conv[1] is None:
        new.load_fit(w, b)
    else:
        up, down, b = reduce_rank(w, acc, conv[1])
        new.load_fit(down, b, up=up)
    return new


@torch.no_grad()
def linearize(
    model: PreTrainedModel,
    stats: Mapping[int, CovarianceAccumulator],
    layers: Iterable[int],
    mode: ReplacementMode = "linear",
    ridge: Ridge = 0.0,
    part: Part = "attention",
    maps: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    rank: int | None = None,
) -> dict[int, ReplacementMode]:
    """Replace ``part`` (the attention path, the MLP path, or the whole block) of each listed layer in place;
    returns the replaced layers and modes.

    ``stats`` maps a layer index to its calibration accumulator for that part (``CalibrationResult`` works); for
    ``mode="conv"`` (attention only), the statistics of the shifted inputs (:func:`shifted_features`), whose width
    sets the map's, and ``rank`` (None: full) cuts it to that rank by reduced-rank regression.
    ``maps``: (W, b) already fitted on those statistics, per layer (the fit is skipped for them: whoever replaces
    the same layers many times fits each once). All or nothing: the layers, the statistics' shapes, every fitted
    map (finite) and the cache-slot layout are checked before the model is touched, so any error leaves the
    model as it was.
    """
    if mode not in MODES:
        raise ValueError(f"unknown replacement mode {mode!r}; use one of {MODES}")
    indices = validate_layers(model, layers, part)
    d = get_adapter(model).hidden_size(model.config)
    linears: dict[int, nn.Linear | ConvMap | None] = {}
    for i in indices:
        if mode == "drop":
            linears[i] = None
            continue
        if i not in stats:
            raise KeyError(f"no calibration statistics for layer {i}")
        acc = stats[i]
        width = acc.d_in // d if mode == "conv" else 1
        if acc.d_out != d or acc.d_in != width * d or (mode == "conv" and (width < 2 or part != "attention")):
            expected = f"{d} x (T {d}), T >= 2" if mode == "conv" else f"{d} x {d}"
            raise ValueError(
                f"statistics of layer {i} are {acc.d_out} x {acc.d_in} for mode {mode} of part {part}; this model's "
                f"hidden size is {d} ({expected} needed): they were computed on another model or for another map"
            )
        fitted = maps[i] if maps is not None and i in maps else fit_lmmse(acc, ridge=ridge_of(ridge, i))
        linear = _fitted_map(model, i, acc, fitted, (width, rank) if mode == "conv" else None)
        if not all(torch.isfinite(p).all() for p in linear.parameters()):
            raise ValueError(f"the map of layer {i} overflows {linear.bias.dtype}: try a ridge > 0")
        linears[i] = linear
    if part != "mlp":
        slot_plan(model, set(indices) | set(replaced_layers(model)))
    for i, linear in linears.items():
        _replace(model, i, part, linear)
    assign_cache_slots(model)
    return {i: mode for i in indices}
