"""Greedy sequential linearization: re-calibrate the partially replaced model before every replacement.

One-pass NBL fits every W on activations of the unmodified model; after earlier layers are replaced,
later layers see different inputs. Here each step calibrates the model as it now is, scores the
layers that still have attention, replaces the best one, and repeats, so every W is fitted on the
activations it will really receive. It costs one calibration pass per replaced layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedModel

from nbl.calibration import CalibrationResult
from nbl.linalg import CCATarget
from nbl.selection import Strategy, layer_scores, select_layers
from nbl.surgery import ReplacementMode, linearize

# given the model and the layers replaced so far (in replacement order), statistics of the layers that
# still have attention
Calibrator = Callable[[PreTrainedModel, list[int]], CalibrationResult]


@dataclass
class SequentialStep:
    layer: int
    score: float
    scores: dict[int, float] = field(default_factory=dict)


def linearize_sequentially(
    model: PreTrainedModel,
    calibrator: Calibrator,
    k: int,
    strategy: Strategy,
    mode: ReplacementMode = "linear",
    ridge: float = 0.0,
    cca_target: CCATarget = "residual",
    seed: int = 0,
    order: list[int] | None = None,
) -> list[SequentialStep]:
    """Replace k layers one at a time, each chosen and fitted on the current model's statistics.

    ``order`` (explicit layers) fixes which layers are replaced, front to back, each map refitted on
    the inputs the earlier replacements produce; ``random`` draws its k layers up front (seeded) and
    does the same.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if order is not None and len(order) != k:
        raise ValueError(f"order lists {len(order)} layers for k={k}")
    steps: list[SequentialStep] = []
    fixed = sorted(order) if order is not None else None
    for _ in range(k):
        stats = calibrator(model, [s.layer for s in steps])
        if len(stats) == 0:
            raise ValueError(f"no attention layer left to replace; asked for {k}")
        if fixed is None and strategy == "random":
            fixed = select_layers(dict.fromkeys(stats, 0.0), k, "random", seed=seed)
        if fixed is not None:
            layer = fixed[len(steps)]
            scores = {}
        else:
            scores = layer_scores(stats, strategy, cca_target)
            (layer,) = select_layers(scores, 1, strategy)
        linearize(model, stats, [layer], mode=mode, ridge=ridge)
        steps.append(SequentialStep(layer, scores.get(layer, float("nan")), scores))
    return steps
