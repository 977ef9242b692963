"""The paper's replacements and the drop baseline: a sub-block becomes a linear map fitted in closed form (LMMSE),
a convolution map of the last T inputs, or nothing."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, ClassVar

import torch

from nbl.calib.hooks import calibrate, shifted_statistics_bytes
from nbl.calib.layerwise import refit_propagated
from nbl.calib.passes import step_store
from nbl.calib.sequential import linearize_sequentially
from nbl.core.adapters import get_adapter
from nbl.core.surgery import Part, linearize
from nbl.measure.evaluation import perplexity
from nbl.recipe.keys import sequential_step_fields
from nbl.recipe.state import RunState
from nbl.replace.registry import Replacement, register
from nbl.select.damage import layers_restored
from nbl.select.registry import RankingStrategy

log = logging.getLogger(__name__)


class _Fitted(Replacement):
    """Linear maps or drops of any part: attention may be refitted (propagated, sequential) or planned per layer
    (selection=plan); other parts are fitted on the one-pass statistics."""

    def apply(self, state: RunState) -> dict[Part, list[int]]:
        if state.parts == ("attention",):
            return {"attention": _replace_attention(state)}
        for part, layers in state.selection.layers.items():
            linearize(state.model, state.stats[part], layers, mode=self.name, ridge=state.ridges[part], part=part)
        return dict(state.selection.layers)


@register
class Linear(_Fitted):
    name = "linear"
    adds_parameters = True
    served_by = "transformers; vLLM with the nbl plugin"
    probe_mode = "linear"
    counts_as = "linear"
    publication = "NBL (NeurIPS 2025): the LMMSE map of the sub-block's input"


@register
class Drop(_Fitted):
    name = "drop"
    adds_parameters = False
    served_by = "transformers; vLLM with the nbl plugin"
    publication = "LLM-Drop (He et al. 2024): the sub-block removed"


@register
class Conv(Replacement):
    name = "conv"
    needs = ("statistics", "calibration_windows")  # the chosen layers' shifted inputs, in one more pass
    granularities: ClassVar[tuple[str, ...]] = ("attention",)
    adds_parameters = True
    served_by = "transformers; vLLM with the nbl plugin (as a hybrid model: the state in its cache manager)"
    probe_mode = "linear"  # chosen with the one-token maps, whose statistics every layer has
    counts_as = "conv"
    publication = "this project (docs/results.md, richer closed-form maps)"

    def apply(self, state: RunState) -> dict[Part, list[int]]:
        chosen = state.selection.layers["attention"]
        _replace_by_conv(state, chosen)
        return {"attention": chosen}


def _replace_attention(state: RunState) -> list[int]:
    """The replaced layers (sequential refits choose them as they go, and record their steps)."""
    cfg, model, rep = state.cfg, state.model, state.cfg.replacement
    stats, ridge, chosen = state.stats["attention"], state.ridges["attention"], state.selection.layers["attention"]
    modes = state.selection.modes
    if modes is not None:  # a plan: each layer its own mode
        for mode in ("linear", "drop"):
            linearize(model, stats, [i for i in chosen if modes[i] == mode], mode=mode, ridge=ridge)
    elif cfg.calibration.mode == "one_pass":
        linearize(model, stats, chosen, mode=rep.mode, ridge=ridge)
    elif cfg.calibration.mode == "propagated":  # the chosen layers, each map fitted on the replaced model's inputs
        store = torch.device("cpu") if cfg.calibration.offload else None
        refit_propagated(model, state.windows.calibration(), chosen, rep.mode, ridge, state.device, store,
                         gram_dtype=cfg.calibration.gram_dtype)  # fmt: skip
    else:
        return _replace_sequentially(state, chosen)
    return chosen


def _replace_by_conv(state: RunState, chosen: list[int]) -> None:
    """Convolution maps for the chosen layers: their shifted-input statistics in one more pass over the calibration
    windows (not cached: they depend on the selection), then the fits. With ``replacement.validate``, the one-token
    maps replace the conv maps when those do worse on the held-out windows (all chosen layers replaced together)."""
    cfg, model, start = state.cfg, state.model, time.perf_counter()
    width, ridge, d = cfg.replacement.width, state.ridges["attention"], get_adapter(model).hidden_size(state.config)
    rank = conv_rank(cfg.replacement.rank, d)
    stats = calibrate(model, state.windows.calibration(), chosen, gram_dtype=cfg.calibration.gram_dtype, width=width)
    section: dict[str, Any] = {
        "width": width,
        "rank": rank,
        "statistics_bytes": len(chosen) * shifted_statistics_bytes(d, width),  # float64 sums, held during the pass
    }
    if cfg.replacement.validate:
        heldout = torch.cat(state.windows.heldout())
        losses = {}
        for mode, fits in (("linear", state.stats["attention"]), ("conv", stats)):
            with layers_restored(model, chosen):
                linearize(model, fits, chosen, mode=mode, ridge=ridge, rank=rank if mode == "conv" else None)
                losses[mode] = math.log(perplexity(model, heldout))
        section.update(heldout_loss=losses, kept="conv" if losses["conv"] <= losses["linear"] else "linear")
        log.info("held-out loss: conv %.4f, linear %.4f: %s maps kept", losses["conv"], losses["linear"], section["kept"])
    if section.get("kept", "conv") == "conv":
        linearize(model, stats, chosen, mode="conv", ridge=ridge, rank=rank)
    else:
        linearize(model, state.stats["attention"], chosen, mode="linear", ridge=ridge)
    section["seconds"] = time.perf_counter() - start
    state.results["calibration"]["conv_pass"] = section
    log.info("conv maps (width %d, rank %s): %d layers in %.0f s", width, rank, len(chosen), section["seconds"])


def conv_rank(rank: int | float | None, d: int) -> int | None:
    """``replacement.rank`` as a rank: None (full), an integer, or a fraction of the hidden size d (at least 1)."""
    if rank is None or (isinstance(rank, float) and rank == 1.0):
        return None
    return rank if isinstance(rank, int) else max(1, round(rank * d))  # validation refused ranks above d


def _replace_sequentially(state: RunState, chosen: list[int]) -> list[int]:
    """One layer at a time, each map fitted on re-calibrated statistics of the partially replaced model: the
    strategy re-ranks at every step, or the layers are fixed (explicit, random) and replaced front to back."""
    cfg, strategy = state.cfg, state.strategy
    choose = strategy.choose_one(cfg.selection) if isinstance(strategy, RankingStrategy) else None
    store = step_store(state.cache_dir / "sequential", lambda done: sequential_step_fields(cfg, state.config, done))

    def statistics(model: Any, done: list[int]) -> Any:  # the first step's are the one-pass statistics
        if not done:
            return state.stats["attention"]
        return state.calibrator(model, state.windows.calibration(), ("attention",))["attention"]

    steps = linearize_sequentially(
        state.model, statistics, len(chosen), choose, cfg.replacement.mode, state.ridges["attention"],
        order=None if choose else chosen, store=store,
    )  # fmt: skip
    state.results["calibration"]["sequential_steps"] = [{"layer": s.layer, "score": s.score} for s in steps]
    return sorted(s.layer for s in steps)
