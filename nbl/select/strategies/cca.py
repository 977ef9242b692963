"""NBL, the paper's rule: the layers whose sub-block output is best predicted linearly from its input (lowest CCA
bound on the normalised error of the LMMSE map) are replaced first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbl.core.linalg import Ridge, cca_bound
from nbl.select.registry import RankingStrategy, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from nbl.calib.result import CalibrationResult


@register
class CCABound(RankingStrategy):
    name = "cca"
    lowest_first = True

    def score_name(self, selection: DictConfig) -> str:
        """``cca`` for CCA(x, x + a) (the paper's), ``cca_attention`` for CCA(x, a)."""
        return "cca" if selection.cca_target == "residual" else "cca_attention"

    def layer_scores(self, stats: CalibrationResult, selection: DictConfig, heldout: CalibrationResult | None = None,
                     ridge: Ridge = 0.0) -> dict[int, float]:  # fmt: skip
        return {i: cca_bound(stats[i], selection.cca_target) for i in stats}
