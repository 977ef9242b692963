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

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from nbl.calib.carry import Carrier, module_device
from nbl.calib.hooks import Batch, SubBlockTap, check_token_count, raise_on_overflow
from nbl.calib.result import CalibrationResult
from nbl.core.adapters import get_adapter
from nbl.core.linalg import Ridge
from nbl.core.surgery import (
    Part,
    ReplacementMode,
    assign_cache_slots,
    linearize,
    live_layers,
    replaced_layers,
    slot_plan,
    validate_layers,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _run_layer(
    model: PreTrainedModel,
    i: int,
    carrier: Carrier,
    device: torch.device,
    taps: Mapping[Part, CalibrationResult] | None = None,
    carry: bool = True,
) -> None:
    """Run layer i on every batch (on ``device``): statistics of layer i into ``taps`` (per part, those holding
    it) and, with ``carry``, its outputs carried on."""
    ones = {p: CalibrationResult({i: r[i]}, r.cosine_sums) for p, r in (taps or {}).items() if i in r.accumulators}
    with SubBlockTap(model, ones) if ones else nullcontext() as hooks:  # this layer's hooks only
        for b, hidden in enumerate(carrier.hidden):
            if hooks is not None:
                hooks.mask = carrier.masks[b]
            out = carrier.call(model, i, b, hidden, device)
            for one in ones.values():
                raise_on_overflow(one, b, hidden.dtype)
            if carry:
                carrier.hidden[b] = out.to(carrier.store)


@torch.no_grad()
def _layer_pass(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    device: torch.device | None,
    store: torch.device | None,
    progress: bool,
    desc: str,
    taps: Mapping[Part, CalibrationResult] | None = None,
    before_run: Callable[[int, Carrier], None] | None = None,
) -> None:
    """Capture every layer's inputs, then for each layer: onload it, ``before_run`` (which may replace it), run it
    on every batch (statistics of the layers in ``taps`` gathered on the way), offload it."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise NotImplementedError("layer-by-layer calibration moves layers itself: load the model without device_map")
    layers = get_adapter(model).layers(model)
    device = device or next(model.get_input_embeddings().parameters()).device
    store = store or device
    was_training = model.training
    model.eval()
    try:
        carrier = Carrier.capture(model, batches, store)
        for i in tqdm(range(len(layers)), desc=desc, disable=not progress):
            original = layers[i]
            home = module_device(original, store)
            original.to(device)
            try:
                if before_run is not None:
                    before_run(i, carrier)
                _run_layer(model, i, carrier, device, taps)
                for result in (taps or {}).values():
                    if i in result.accumulators:  # finished sums wait with the activations: the device holds one layer's
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
    check_tokens: bool = True,
) -> dict[Part, CalibrationResult]:
    """:func:`calibrate_layerwise` for several parts in the same pass (as :func:`nbl.calibrate_parts`)."""
    d = get_adapter(model).hidden_size(model.config)
    taps = {p: CalibrationResult.empty(live_layers(model, p), d, gram_dtype) for p in dict.fromkeys(parts)}
    _layer_pass(model, list(batches), _device(device), _device(store), progress, "calibrating", taps=taps)
    for result in taps.values():
        if check_tokens:
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

    def refit(i: int, carrier: Carrier) -> None:
        if i not in result.accumulators:
            return
        if mode == "linear":  # statistics of the original layer on the replaced model's inputs
            device = module_device(adapter.layers(model)[i], carrier.store)
            _run_layer(model, i, carrier, device, taps={"attention": result}, carry=False)
            check_token_count(CalibrationResult({i: result[i]}, {i: result.cosine_sums[i]}), d)
        linearize(model, result, [i], mode=mode, ridge=ridge)
        result[i].move_(carrier.store)  # fitted: its sums wait with the activations (one layer's on the device)

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
