"""ShortGPT (Men et al. 2024): whole blocks of lowest Block Influence, BI = 1 - mean over tokens of cos(x_in, x_out),
x_out = x_in + the block's output, on the unmodified model; free (the cosine is summed during calibration)."""

from __future__ import annotations

from typing import ClassVar

from omegaconf import DictConfig

from nbl.select.registry import PartStatistics, RankingStrategy, register


@register
class ShortGPT(RankingStrategy):
    name = "shortgpt"
    lowest_first = True
    granularities: ClassVar[tuple[str, ...]] = ("block",)
    calibration_modes: ClassVar[tuple[str, ...]] = ("one_pass",)  # ranked once, as published
    mode_refusal = "selection={name} ranks the blocks once on the unmodified model: use calibration.mode=one_pass"

    def score_name(self, selection: DictConfig) -> str:
        return "block_influence"

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        return {i: 1.0 - cos for i, cos in stats.calibration.mean_cosines().items()}
