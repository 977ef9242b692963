"""Equal budgets across methods: instead of k, a predicted quantity to reach (``budget.target`` / ``budget.value``),
and the number of units each method needs to reach it.

Targets: ``prefill``, the FLOP model's prefill speed-up at ``speed.prompt_len`` tokens; ``blocks``, the prefill
speed-up that removing ``value`` whole blocks predicts (a published block-removal setting, "8 of 32 blocks", as a
speed budget for any method); ``params``, the fraction of the decoder layers' weights removed (maps added count
against it). A unit counts as its replacement counts
(:attr:`nbl.replace.registry.Replacement.counts_as`): a linear map, a conv map, or nothing. For attention, MLP and
block units the count is the smallest k whose first k units reach the value; the layers of the supported families
are alike, so which k units does not change the prediction. A joint rule (attention and MLP sub-blocks mixed) is
run for the most units any mix could need and cut at the first of its ordered steps that reaches the value."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from nbl.core.accounting import BytesModel, FlopModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nbl.core.surgery import ConvShape

BUDGET_TARGETS = ("prefill", "blocks", "params")
TOLERANCE = 1e-9  # a budget met exactly (3 of 30 blocks is 0.1 of the weights) must not miss it by a rounding error
Modes = dict[int, str]
Unit = tuple[int, str]  # (layer, part)
BudgetMetric = Callable[[Modes, Modes], float]  # (attention modes, MLP modes) -> the predicted quantity


def unit_modes(units: Iterable[Unit], mode: str) -> tuple[Modes, Modes]:
    """Units replaced by ``mode`` as (attention modes, MLP modes); a block's map sits where its attention was."""
    attention: Modes = {}
    mlps: Modes = {}
    for i, part in units:
        if part in ("attention", "block"):
            attention[i] = mode
        if part == "mlp":
            mlps[i] = mode
        elif part == "block":
            mlps[i] = "drop"
    return attention, mlps


def budget_metric(config: PretrainedConfig, target: str, prompt_len: int, conv: ConvShape = (2, None)) -> BudgetMetric:
    """The predicted quantity ``target`` reads (``blocks``: the prefill speed-up, as for ``prefill``)."""
    if target in ("prefill", "blocks"):
        flops = FlopModel(config, conv)
        return lambda attention, mlps: flops.prefill_speedup(attention, prompt_len, mlps)
    if target == "params":
        weights, layers = BytesModel(config, conv=conv), range(config.num_hidden_layers)
        base = sum(weights.layer_weights(None, index=i, stored=True) for i in layers)
        return lambda attention, mlps: 1 - sum(weights.layer_weights(attention.get(i), mlps.get(i), i, True)
                                               for i in layers) / base  # fmt: skip
    raise ValueError(f"unknown budget.target {target!r}; choose from {BUDGET_TARGETS}")


def budget_value(config: PretrainedConfig, target: str, value: float, prompt_len: int) -> float:
    """The value the metric must reach: ``value`` itself, or for ``blocks`` the prefill speed-up of that many blocks
    removed."""
    if target != "blocks":
        return value
    if not value == int(value) or not 1 <= value <= config.num_hidden_layers:
        raise ValueError(f"budget.target=blocks takes a whole number of blocks in 1..{config.num_hidden_layers}, not {value}")
    blocks = [(i, "block") for i in range(int(value))]
    return budget_metric(config, "prefill", prompt_len)(*unit_modes(blocks, "drop"))


def units_for_budget(metric: BudgetMetric, n_layers: int, part: str, mode: str, value: float) -> int:
    """The fewest units of ``part`` replaced by ``mode`` whose prediction reaches ``value``."""
    reached = 0.0
    for k in range(n_layers + 1):
        reached = metric(*unit_modes([(i, part) for i in range(k)], mode))
        if reached >= value - TOLERANCE:
            return k
    raise ValueError(f"budget {value} is out of reach for {part} units replaced by {mode}: all {n_layers} give {reached:.4f}")


def joint_bound(metric: BudgetMetric, n_layers: int, mode: str, value: float) -> int:
    """The most attention and MLP units any mix needs to reach ``value``: as many as the kind that saves less
    would need alone (savings add up), or every unit."""
    counts = []
    for part in ("attention", "mlp"):
        try:
            counts.append(units_for_budget(metric, n_layers, part, mode, value))
        except ValueError:
            counts.append(2 * n_layers)
    return min(max(counts), 2 * n_layers)


def budget_prefix(metric: BudgetMetric, ordered: Sequence[Unit], mode: str, value: float) -> int:
    """The length of the shortest prefix of ``ordered`` units whose prediction reaches ``value``."""
    for n in range(len(ordered) + 1):
        if metric(*unit_modes(ordered[:n], mode)) >= value - TOLERANCE:
            return n
    raise ValueError(f"budget {value} is out of reach with the {len(ordered)} units chosen")
