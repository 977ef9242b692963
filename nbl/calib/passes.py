"""The two calibrators (forward hooks, layer by layer) and the cache in front of them.

A calibrator is one statistics pass: ``calibrator(model, batches, parts)``. :func:`cached_pass` serves the
statistics of a run (its calibration windows, or its held-out windows) from the cache and makes one pass for
what is missing, sharded over ranks under torchrun; :func:`step_store` keeps sequential mode's steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nbl.cache import cached_calibration, cached_json, stats_entry
from nbl.calib.distributed import Calibrator, Shards
from nbl.calib.hooks import Batch, calibrate_parts
from nbl.calib.layerwise import calibrate_layerwise_parts
from nbl.calib.result import CalibrationResult
from nbl.calib.sequential import SequentialStep, StepStore
from nbl.core.adapters import get_adapter
from nbl.core.surgery import Part, live_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class HookPass:
    """One forward of the whole model, hooks on the sub-blocks (:func:`nbl.calib.hooks.calibrate_parts`)."""

    gram_dtype: str = "float64"

    def __call__(self, model: PreTrainedModel, batches: Sequence[Batch], parts: tuple[Part, ...],
                 check_tokens: bool = True) -> dict[Part, CalibrationResult]:  # fmt: skip
        return calibrate_parts(model, batches, parts, gram_dtype=self.gram_dtype, check_tokens=check_tokens)


@dataclass(frozen=True)
class LayerwisePass:
    """One layer at a time (:func:`nbl.calib.layerwise.calibrate_layerwise_parts`): each layer runs on ``device``,
    layers and carried activations wait on ``store``."""

    device: torch.device | None = None
    store: torch.device | None = None
    gram_dtype: str = "float64"

    def __call__(self, model: PreTrainedModel, batches: Sequence[Batch], parts: tuple[Part, ...],
                 check_tokens: bool = True) -> dict[Part, CalibrationResult]:  # fmt: skip
        return calibrate_layerwise_parts(
            model, batches, parts, self.device, self.store, gram_dtype=self.gram_dtype, check_tokens=check_tokens
        )


def expect_layers(model: PreTrainedModel, part: Part) -> Callable[[CalibrationResult], None]:
    """A check for cached statistics: one d x d accumulator per layer of ``model`` that keeps ``part``."""
    d = get_adapter(model).hidden_size(model.config)
    live = live_layers(model, part)

    def expect(stats: CalibrationResult) -> None:  # after stats.check(): every layer has the first one's shape
        first = stats[next(iter(stats))]
        if list(stats) != live or (first.d_in, first.d_out) != (d, d):
            raise ValueError(
                f"it holds layers {list(stats)} of size {first.d_in}, the model has {part} layers {live} of size {d}"
            )

    return expect


@dataclass(frozen=True)
class CachedPass:
    stats: dict[Part, CalibrationResult]  # the parts the run asked for
    hits: dict[Part, bool]
    paths: dict[Part, Path]


def cached_pass(
    model: PreTrainedModel,
    batches: Callable[[], Sequence[Batch]],
    calibrator: Calibrator,
    folder: Path,
    keys: Mapping[Part, Mapping[str, Any]],
    parts: tuple[Part, ...],
    shards: Shards | None = None,
    check_tokens: bool = True,
) -> CachedPass | None:
    """Statistics of ``parts``, each from its cache entry (``keys[part]``) when it exists; when one is missing,
    one pass gathers every part of ``keys`` not stored yet (the extra ones for later runs) and stores them.

    Rank 0 looks the entries up and the others follow; a pass is sharded over the ranks. Ranks > 0 get None.
    With one rank the pass runs under the entry's lock, so jobs that start together calibrate once.
    ``check_tokens``: refuse statistics over fewer than d tokens (held-out statistics need no inverse).
    """
    shards = shards or Shards()
    extra = tuple(p for p in keys if p not in parts)

    def decide() -> tuple[Part, ...]:  # what a pass must gather: nothing when every part the run needs is stored
        absent = {p for p in keys if not stats_entry(folder, keys[p]).is_file()}
        return (*parts, *(p for p in extra if p in absent)) if absent & set(parts) else ()

    gather = shards.agree(decide)
    reduced = None
    if gather and shards.world > 1:
        reduced = shards.calibrate(calibrator, model, batches(), gather, check_tokens)
    if not shards.main:
        return None

    @functools.cache  # rank 0 after a sharded pass: the reduced sums; one rank, or an entry that vanished: alone
    def one_pass() -> dict[Part, CalibrationResult]:
        return reduced if reduced is not None else calibrator(model, batches(), gather or parts, check_tokens)
    stats, hits, paths = {}, {}, {}
    for part in gather or parts:
        stats[part], hits[part], paths[part] = cached_calibration(
            folder, keys[part], lambda part=part: one_pass()[part], expect=expect_layers(model, part)
        )
    return CachedPass({p: stats[p] for p in parts}, {p: hits[p] for p in parts}, {p: paths[p] for p in parts})


def step_store(folder: Path, step_key: Callable[[list[int]], dict[str, Any]]) -> StepStore:
    """Sequential steps from the cache: per step its choice (JSON) and the chosen layer's statistics only, keyed by
    ``step_key(layers replaced so far)``; k steps store k single-layer entries (3 d^2 + 2 d floats each), not k
    copies of every layer. A sweep over k replays the shorter runs' steps without a pass."""

    def store(done: list[int], compute: Callable[[], SequentialStep]) -> SequentialStep:
        fields = step_key(done)
        fresh: list[SequentialStep] = []

        def record() -> dict:
            fresh.append(compute())
            return {"layer": fresh[0].layer, "score": fresh[0].score, "scores": fresh[0].scores}

        choice, _ = cached_json(folder, fields, record)
        layer = int(choice["layer"])

        def one_layer() -> CalibrationResult:
            step = fresh[0] if fresh else compute()
            if step.layer != layer:
                raise RuntimeError(f"step {len(done)} chose layer {step.layer} again where its record says {layer}")
            return CalibrationResult({layer: step.statistics}, {layer: 0.0})

        stats, _, _ = cached_calibration(folder, {**fields, "layer": layer}, one_layer)
        scores = {int(i): float(v) for i, v in choice["scores"].items()}
        return SequentialStep(layer, float(choice["score"]), scores, stats[layer])

    return store
