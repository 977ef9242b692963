"""A per-layer plan among keep / linear / drop that meets a target at the least measured damage.

The target is a number the accounting models predict from the plan alone: a prefill or decode speed-up
(FLOP model), a decode speed-up of a bytes-bound step (bytes model), or the fraction of the KV cache or of
the decoder layers' weights removed. The plan is built greedily: at each step every remaining layer is
tried as linear and as dropped in the model as planned so far (its damage measured on held-out windows,
:mod:`nbl.select.damage`), and the option with the least damage per unit of progress towards the target is
taken (:func:`preference`), until the target is met. Steps do not depend on the target's value, so a sweep over
values replays one run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from nbl.core.accounting import BytesModel, FlopModel, kv_cache_bytes
from nbl.core.surgery import ReplacementMode
from nbl.select.damage import DIVERGENCES, Probe, layers_restored, reference_states, single_layer_damage

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TargetKind = Literal["prefill", "decode", "decode_bytes", "kv", "params"]
TARGETS: tuple[str, ...] = ("prefill", "decode", "decode_bytes", "kv", "params")
Metric = Callable[[Mapping[int, ReplacementMode]], float]


@dataclass
class PlanStep:
    """One step of :func:`greedy_plan`: a layer and how it is replaced."""

    layer: int
    mode: str  # "linear" or "drop"
    damage: float  # damage this option added, given the earlier steps
    value: float  # the target quantity once it is applied


def target_metric(config: PretrainedConfig, kind: TargetKind, prompt_len: int, context: int) -> Metric:
    """Plan -> the predicted quantity the target bounds from below (higher = faster or smaller).

    prefill / decode: FLOP-model speed-up (prompt of ``prompt_len``; one step at ``context``); decode_bytes:
    bytes-model speed-up at ``context``; kv: fraction of the KV cache removed at ``context``; params: fraction of the decoder
    layers' weights removed.
    """
    flops, bytes_model = FlopModel(config), BytesModel(config)
    if kind == "prefill":
        return lambda plan: flops.prefill_speedup(plan, prompt_len)
    if kind == "decode":
        return lambda plan: flops.decode_speedup(plan, context)
    if kind == "decode_bytes":
        return lambda plan: bytes_model.decode_speedup(plan, context)
    if kind == "kv":
        return lambda plan: 1 - kv_cache_bytes(config, plan, context) / kv_cache_bytes(config, {}, context)
    if kind == "params":
        layers = range(config.num_hidden_layers)
        base = sum(bytes_model.layer_weights(None, index=i, stored=True) for i in layers)
        return lambda plan: 1 - sum(bytes_model.layer_weights(plan.get(i), None, i, True) for i in layers) / base
    raise ValueError(f"unknown plan target {kind!r}; choose from {TARGETS}")


def reachable(config: PretrainedConfig, metric: Metric) -> float:
    """The most any plan can reach: every layer's attention dropped."""
    return metric(dict.fromkeys(range(config.num_hidden_layers), "drop"))


def preference(damage: float, gain: float) -> tuple[float, float]:
    """How a plan ranks an option (smaller first): the least damage per unit of progress; an option that does no
    damage, or undoes some, before any that does, and among those the one that gets furthest. (Damage per unit
    of progress alone would prefer, of two options that lower the loss as much, the one that gets less far.)"""
    return (0.0, -gain) if damage <= 0 else (1.0, damage / gain)


@torch.no_grad()
def greedy_plan(probe: Probe, metric: Metric, target: float, start: Sequence[PlanStep] = ()) -> list[PlanStep]:
    """The steps until ``metric`` reaches ``target`` (continuing ``start``, an earlier run's steps; if a prefix
    of them already reaches it, that prefix). Attention only; the probe's mode is not used: each step tries both.

    Each step costs two single-layer damage sweeps (linear and drop) over the remaining layers.
    """
    for n, step in enumerate(start):
        if step.value >= target:
            return list(start[: n + 1])
    steps = list(start)
    plan: dict[int, ReplacementMode] = {s.layer: s.mode for s in steps}  # type: ignore[misc]
    reference = reference_states(probe.model, probe.heldout) if probe.measure in DIVERGENCES else None
    with layers_restored(probe.model, probe.stats):
        for s in steps:
            probe.replace([s.layer], s.mode)  # type: ignore[arg-type]
        current = metric(plan)
        while current < target:
            left = [i for i in probe.stats if i not in plan]
            if not left:
                raise ValueError(f"the target {target} is out of reach: every layer replaced gives {current:.4f}")
            options = []
            for mode in ("linear", "drop"):
                desc = f"plan step {len(steps) + 1} ({mode})"
                damage = single_layer_damage(dataclasses.replace(probe, mode=mode), left, desc, reference)
                for i, d in damage.items():
                    gain = metric({**plan, i: mode}) - current
                    if gain > 0:
                        options.append((preference(d, gain), i, mode, d))
            if not options:
                raise ValueError(f"no replacement moves the target quantity beyond {current:.4f}")
            _, layer, mode, damage_added = min(options)
            probe.replace([layer], mode)
            plan[layer] = mode
            current = metric(plan)
            steps.append(PlanStep(layer, mode, damage_added, current))
    return steps
