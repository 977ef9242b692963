"""Each layer replaced alone (its map fitted on the calibration statistics), the damage on held-out windows measured
(``selection.measure``: the increase of the next-token loss, or the KL from the unmodified model); the least
damaging layers first. The damages do not depend on k: they are cached, and a sweep over k measures once."""

from __future__ import annotations

import logging

from nbl.cache import cached_json
from nbl.select.damage import single_layer_damage
from nbl.select.ranking import select_layers
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, probe_replacement, register

log = logging.getLogger(__name__)


def single_layer_damages(inputs: SelectionInputs) -> dict[int, float]:
    """:func:`single_layer_damage` of every layer (cached by everything it depends on but k)."""
    fields = {**inputs.measured_key, "replacement": probe_replacement(inputs.cfg)}

    def compute() -> dict:
        return {str(i): v for i, v in single_layer_damage(inputs.probe()).items()}  # JSON keys are strings

    damage, hit = cached_json(inputs.cache_dir / "damage", fields, compute)
    log.info("single-layer damage: %s", "cache hit" if hit else "measured")
    return {int(i): float(v) for i, v in damage.items()}


@register
class Loss(MeasuredStrategy):
    name = "loss"

    def select(self, inputs: SelectionInputs) -> Selection:
        damage = single_layer_damages(inputs)
        layers = select_layers(damage, inputs.cfg.num_layers, lowest_first=True)
        return Selection({inputs.part: layers}, {inputs.part: {"loss": damage}}, "loss")
