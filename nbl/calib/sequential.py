"""Greedy sequential linearization: re-calibrate the partially replaced model before every replacement.

One-pass NBL fits every W on activations of the unmodified model; after earlier layers are replaced,
later layers see different inputs. Here each step calibrates the model as it now is, scores the
layers that still have attention, replaces the best one, and repeats, so every W is fitted on the
activations it will really receive. It costs one calibration pass per replaced layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nbl.calib.result import CalibrationResult
from nbl.core.linalg import Ridge
from nbl.core.stats import CovarianceAccumulator
from nbl.core.surgery import ReplacementMode, linearize

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# given the model and the layers replaced so far (in replacement order), statistics of the layers that
# still have attention
Calibrator = Callable[["PreTrainedModel", list[int]], CalibrationResult]
# given those statistics, the layer to replace next and every layer's score
Choose = Callable[[CalibrationResult], tuple[int, dict[int, float]]]


@dataclass
class SequentialStep:
    layer: int
    score: float
    scores: dict[int, float] = field(default_factory=dict)
    statistics: CovarianceAccumulator | None = None  # the chosen layer's, on the inputs it now receives


# given the layers replaced so far (in order) and the computation of the next step, the step, from storage
# when it ran before (the recipe keeps only the chosen layer's statistics per step, not all L of them)
StepStore = Callable[[list[int], Callable[[], SequentialStep]], SequentialStep]


def linearize_sequentially(
    model: PreTrainedModel,
    calibrator: Calibrator,
    k: int,
    choose: Choose | None = None,
    mode: ReplacementMode = "linear",
    ridge: Ridge = 0.0,
    order: list[int] | None = None,
    store: StepStore | None = None,
) -> list[SequentialStep]:
    """Replace k layers one at a time, each chosen by ``choose`` and fitted on the current model's statistics.

    ``order`` (explicit or pre-drawn random layers) instead fixes which layers are replaced, front to back, each
    map refitted on the inputs the earlier replacements produce.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if (order is None) == (choose is None):
        raise ValueError("give either choose (a rule applied at every step) or order (fixed layers)")
    if order is not None and len(order) != k:
        raise ValueError(f"order lists {len(order)} layers for k={k}")
    steps: list[SequentialStep] = []
    fixed = sorted(order) if order is not None else None
    for _ in range(k):
        done = [s.layer for s in steps]

        def step(done: list[int] = done) -> SequentialStep:
            stats = calibrator(model, done)
            if len(stats) == 0:
                raise ValueError(f"no attention layer left to replace; asked for {k}")
            if fixed is not None:
                layer, scores = fixed[len(done)], {}
            else:
                layer, scores = choose(stats)
            return SequentialStep(layer, scores.get(layer, float("nan")), scores, stats[layer])

        chosen = store(done, step) if store is not None else step()
        linearize(model, {chosen.layer: chosen.statistics}, [chosen.layer], mode=mode, ridge=ridge)
        steps.append(chosen)
    return steps
