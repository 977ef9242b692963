"""Which layers to replace, from the calibration statistics: lowest CCA bound (NBL), highest attention cosine
(attention drop), lowest held-out LMMSE error (lmmse), or random. Measured strategies (loss, greedy) run the
model: :mod:`nbl.damage`."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Literal

import torch

from nbl.calibration import CalibrationResult
from nbl.linalg import CCATarget, Ridge, cca_bound, fit_lmmse, heldout_error, ridge_of
from nbl.stats import CovarianceAccumulator

Strategy = Literal["cca", "cosine", "random", "loss", "lmmse", "greedy", "plan", "validated"]
STRATEGIES: tuple[str, ...] = ("cca", "cosine", "random", "loss", "lmmse", "greedy", "plan", "validated")
MEASURED: tuple[str, ...] = ("loss", "greedy", "plan", "validated")  # these run the model on held-out windows
LOWEST_FIRST = ("cca", "loss", "lmmse")  # scores that measure damage; cosine measures redundancy


def layer_scores(stats: CalibrationResult, strategy: Strategy, cca_target: CCATarget = "residual") -> dict[int, float]:
    """Per-layer score of a strategy (cca: the NMSE bound; cosine: mean cos(x, x + a); random: none)."""
    if strategy == "cca":
        return {i: cca_bound(stats[i], cca_target) for i in stats}
    if strategy == "cosine":
        return {i: stats.mean_cosine(i) for i in stats}
    if strategy == "random":
        return {i: float("nan") for i in stats}
    if strategy in MEASURED:
        raise ValueError(f"{strategy} is measured on the model (nbl.damage, nbl.plan), not read from statistics")
    if strategy == "lmmse":
        raise ValueError("lmmse scores need held-out statistics: use lmmse_scores(stats, heldout)")
    raise ValueError(f"unknown selection strategy {strategy!r}; choose from {STRATEGIES}")


def select_layers(scores: Mapping[int, float], k: int, strategy: Strategy, seed: int = 0) -> list[int]:
    """The k layers to replace, sorted. Ties break towards the lower layer index (deterministic)."""
    n = len(scores)
    if not 0 <= k <= n:
        raise ValueError(f"cannot select k={k} layers out of {n}")
    if strategy == "random":
        return sorted(random.Random(seed).sample(sorted(scores), k))
    bad = {i: s for i, s in scores.items() if not math.isfinite(s)}
    if bad:
        raise ValueError(f"non-finite {strategy} scores for layers {sorted(bad)}: refusing to select")
    if strategy in LOWEST_FIRST:  # lowest bound / least damage first
        order = sorted(scores, key=lambda i: (scores[i], i))
    elif strategy == "cosine":  # highest similarity = least useful attention first
        order = sorted(scores, key=lambda i: (-scores[i], i))
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose from {STRATEGIES}")
    return sorted(order[:k])


def residual_energy(acc: CovarianceAccumulator) -> float:
    """E||x + a||^2 per token: the energy of the residual stream the layer hands on."""
    trace = torch.trace(acc.sum_xx) + 2 * torch.trace(acc.sum_ax) + torch.trace(acc.sum_aa)
    return float(trace) / acc.count


def lmmse_scores(
    stats: Mapping[int, CovarianceAccumulator],
    heldout: Mapping[int, CovarianceAccumulator],
    ridge: Ridge = 0.0,
) -> dict[int, float]:
    """Per layer: the error the fitted map adds to the residual stream on held-out tokens, relative to that
    stream, E||a - W x - b||^2 / E||x + a||^2 (W, b fitted on ``stats``; both expectations on ``heldout``).

    Why relative to the stream: every later sub-block reads the stream through an RMS/LayerNorm, so what a
    perturbation changes downstream is its size relative to the stream's, not its absolute size.
    """
    out = {}
    for i in stats:
        w, b = fit_lmmse(stats[i], ridge=ridge_of(ridge, i))
        out[i] = heldout_error(w, b, heldout[i]) / residual_energy(heldout[i])
    return out


RIDGE_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def auto_ridge(
    stats: Mapping[int, CovarianceAccumulator],
    heldout: Mapping[int, CovarianceAccumulator],
    grid: tuple[float, ...] = RIDGE_GRID,
) -> dict[int, float]:
    """Per layer, the ridge of ``grid`` whose map (fitted on ``stats``) has the least error on ``heldout``."""
    out = {}
    for i in stats:
        errors = {r: heldout_error(*fit_lmmse(stats[i], ridge=r), heldout[i]) for r in grid}
        out[i] = min(errors, key=lambda r: (errors[r], r))
    return out
