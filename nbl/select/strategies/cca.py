"""NBL, the paper's rule (Erdogan et al. 2025)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbl.core.linalg import cca_bound
from nbl.select.registry import PartStatistics, RankingStrategy, register

if TYPE_CHECKING:
    from omegaconf import DictConfig


@register
class CCABound(RankingStrategy):
    """The sub-blocks whose output is best predicted linearly from their input, by the CCA bound on the normalised
    error of the LMMSE map (lowest first)."""

    name = "cca"
    lowest_first = True

    def score_name(self, selection: DictConfig) -> str:
        """``cca`` for CCA(x, x + a) (the paper's), ``cca_attention`` for CCA(x, a)."""
        return "cca" if selection.cca_target == "residual" else "cca_attention"

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        calibration = stats.calibration
        return {i: cca_bound(calibration[i], stats.selection.cca_target) for i in calibration}
