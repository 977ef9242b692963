"""Attention drop (He et al., "What Matters in Transformers?"): the sub-blocks whose output changes the residual
stream's direction least (highest mean cos(x, x + a), summed during calibration) are replaced first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbl.core.linalg import Ridge
from nbl.select.registry import RankingStrategy, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from nbl.calib.result import CalibrationResult


@register
class Cosine(RankingStrategy):
    name = "cosine"
    lowest_first = False

    def layer_scores(self, stats: CalibrationResult, selection: DictConfig, heldout: CalibrationResult | None = None,
                     ridge: Ridge = 0.0) -> dict[int, float]:  # fmt: skip
        return stats.mean_cosines()
