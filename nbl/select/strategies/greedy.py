"""Interactions counted: layers are added one at a time, each the one whose replacement (map fitted on the one-pass
statistics) does the least damage on held-out windows given the layers already replaced. The steps do not depend
on k: they are cached as one growing list, so a sweep over k costs the largest k's steps once."""

from __future__ import annotations

import dataclasses

from nbl.cache import grown_steps
from nbl.select.damage import GreedyStep, greedy_selection
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, register


@register
class Greedy(MeasuredStrategy):
    name = "greedy"

    def steps_and_candidates(self, k: int, n_layers: int) -> tuple[int, float]:
        return k, n_layers - (k - 1) / 2  # k sweeps, each over the layers not chosen yet

    def select(self, inputs: SelectionInputs) -> Selection:
        cfg, part = inputs.cfg, inputs.part
        fields = {**inputs.measured_key, "replacement": inputs.probe_settings}
        k = cfg.num_layers

        def grow(earlier: list[dict]) -> list[dict]:
            if len(earlier) >= k:
                return earlier[:k]
            steps = greedy_selection(inputs.probe(), k, start=[GreedyStep(**step) for step in earlier])
            return [dataclasses.asdict(step) for step in steps]

        steps = [GreedyStep(**step) for step in grown_steps(inputs.cache_dir / "greedy", fields, grow)]
        damage = {step.layer: step.damage for step in steps}
        return Selection(
            {part: sorted(damage)}, {part: {"greedy": damage}}, "greedy", steps=[dataclasses.asdict(s) for s in steps]
        )
