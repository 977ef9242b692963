"""One streaming pass over calibration batches: per-layer (x, a) statistics via forward hooks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from nbl.calib.result import CalibrationResult
from nbl.core.adapters import DecoderAdapter, get_adapter
from nbl.core.surgery import PARTS, Part, execution_device, live_layers, shifted_features

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Batch = torch.Tensor | Mapping[str, torch.Tensor]


class SubBlockTap:
    """Owns the hooks that feed (input, output) pairs of chosen sub-blocks into accumulators; always removes them.

    Per part, of layer i: attention (x, path(x)), the attention path (its norms included) on the layer input x;
    mlp (h, path(h)) with h the residual stream after the attention; block (x, (layer output - x) / s), s the
    family's residual scale (1 but Granite), which the cosine counts (x against x + s a). ``results`` holds one
    :class:`CalibrationResult` per part; each is fed for the layers it holds. With ``width`` T > 1 the input fed
    is [x_t, ..., x_(t-T+1)] (:func:`shifted_features`; padding counts as zeros, as a conv map sees it at
    inference); the cosine stays that of x itself.

    x is taken where LN1 reads it, inside the layer: a dispatched model's hooks (accelerate, ``device_map``) move
    a layer's input onto its device on the way in, so what the layer's own pre-hook sees can sit on the previous
    layer's device.
    """

    def __init__(self, model: PreTrainedModel, results: Mapping[Part, CalibrationResult], width: int = 1) -> None:
        self.model = model
        self.results = results
        self.width = width
        self.mask: torch.Tensor | None = None
        self.scale = get_adapter(model).residual_scale(model.config)
        self._inputs: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SubBlockTap:
        adapter = get_adapter(self.model)
        decoder_layers = adapter.layers(self.model)
        try:
            for part, result in self.results.items():
                for i in result.accumulators:
                    entry, exit_ = part_modules(adapter, decoder_layers[i], part)
                    self._handles.append(entry.register_forward_pre_hook(self._save_input(part, i), with_kwargs=True))
                    self._handles.append(exit_.register_forward_hook(self._accumulate(part, i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def _save_input(self, part: str, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[part, i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _accumulate(self, part: str, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            x = self._inputs.pop((part, i)).to(out.device)  # a block's output may leave on another device
            # a: what the part's path computes, before the residual scale s (a block's: what it adds, over s)
            a = (out - x) / self.scale if part == "block" else out
            mask = self.mask.to(x.device) if self.mask is not None else None
            result = self.results[part]
            features = x
            if self.width > 1:
                features = shifted_features(x if mask is None else x * mask.unsqueeze(-1).to(x.dtype), self.width)
            result.accumulators[i].update(features, a, mask)
            cos = torch.nn.functional.cosine_similarity(x.float(), (x + self.scale * a).float(), dim=-1)
            if mask is not None:
                cos = cos[mask.bool()]
            result.cosine_sums[i] += float(cos.double().sum())

        return hook


def part_modules(adapter: DecoderAdapter, layer: nn.Module, part: Part) -> tuple[nn.Module, nn.Module]:
    """(entry, exit) of a decoder layer's part: the module whose first argument is the part's input x (the first
    module of its path, read before any norm) and the module whose output is the part's output (the path's last;
    a whole layer's: x plus what it adds)."""
    if part == "block":
        return next(iter(adapter.path(layer, "attention").values())), layer
    modules = list(adapter.path(layer, part).values())
    return modules[0], modules[-1]


def unpack_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        input_ids, mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise TypeError("a calibration batch is a (batch, seq) tensor of input ids or a dict with 'input_ids'")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be shaped (batch, seq), got {tuple(input_ids.shape)}")
    return input_ids.to(device), None if mask is None else mask.to(device)


@torch.no_grad()
def calibrate(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    layers: Iterable[int] | None = None,
    progress: bool = True,
    gram_dtype: str = "float64",
    part: Part = "attention",
    width: int = 1,
) -> CalibrationResult:
    """One pass over ``batches``; statistics of ``part`` in every layer that still has it (or only ``layers``).

    The LM head is skipped (only the backbone runs); padding tokens (attention_mask == 0) are not
    counted. Memory is O(L d^2) whatever the number of tokens. ``gram_dtype``: see
    :class:`~nbl.core.stats.CovarianceAccumulator`; ``width``: see :func:`calibrate_parts`.
    """
    return calibrate_parts(model, batches, (part,), layers, progress, gram_dtype, width=width)[part]


