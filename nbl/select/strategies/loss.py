"""Each layer replaced alone (its map fitted on the calibration statistics), the damage on held-out windows measured
(``selection.measure``: the increase of the next-token loss, or the KL from the unmodified model); the least
damaging layers first. The damages do not depend on k: they are cached, and a sweep over k measures once.

``selection.damage=estimated``: the loss increases estimated to second order from one forward and backward pass
(:mod:`nbl.select.estimate`) instead of measured layer by layer; recorded as ``loss_estimate``."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from nbl.cache import cached_json
from nbl.select.damage import Unreplaced, single_layer_damage
from nbl.select.estimate import taylor_terms
from nbl.select.ranking import select_layers
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, register

log = logging.getLogger(__name__)


def damage_name(selection: DictConfig) -> str:
    """The name the single-layer damages are recorded under: ``loss`` measured, ``loss_estimate`` estimated."""
    return "loss_estimate" if selection.damage == "estimated" else "loss"


def single_layer_damages(inputs: SelectionInputs) -> tuple[dict[int, float], Unreplaced | None]:
    """:func:`single_layer_damage` of every layer, or :func:`estimated_damage` with ``selection.damage=estimated``
    (cached by everything they depend on but k); and, when they were computed now, the model as it is measured on the
    held-out windows (set validation measures against it instead of running the held-out forward again)."""
    fields = {**inputs.measured_key, "replacement": inputs.probe_settings}
    estimated = inputs.cfg.selection.damage == "estimated"
    computed: list[Unreplaced] = []

    def compute() -> dict:
        probe = inputs.probe()
        if estimated:
            terms, unreplaced = taylor_terms(probe)
            damage = {i: t.damage for i, t in terms.items()}
        else:
            unreplaced = Unreplaced.measure(probe.model, probe.heldout, probe.measure)
            damage = single_layer_damage(probe, unreplaced=unreplaced)
        computed.append(unreplaced)
        return {str(i): v for i, v in damage.items()}  # JSON keys are strings

    damage, hit = cached_json(inputs.cache_dir / ("damage_estimate" if estimated else "damage"), fields, compute)
    log.info("single-layer damage: %s", "cache hit" if hit else "estimated" if estimated else "measured")
    return {int(i): float(v) for i, v in damage.items()}, (computed[0] if computed else None)


@register
class Loss(MeasuredStrategy):
    name = "loss"
    estimates_damage = True

    def score_name(self, selection: DictConfig) -> str:
        return damage_name(selection)

    def select(self, inputs: SelectionInputs) -> Selection:
        (damage, _), name = single_layer_damages(inputs), damage_name(inputs.cfg.selection)
        layers = select_layers(damage, inputs.cfg.num_layers, lowest_first=True)
        return Selection({inputs.part: layers}, {inputs.part: {name: damage}}, name)
