"""Rankings of layers (or of (layer, part) units) from scores: the k best, lowest or highest first, or k at random;
and the scores that need held-out statistics (the held-out LMMSE error, the ridge it prefers)."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

import torch

from nbl.core.linalg import Ridge, fit_lmmse, heldout_error, ridge_of
from nbl.core.stats import CovarianceAccumulator

Unit = TypeVar("Unit", bound=Hashable)  # a layer index, or a (layer, part) pair when parts are ranked together


def select_layers(scores: Mapping[Unit, float], k: int, lowest_first: bool) -> list[Unit]:
    """The k units of best score, sorted; ``lowest_first``: the lowest scores are the best. Ties break towards
    the lower unit (deterministic). A NaN or inf score is an error, never a selection."""
    _check_k(k, len(scores))
    bad = {i: s for i, s in scores.items() if not math.isfinite(s)}
    if bad:
        raise ValueError(f"non-finite scores for {sorted(bad)}: refusing to select")
    sign = 1 if lowest_first else -1
    order = sorted(scores, key=lambda i: (sign * scores[i], i))
    return sorted(order[:k])


def random_layers(candidates: Iterable[Unit], k: int, seed: int = 0) -> list[Unit]:
    """k of ``candidates`` drawn with ``seed``, sorted (the same draw for the same candidates and seed)."""
    pool = sorted(candidates)
    _check_k(k, len(pool))
    return sorted(random.Random(seed).sample(pool, k))


def _check_k(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"cannot select k={k} layers out of {n}")


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
