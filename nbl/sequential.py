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
) -> list[SequentialStep]:
    """Replace k layers one at a time, each chosen and fitted on the current model's statistics.

    ``random`` draws its k layers up front (seeded) and replaces them front to back, refitting each.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    steps: list[SequentialStep] = []
    random_order: list[int] | None = None
    for _ in range(k):
        stats = calibrator(model, [s.layer for s in steps])
        if len(stats) == 0:
            raise ValueError(f"no attention layer left to replace; asked for {k}")
        if strategy == "random":
            if random_order is None:
                random_order = select_layers(dict.fromkeys(stats, 0.0), k, "random", seed=seed)
            layer = random_order[len(steps)]
            scores = {}
        else:
            scores = layer_scores(stats, strategy, cca_target)
            (layer,) = select_layers(scores, 1, strategy)
        linearize(model, stats, [layer], mode=mode, ridge=ridge)
        steps.append(SequentialStep(layer, scores.get(layer, float("nan")), scores))
    return steps
