"""Never worse on held-out text than the rankings it starts from: the k layers that each of three rankings puts
first (single-layer damage as selection=loss measures or estimates it, the cosine, the paper's CCA bound) are
replaced together, set by set, and the set with the least damage on the held-out windows is kept."""

from __future__ import annotations

import dataclasses
import logging

from nbl.select.damage import validate_sets
from nbl.select.ranking import select_layers
from nbl.select.registry import MeasuredStrategy, PartStatistics, Selection, SelectionInputs, get_strategy, register
from nbl.select.strategies.loss import damage_name, single_layer_damages

log = logging.getLogger(__name__)


@register
class Validated(MeasuredStrategy):
    name = "validated"
    estimates_damage = True

    def select(self, inputs: SelectionInputs) -> Selection:
        cfg, part, k = inputs.cfg, inputs.part, inputs.cfg.num_layers
        cca = get_strategy("cca")
        cca_name = cca.score_name(cfg.selection)
        cca_scores = cca.layer_scores(PartStatistics(inputs.stats[part], cfg.selection))
        damage = damage_name(cfg.selection)
        damages, unreplaced = single_layer_damages(inputs)
        scores = {damage: damages, cca_name: cca_scores}
        proposals = {
            damage: select_layers(scores[damage], k, lowest_first=True),
            "cosine": select_layers(inputs.scores[part]["cosine"], k, lowest_first=False),
            "cca": select_layers(scores[cca_name], k, lowest_first=True),
        }
        found = validate_sets(inputs.probe(), proposals, unreplaced)
        for c in found:
            log.info("validated: %s's %d layers %s: damage %.4f", " = ".join(c.rules), k, c.layers, c.damage)
        best = min(found, key=lambda c: c.damage)
        scores["validated"] = dict.fromkeys(best.layers, best.damage)
        validation = [dataclasses.asdict(c) for c in found]
        return Selection({part: sorted(best.layers)}, {part: scores}, "validated", validation=validation)
