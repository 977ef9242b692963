"""Layer-by-layer calibration: the hidden states of every batch are carried from one decoder layer to the next.

Only the layer being processed has to sit on the compute device ("onloading", as llm-compressor and
SliceGPT do): the embedding runs once, then each layer runs on all batches, its statistics are
accumulated, and its outputs become the next layer's inputs. A model larger than the device fits as
long as one layer and the carried activations (tokens x d) do.

The same pass can replace layers as it goes (:func:`refit_propagated`): a chosen layer's map is fitted on
the inputs that the already-replaced earlier layers really produce, then that layer's output is computed
with the map, so every later layer sees the replaced model's activations. One pass for k layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from nbl.adapters import get_adapter
from nbl.calibration import (
    Batch,
    CalibrationResult,
    SubBlockTap,
    check_token_count,
    raise_on_overflow,
    unpack_batch,
)
from nbl.linalg import Ridge
from nbl.surgery import (
    Part,
    ReplacementMode,
    assign_cache_slots,
    linearize,
    live_layers,
    replaced_layers,
    slot_plan,
    validate_layers,
)


class _Stop(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded: the rest of the forward is not needed."""


@dataclass
class LayerInput:
    """What one batch hands to a decoder layer: the hidden states and the keyword arguments (mask, rotary)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # attention_mask of the batch (padding), for the statistics


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of them (rotary cos/sin), on ``device``; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def _uniform_attention(model: PreTrainedModel) -> None:
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise NotImplementedError(
            f"layer-by-layer calibration passes one attention mask to every layer; this model mixes {sorted(set(types))}"
        )


@torch.no_grad()
def capture_layer_inputs(model: PreTrainedModel, batches: Iterable[Batch], store: torch.device) -> list[LayerInput]:
    """Run only the embedding (and mask / rotary set-up) of every batch, where the embedding's weights are;
    keep what layer 0 receives on ``store``."""
    adapter = get_adapter(model)
    embed_device = next(model.get_input_embeddings().parameters()).device
    first = adapter.layers(model)[0]
    captured: list[LayerInput] = []
    current: dict[str, torch.Tensor | None] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: to_device(v, store) for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        captured.append(LayerInput(hidden.to(store), kwargs, current["mask"]))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            input_ids, mask = unpack_batch(batch, embed_device)
            current["mask"] = None if mask is None else mask.to(store)
            try:
                adapter.backbone(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(
    model: PreTrainedModel,
    i: int,
    inputs: Sequence[LayerInput],
    store: torch.device,
    taps: Mapping[Part, CalibrationResult] | None = None,
    carry: bool = True,
) -> None:
    """Run layer i on every batch: statistics of layer i into ``taps`` (per part, those holding it) and, with
    ``carry``, outputs replace inputs."""
    layer = get_adapter(model).layers(model)[i]
    device = next(layer.parameters()).device
    ones = {p: CalibrationResult({i: r[i]}, r.cosine_sums) for p, r in (taps or {}).items() if i in r.accumulators}
    with SubBlockTap(model, ones) if ones else nullcontext() as hooks:  # this layer's hooks only
        for b, item in enumerate(inputs):
            if hooks is not None:
                hooks.mask = item.mask
            out = layer(item.hidden.to(device), **{k: to_device(v, device) for k, v in item.kwargs.items()})
            for one in ones.values():
                raise_on_overflow(one, b, item.hidden.dtype)
            if carry:
                item.hidden = (out[0] if isinstance(out, tuple) else out).to(store)


@torch.no_grad()
def _layer_pass(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    device: torch.device | None,
    store: torch.device | None,
    progress: bool,
    desc: str,
    taps: Mapping[Part, CalibrationResult] | None = None,
    before_run: Callable[[int, list[LayerInput]], None] | None = None,
) -> None:
    """Capture layer 0's inputs, then for each layer: onload it, ``before_run`` (which may replace it), run it on
    every batch (statistics of the layers in ``taps`` gathered on the way), offload it."""
    _uniform_attention(model)
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise NotImplementedError("layer-by-layer calibration moves layers itself: load the model without device_map")
    layers = get_adapter(model).layers(model)
    device = device or next(model.get_input_embeddings().parameters()).device
    store = store or device
    was_training = model.training
    model.eval()
    try:
        inputs = capture_layer_inputs(model, batches, store)
        for i in tqdm(range(len(layers)), desc=desc, disable=not progress):
            original = layers[i]
            home = next(original.parameters()).device
            original.to(device)
            try:
                if before_run is not None:
                    before_run(i, inputs)
                _run_layer(model, i, inputs, store, taps)
                for result in (taps or {}).values():
                    if (
                        i in result.accumulators
                    ):  # finished sums wait with the activations: the device holds one layer's
                        result[i].move_(store)
            finally:
                original.to(home)
                layers[i].to(home)  # before_run may have replaced the module
    finally:
        model.train(was_training)


def calibrate_layerwise(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    device: torch.device | str | None = None,
    store: torch.device | str | None = None,
    progress: bool = True,
    gram_dtype: str = "float64",
    part: Part = "attention",
) -> CalibrationResult:
    """The statistics :func:`nbl.calibrate` computes, layer by layer (same sums up to float64 round-off).

    ``device``: where each layer runs (default: the embedding's device); ``store``: where the carried
    activations and the layers wait (default: ``device``; "cpu" spares device memory).
    """
    return calibrate_layerwise_parts(model, batches, (part,), device, store, progress, gram_dtype)[part]


def calibrate_layerwise_parts(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    parts: Iterable[Part],
    device: torch.device | str | None = None,
    store: torch.device | str | None = None,
    progress: bool = True,
    gram_dtype: str = "float64",
) -> dict[Part, CalibrationResult]:
    """:func:`calibrate_layerwise` for several parts in the same pass (as :func:`nbl.calibrate_parts`)."""
    d = get_adapter(model).hidden_size(model.config)
    taps = {p: CalibrationResult.empty(live_layers(model, p), d, gram_dtype) for p in dict.fromkeys(parts)}
    _layer_pass(model, list(batches), _device(device), _device(store), progress, "calibrating", taps=taps)
    for result in taps.values():
        check_token_count(result, d)
    return taps


def refit_propagated(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    layers: Iterable[int],
    mode: ReplacementMode = "linear",
    ridge: Ridge = 0.0,
    device: torch.device | str | None = None,
    store: torch.device | str | None = None,
    progress: bool = True,
    gram_dtype: str = "float64",
) -> CalibrationResult:
    """Replace ``layers`` in one layer-by-layer pass, each map fitted on the replaced model's own inputs.

    Layers are visited front to back; a chosen layer is calibrated on the hidden states the earlier
    (already replaced) layers produce, replaced, and its replaced output is carried on. Returns the
    statistics the maps were fitted on. All or nothing: the layer list and the cache-slot layout are
    checked first, and if anything fails during the pass the original layers are put back.
    """
    adapter = get_adapter(model)
    chosen = validate_layers(model, layers)
    slot_plan(model, set(chosen) | set(replaced_layers(model)))
    d = adapter.hidden_size(model.config)
    result = CalibrationResult.empty(chosen, d, gram_dtype)
    originals = {i: adapter.layers(model)[i] for i in chosen}

    def refit(i: int, inputs: list[LayerInput]) -> None:
        if i not in result.accumulators:
            return
        if mode == "linear":  # statistics of the original layer on the replaced model's inputs
            _run_layer(model, i, inputs, store=inputs[0].hidden.device, taps={"attention": result}, carry=False)
            check_token_count(CalibrationResult({i: result[i]}, {i: result.cosine_sums[i]}), d)
        linearize(model, result, [i], mode=mode, ridge=ridge)

    try:
        _layer_pass(model, list(batches), _device(device), _device(store), progress, "refitting", before_run=refit)
    except BaseException:
        for i, layer in originals.items():
            adapter.layers(model)[i] = layer
        assign_cache_slots(model)
        raise
    return result


def _device(value: torch.device | str | None) -> torch.device | None:
    return None if value is None else torch.device(value)
