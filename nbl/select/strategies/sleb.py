"""SLEB (Song et al. 2024): whole blocks removed one at a time, each the block whose removal raises the perplexity
least given the blocks removed before it (re-measured after every removal). Measured on the held-out windows of
the calibration text (``selection.holdout_sequences``), blocks dropped while choosing whatever the replacement;
the steps do not depend on k and are cached as one growing list."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nbl.cache import grown_steps
from nbl.select.damage import GreedyStep, Probe, greedy_selection
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, register


@register
class Sleb(MeasuredStrategy):
    name = "sleb"
    reads_measure = False  # perplexity, as published (selection.measure stays loss)
    granularities: ClassVar[tuple[str, ...]] = ("block",)

    def steps_and_candidates(self, k: int, n_layers: int) -> tuple[int, float]:
        return k, n_layers - (k - 1) / 2

    def select(self, inputs: SelectionInputs) -> Selection:
        k = inputs.cfg.num_layers
        probe = Probe(inputs.model, inputs.stats["block"], inputs.heldout(), "drop", part="block")
        fields = {**inputs.measured_key, "rule": "sleb: block drops, loss increase"}

        def grow(earlier: list[dict]) -> list[dict]:
            if len(earlier) >= k:
                return earlier[:k]
            steps = greedy_selection(probe, k, start=[GreedyStep(**step) for step in earlier])
            return [dataclasses.asdict(step) for step in steps]

        steps = [GreedyStep(**s) for s in grown_steps(inputs.cache_dir / "sleb", fields, grow)]
        damage = {s.layer: s.damage for s in steps}
        return Selection({"block": sorted(damage)}, {"block": {"sleb": damage}}, "sleb",
                         steps=[dataclasses.asdict(s) for s in steps])  # fmt: skip
