"""FinerCut (Zhang et al. 2024): attention and MLP sub-blocks removed greedily, each step the one whose removal
changes the model's next-token distributions least, by the Jensen-Shannon divergence from the unmodified model's,
given the removals before it. Measured on the held-out windows; the sub-blocks are dropped while choosing whatever
the replacement. Needs replacement.granularity=joint (num_layers counts sub-blocks); the steps do not depend on k
and are cached as one growing list."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nbl.cache import grown_steps
from nbl.select.damage import JointStep, greedy_joint_drop
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, register


@register
class FinerCut(MeasuredStrategy):
    name = "finercut"
    reads_measure = False  # JS divergence, as published
    granularities: ClassVar[tuple[str, ...]] = ("joint",)
    ordered_steps = True

    def steps_and_candidates(self, k: int, n_layers: int) -> tuple[int, float]:
        return k, 2 * n_layers - (k - 1) / 2  # k sweeps over the sub-blocks left

    def select(self, inputs: SelectionInputs) -> Selection:
        k = inputs.cfg.num_layers
        fields = {**inputs.measured_key, "rule": "finercut: sub-block drops, JS from the unmodified model"}

        def grow(earlier: list[dict]) -> list[dict]:
            if len(earlier) >= k:
                return earlier[:k]
            start = [JointStep(**step) for step in earlier]
            steps = greedy_joint_drop(inputs.model, inputs.stats, inputs.heldout(), k, "js", start)
            return [dataclasses.asdict(step) for step in steps]

        steps = [JointStep(**s) for s in grown_steps(inputs.cache_dir / "finercut", fields, grow)]
        layers = {part: sorted(s.layer for s in steps if s.part == part) for part in ("attention", "mlp")}
        damage = {part: {s.layer: s.damage for s in steps if s.part == part} for part in ("attention", "mlp")}
        return Selection(layers, {part: {"finercut_js": d} for part, d in damage.items()}, "finercut_js",
                         steps=[dataclasses.asdict(s) for s in steps])  # fmt: skip
