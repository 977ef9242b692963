"""The least held-out error first: E||a - W x - b||^2 / E||x + a||^2 per layer, the error the fitted map adds to the
residual stream relative to the stream, on held-out windows the maps were not fitted on (exact, from their second
moments; :func:`nbl.select.ranking.lmmse_scores`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbl.core.linalg import Ridge
from nbl.select.ranking import lmmse_scores
from nbl.select.registry import RankingStrategy, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from nbl.calib.result import CalibrationResult


@register
class HeldoutLMMSE(RankingStrategy):
    name = "lmmse"
    lowest_first = True
    heldout_statistics = True
    calibration_modes = ("one_pass", "propagated")  # a sequential step has no held-out statistics of its own
    mode_refusal = "selection=lmmse ranks layers by held-out statistics of the unmodified model: use calibration.mode one_pass or propagated"

    def layer_scores(self, stats: CalibrationResult, selection: DictConfig, heldout: CalibrationResult | None = None,
                     ridge: Ridge = 0.0) -> dict[int, float]:  # fmt: skip
        if heldout is None:
            raise ValueError("lmmse scores need held-out statistics")
        return lmmse_scores(stats, heldout, ridge)
