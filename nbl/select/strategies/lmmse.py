"""Held-out LMMSE error: how much each fitted map misses on tokens it was not fitted on."""

from __future__ import annotations

from nbl.select.ranking import lmmse_scores
from nbl.select.registry import PartStatistics, RankingStrategy, register


@register
class HeldoutLMMSE(RankingStrategy):
    """The sub-blocks whose map adds the least error to the residual stream on held-out windows, relative to the
    stream: E||a - W x - b||^2 / E||x + a||^2, exact from the held-out second moments (lowest first)."""

    name = "lmmse"
    lowest_first = True
    heldout_statistics = True
    calibration_modes = ("one_pass", "propagated")  # a sequential step has no held-out statistics of its own
    mode_refusal = (
        "selection=lmmse ranks layers by held-out statistics of the unmodified model: "
        "use calibration.mode one_pass or propagated"
    )

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        if stats.heldout is None:
            raise ValueError("lmmse scores need held-out statistics")
        return lmmse_scores(stats.calibration, stats.heldout, stats.ridge)
