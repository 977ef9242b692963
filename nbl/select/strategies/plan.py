"""Per layer keep / linear / drop, to reach a predicted target (``selection.target`` >= ``selection.target_value``)
at the least measured damage: each step tries every remaining layer as linear and as dropped and takes the option
with the least damage per unit of progress (:func:`nbl.select.plan.greedy_plan`). Steps do not depend on the
target's value: they are cached as one growing list, so a sweep over values pays once."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nbl.cache import grown_steps
from nbl.core.accounting import mid_context
from nbl.select.damage import cost_in_passes
from nbl.select.plan import Metric, PlanStep, greedy_plan, reachable, target_metric
from nbl.select.registry import MeasuredStrategy, Selection, SelectionInputs, register

log = logging.getLogger(__name__)


def plan_metric(cfg: DictConfig, config: Any) -> Metric:
    """The quantity the plan must reach, at the speed settings' prompt length and mid-decode context."""
    speed = cfg.speed
    return target_metric(config, cfg.selection.target, speed.prompt_len, mid_context(speed.prompt_len, speed.new_tokens))


@register
class Plan(MeasuredStrategy):
    name = "plan"
    chooses_modes = True
    granularities = ("attention",)  # keep / linear / drop of attention sub-blocks
    calibration_modes = ("one_pass",)
    mode_refusal = "selection=plan fits its maps on the one-pass statistics: use calibration.mode=one_pass"

    def refusal(self, cfg: DictConfig) -> str | None:
        value = cfg.selection.target_value
        if value is None or not math.isfinite(value):
            return "selection=plan needs selection.target_value (e.g. 1.1 for a 1.1x speed-up)"
        return super().refusal(cfg)

    def model_refusal(self, cfg: DictConfig, config: Any) -> str | None:
        best = reachable(config, plan_metric(cfg, config))
        if best < cfg.selection.target_value:
            return (
                f"selection.target_value={cfg.selection.target_value} is out of reach: dropping every attention "
                f"layer of {cfg.model.name} gives {cfg.selection.target}={best:.4f}"
            )
        return None

    def announce_cost(self, cfg: DictConfig, n_layers: int) -> None:
        sel = cfg.selection  # k is unknown before the plan is made: say what one step costs
        passes = 2 * cost_in_passes(n_layers, n_layers, 1, sel.holdout_sequences, cfg.calibration.num_sequences)
        log.info("selection=plan: each step costs about %.1f calibration passes (linear and drop tried)", passes)

    def select(self, inputs: SelectionInputs) -> Selection:
        cfg, sel, part = inputs.cfg, inputs.cfg.selection, inputs.part
        fields = {
            **inputs.measured_key,
            "target": sel.target,
            "speed": {"prompt_len": cfg.speed.prompt_len, "new_tokens": cfg.speed.new_tokens},
            "ridge": OmegaConf.to_container(cfg.replacement, resolve=True)["ridge"],
        }

        def grow(earlier: list[dict]) -> list[dict]:
            start = [PlanStep(**step) for step in earlier]
            steps = greedy_plan(inputs.probe(), plan_metric(cfg, inputs.config), sel.target_value, start=start)
            return [dataclasses.asdict(step) for step in steps]

        steps = [PlanStep(**step) for step in grown_steps(inputs.cache_dir / "plan", fields, grow)]
        damage = {step.layer: step.damage for step in steps}
        return Selection(
            {part: sorted(damage)}, {part: {"plan": damage}}, "plan",
            modes={step.layer: step.mode for step in steps}, steps=[dataclasses.asdict(s) for s in steps],
        )  # fmt: skip