@torch.no_grad()
def calibrate_parts(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    parts: Iterable[Part],
    layers: Iterable[int] | None = None,
    progress: bool = True,
    gram_dtype: str = "float64",
    check_tokens: bool = True,
    width: int = 1,
) -> dict[Part, CalibrationResult]:
    """:func:`calibrate` for several parts in the same pass: 3 d^2 + 2 d float64 sums per (layer, part), so
    every granularity at once holds three times the attention-only statistics. ``check_tokens``: refuse as many
    tokens as inputs or fewer (off for one shard of a sharded pass, whose total is checked, and for held-out
    statistics, which no map inverts). ``width`` T > 1: the attention's output against its last T inputs, the
    statistics of a conv map ((T d)^2 + 2 T d^2 + (T + 1) d sums a layer: :func:`shifted_statistics_bytes`)."""
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    d = adapter.hidden_size(model.config)
    results: dict[Part, CalibrationResult] = {}
    for part in dict.fromkeys(parts):
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; use one of {PARTS}")
        if width > 1 and part != "attention":
            raise ValueError(f"shifted inputs (width {width}) are gathered for the attention part only, not {part}")
        live = live_layers(model, part)
        if layers is None:
            chosen = live
        else:
            chosen = sorted({int(i) for i in layers})
            for i in chosen:
                if not 0 <= i < n:
                    raise IndexError(f"layer {i} out of range for {n} layers")
                if i not in live:
                    raise ValueError(f"layer {i} has no {part} left to calibrate")
        results[part] = CalibrationResult.empty(chosen, d, gram_dtype, width)
    device = execution_device(model.get_input_embeddings())  # dispatched models: weights may sit on "meta"
    backbone = adapter.backbone(model)
    was_training = model.training
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else None
    names = "+".join(results) + (f", width {width}" if width > 1 else "")
    try:
        with SubBlockTap(model, results, width) as tap:
            for b, batch in enumerate(tqdm(batches, total=total, desc=f"calibrating ({names})", disable=not progress)):
                input_ids, mask = unpack_batch(batch, device)
                tap.mask = mask
                backbone(input_ids=input_ids, attention_mask=mask, use_cache=False)
                for result in results.values():
                    raise_on_overflow(result, b, next(backbone.parameters()).dtype)
    finally:
        model.train(was_training)
    for result in results.values():
        if check_tokens:
            check_token_count(result, d, width)
    return results


def shifted_statistics_bytes(d: int, width: int) -> int:
    """float64 bytes of one layer's sums for a width-``width`` conv map (what ``calibrate_parts(width=...)`` holds)."""
    f = width * d
    return 8 * (f * f + f * d + d * d + f + d)


def check_token_count(result: CalibrationResult, d: int, width: int = 1) -> None:
    """Refuse statistics over too few tokens: with n <= T d tokens the covariance of the T d inputs is singular
    and every layer looks linear."""
    inputs = width * d
    if result.num_tokens <= inputs:
        what = f"hidden size {d}" if width == 1 else f"a width-{width} map of {inputs} inputs"
        raise ValueError(
            f"calibration saw {result.num_tokens} real tokens for {what}: the covariance of the inputs needs "
            f"more than {inputs} tokens to have full rank (otherwise every layer looks perfectly linear); "
            "use more or longer calibration sequences"
        )


def raise_on_overflow(
    result: CalibrationResult, batch: int, dtype: torch.dtype, layers: list[int] | None = None
) -> None:
    """Stop at the first batch whose activations hold NaN or inf, naming the layer and the tensor.

    A non-finite x or a makes the running sum of x or a non-finite, so checking those O(d) sums (one
    device sync per batch) catches it before it is cached or blamed on the statistics later.
    """
    layers = list(result.accumulators) if layers is None else layers
    if not layers:
        return
    flags = torch.stack([torch.isfinite(t).all() for i in layers for t in (result[i].sum_x, result[i].sum_a)]).tolist()
    for j, ok in enumerate(flags):
        if not ok:
            i, what = layers[j // 2], ("the input of" if j % 2 == 0 else "the output of")
            raise FloatingPointError(
                f"calibration batch {batch}: {what} layer {i} holds NaN or inf in {dtype}: the model's activations "
                "overflow on this text (float16 overflows on many LLMs: load the model in bfloat16 or float32)"
            )
