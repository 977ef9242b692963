"""Relative magnitude: the sub-blocks whose output is smallest against the residual stream they add it to are
replaced first. Samragh et al. (2023, weight subcloning) rank blocks by ||f(x)|| / ||x + f(x)|| to find those that
change the stream least; here the ratio of mean energies, E||a||^2 / E||x + a||^2, exact from the calibration sums
and free. It is also the relative error that dropping the sub-block adds to the stream on the calibration tokens:
the drop counterpart of selection=lmmse's held-out error of the linear map."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nbl.core.linalg import Ridge
from nbl.select.ranking import residual_energy
from nbl.select.registry import RankingStrategy, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from nbl.calib.result import CalibrationResult


@register
class RelativeMagnitude(RankingStrategy):
    name = "magnitude"
    lowest_first = True

    def layer_scores(self, stats: CalibrationResult, selection: DictConfig, heldout: CalibrationResult | None = None,
                     ridge: Ridge = 0.0) -> dict[int, float]:  # fmt: skip
        out = {}
        for i in stats:
            acc = stats[i]
            out[i] = float(torch.trace(acc.sum_aa)) / acc.count / residual_energy(acc)
        return out
