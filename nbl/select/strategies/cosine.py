"""Attention drop (He et al. 2024, "What Matters in Transformers? Not All Attention is Needed")."""

from __future__ import annotations

from nbl.select.registry import PartStatistics, RankingStrategy, register


@register
class Cosine(RankingStrategy):
    """The sub-blocks that turn the residual stream least, by the mean cos(x, x + a) summed during calibration
    (highest first): free."""

    name = "cosine"
    lowest_first = False

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        return stats.calibration.mean_cosines()
