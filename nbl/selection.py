"""Which layers to replace: lowest CCA bound (NBL), highest attention cosine (attention drop), or random."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Literal

from nbl.calibration import CalibrationResult
from nbl.linalg import CCATarget, cca_bound

Strategy = Literal["cca", "cosine", "random", "loss"]
STRATEGIES: tuple[str, ...] = ("cca", "cosine", "random", "loss")


def layer_scores(stats: CalibrationResult, strategy: Strategy, cca_target: CCATarget = "residual") -> dict[int, float]:
    """Per-layer score of a strategy (cca: the NMSE bound; cosine: mean cos(x, x + a); random: none)."""
    if strategy == "cca":
        return {i: cca_bound(stats[i], cca_target) for i in stats}
    if strategy == "cosine":
        return {i: stats.mean_cosine(i) for i in stats}
    if strategy == "random":
        return {i: float("nan") for i in stats}
    if strategy == "loss":
        raise ValueError(
            "loss scores are measured on the model (nbl.damage.single_layer_damage), not read from statistics"
        )
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
    if strategy in ("cca", "loss"):  # lowest bound / least measured damage first
        order = sorted(scores, key=lambda i: (scores[i], i))
    elif strategy == "cosine":  # highest similarity = least useful attention first
        order = sorted(scores, key=lambda i: (-scores[i], i))
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose from {STRATEGIES}")
    return sorted(order[:k])
