"""The experiment recipe: a config checked in seconds, then a list of stages over one run state.

Each stage is a small function of :class:`~nbl.recipe.state.RunState` that owns its cache keys and its sections of
results.json; :func:`run_experiment` runs them in order. Usable from Python without Hydra.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from nbl.provenance import provenance
from nbl.recipe.state import RunContext, RunState
from nbl.recipe.validation import validate


def run_experiment(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    """Run one experiment; returns what results.json holds (``{}`` on a torchrun helper rank)."""
    provenance()  # the code hash and git state, read once as this process loads the code: edits or commits made
    # while a sweep runs must not relabel its later runs (both are cached for the process)
    cfg, _ = validate(cfg)  # before anything heavy: a bad config costs seconds, not a model load
    from nbl.recipe import assess, choose, prepare, record, statistics, transform  # the heavy imports

    stages = (
        prepare.set_up,  # the model's config, ranks, the run folder, the seed
        prepare.load,  # tokenizer, windows, weights
        statistics.calibrate,  # cached; sharded under torchrun (the helper ranks stop after it)
        statistics.heldout_statistics,
        statistics.score,
        choose.select,
        assess.baseline,  # the unmodified model: a copy for the speed test, its (cached) evaluation
        transform.replace,
        transform.heal,
        transform.save_checkpoint,
        transform.quantize,
        assess.evaluate,
        assess.speed,
        record.record,  # results.json, summary.md
        record.track,  # W&B
    )
    state = RunState(cfg, ctx)
    for stage in stages:
        stage(state)
        if state.stopped:
            return {}
    return state.results
