"""The selection stage: the registered strategy (or the explicit layers) chooses what to replace."""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from nbl.recipe.keys import measured_fields, probe_replacement
from nbl.recipe.state import RunState
from nbl.select.registry import Selection, SelectionInputs


def select(state: RunState) -> None:
    """``layers=[...]`` as given, or what ``selection.strategy`` chooses; its scores, steps and validation go to
    results.json beside what every run scores."""
    cfg, strategy = state.cfg, state.strategy
    if strategy is None:
        selection = Selection({state.parts[0]: sorted(cfg.layers)})  # joint refuses explicit layers
    else:
        strategy.announce_cost(cfg, state.config.num_hidden_layers)
        selection = strategy.select(
            SelectionInputs(
                cfg=cfg, config=state.config, model=state.model, stats=state.stats, heldout_stats=state.heldout_stats,
                ridges=state.ridges, heldout=state.windows.heldout, calibration=state.windows.calibration,
                scores=state.scores,
                measured_key=measured_fields(cfg, state.config) if strategy.heldout_windows else {},
                cache_dir=state.cache_dir, probe_settings=probe_replacement(cfg),
            )
        )  # fmt: skip
        if cfg.budget.target is not None:
            selection = _within_budget(state, selection)
    state.selection = selection
    ridge = state.ridges[state.parts[0]]
    state.results.update(
        selection={**OmegaConf.to_container(cfg.selection, resolve=True), "layers_from": "strategy" if strategy else "explicit"},
        scores=_recorded_scores(state, selection),
        score_used=selection.score_used,
        selection_seconds=time.perf_counter() - state.selection_start,
        greedy_steps=selection.steps,
        validation=selection.validation,
        ridge={str(i): r for i, r in ridge.items()} if isinstance(ridge, dict) else ridge,
    )


def _within_budget(state: RunState, selection: Selection) -> Selection:
    """The selection cut to the budget (joint: the first of the rule's ordered steps that reach it), and what the
    budget predicts for it in results.json."""
    from nbl.recipe.validation import run_budget  # the budget num_layers was resolved with, before loading
    from nbl.select.budget import budget_prefix, unit_modes

    cfg = state.cfg
    metric, counts_as, value = run_budget(cfg, state.config)
    if cfg.replacement.granularity == "joint":  # the rule ran for the most units a mix needs: cut its steps
        ordered = [(s["layer"], s["part"]) for s in selection.steps]
        n = budget_prefix(metric, ordered, counts_as, value)
        selection.steps = selection.steps[:n]
        selection.layers = {p: sorted(i for i, q in ordered[:n] if q == p) for p in selection.layers}
    units = [(i, part) for part, layers in selection.layers.items() for i in layers]
    state.results["budget"] = {
        "target": cfg.budget.target, "value": cfg.budget.value,
        "to_reach": value,  # what the prediction had to reach (blocks: the speed-up of that many blocks removed)
        "units": len(units), "predicted": metric(*unit_modes(units, counts_as)),
    }  # fmt: skip
    return selection


def _recorded_scores(state: RunState, selection: Selection) -> dict[str, dict[str, float]]:
    """Every score of every part, what every run scores and the strategy's own (joint: ``<part>/<score>``)."""
    out = {}
    for part in state.parts:
        for name, scores in {**state.scores[part], **selection.scores.get(part, {})}.items():
            out[name if len(state.parts) == 1 else f"{part}/{name}"] = {str(i): s for i, s in scores.items()}
    return out
