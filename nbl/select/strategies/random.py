"""The random baseline: k layers (or, for granularity=joint, k (layer, part) units) drawn with selection.seed."""

from __future__ import annotations

from nbl.select.registry import Selection, SelectionInputs, Strategy, random_selection, register


@register
class Random(Strategy):
    name = "random"

    def score_name(self, selection: object) -> None:
        return None

    def select(self, inputs: SelectionInputs) -> Selection:
        return random_selection(inputs, inputs.cfg.num_layers, inputs.cfg.selection.seed)
