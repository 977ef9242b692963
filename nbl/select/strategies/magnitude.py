"""Relative magnitude, as weight subcloning (Samragh et al. 2023) finds the blocks to remove: by ||f(x)|| / ||x + f(x)||.

Here the ratio of mean energies, exact from the calibration sums and free. It is also the relative error that
dropping the sub-block adds to the residual stream on the calibration tokens: the drop counterpart of
selection=lmmse, which measures the linear map's error on held-out tokens.
"""

from __future__ import annotations

import torch

from nbl.select.ranking import residual_energy
from nbl.select.registry import PartStatistics, RankingStrategy, register


@register
class RelativeMagnitude(RankingStrategy):
    """The sub-blocks whose output is smallest against the stream they add it to, E||a||^2 / E||x + a||^2 (lowest
    first)."""

    name = "magnitude"
    lowest_first = True

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        out = {}
        for i in stats.calibration:
            acc = stats.calibration[i]
            out[i] = float(torch.trace(acc.sum_aa)) / acc.count / residual_energy(acc)
        return out
