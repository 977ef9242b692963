"""Stages that gather statistics: calibration, held-out statistics, and the scores every run records."""

from __future__ import annotations

import logging
import time

import torch

from nbl.calib.passes import cached_pass
from nbl.core.surgery import execution_device
from nbl.recipe.keys import calibration_fields, heldout_statistics_fields, part_fields
from nbl.recipe.state import RunState
from nbl.select.ranking import auto_ridge, lmmse_scores

log = logging.getLogger(__name__)


def calibrate(state: RunState) -> None:
    """Statistics of every part the granularity replaces, one cache entry per part; a pass the run makes anyway
    also gathers the parts of ``calibration.extra_parts`` not cached yet. Under torchrun every rank calibrates
    its share; the helper ranks stop here."""
    cfg, parts, start = state.cfg, state.parts, time.perf_counter()
    fields = calibration_fields(cfg, state.config)
    extra = [p for p in cfg.calibration.extra_parts if p not in parts]
    keys = {p: part_fields(fields, p) for p in (*parts, *extra)}
    found = cached_pass(
        state.model, state.windows.calibration, state.calibrator, state.cache_dir / "stats", keys, parts, state.shards
    )
    if found is None:  # a helper rank: its shard is in rank 0's statistics
        state.stopped = True
        return
    if cfg.calibration.offload:
        _onload(state)
    device = execution_device(state.model.get_input_embeddings())  # score and fit where the model computes
    state.stats = {p: s.to(device) for p, s in found.stats.items()}
    tokens, hit = found.stats[parts[0]].num_tokens, all(found.hits.values())
    paths = {p: str(path) for p, path in found.paths.items()}
    state.results["calibration"] = {
        "tokens": tokens,
        "cache_hit": hit,
        "cache_file": paths[parts[0]] if len(parts) == 1 else paths,
        "seconds": time.perf_counter() - start,
        "world_size": state.shards.world,
    }
    log.info("calibration: %s (%d tokens)", "cache hit" if hit else "computed", tokens)


def _onload(state: RunState) -> None:
    """After an offloaded calibration the model waits on the CPU: the rest of the run (scores, fits, evaluation,
    speed) goes to the compute device if the model fits there, else stays on the CPU, and says so."""
    if state.device.type == "cpu":
        return
    try:
        state.model.to(state.device)
    except torch.cuda.OutOfMemoryError:
        state.model.to("cpu")
        torch.cuda.empty_cache()
        log.warning(
            "the model does not fit on %s: scores, fits and evaluation run on the CPU (slow for a large model; "
            "model.device_map=auto spreads it over several GPUs)", state.device,
        )  # fmt: skip


def heldout_statistics(state: RunState) -> None:
    """Statistics of the held-out windows (``selection.holdout_sequences`` windows after the calibration windows),
    when the run needs the exact held-out error of every map (lmmse, ridge=auto). Costs holdout_sequences /
    num_sequences of a calibration pass; cached beside the calibration statistics."""
    state.selection_start = time.perf_counter()  # selection time counts from here
    if not state.needs_heldout_statistics:
        return
    fields = heldout_statistics_fields(state.cfg, state.config)
    keys = {p: part_fields(fields, p) for p in state.parts}
    found = cached_pass(state.model, state.windows.heldout, state.calibrator, state.cache_dir / "stats", keys,
                        state.parts, check_tokens=False)  # a held-out error inverts nothing: any count >= 2 will do
    device = execution_device(state.model.get_input_embeddings())
    for part, stats in found.stats.items():
        state.heldout_stats[part] = stats.to(device)
        log.info("held-out %s statistics: %s (%d tokens)", part, "cache hit" if found.hits[part] else "computed",
                 stats.num_tokens)  # fmt: skip


def score(state: RunState) -> None:
    """Each part's ridge (ridge=auto: the one of least held-out error per layer) and what every run scores: the
    cosine (summed during calibration), and the held-out LMMSE error when held-out statistics exist."""
    auto = state.cfg.replacement.ridge == "auto"
    for part, stats in state.stats.items():
        held = state.heldout_stats.get(part)
        state.ridges[part] = auto_ridge(stats, held) if auto else float(state.cfg.replacement.ridge)
        state.scores[part] = {"cosine": stats.mean_cosines()}
        if held is not None:
            state.scores[part]["lmmse"] = lmmse_scores(stats, held, state.ridges[part])
