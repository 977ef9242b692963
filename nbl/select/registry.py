"""Selection strategies by name: each registered class says what it needs, what it supports and how it chooses.

The config schema reads this registry (the names ``selection.strategy`` accepts, and each strategy's own checks),
so a new strategy is one module in ``nbl/select/strategies/`` (a class decorated with :func:`register`) and one
YAML file in ``conf/selection/``.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nbl.select.damage import Probe, cost_in_passes
from nbl.select.ranking import random_layers, select_layers

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from transformers import PretrainedConfig, PreTrainedModel

    from nbl.calib.result import CalibrationResult
    from nbl.core.linalg import Ridge
    from nbl.core.surgery import Part

log = logging.getLogger(__name__)

Scores = dict[str, dict[int, float]]  # score name -> layer -> score
# replacement.granularity -> the sub-blocks it ranks and replaces (joint: attention and MLP ranked together)
GRANULARITY_PARTS: dict[str, tuple[Part, ...]] = {
    "attention": ("attention",),
    "mlp": ("mlp",),
    "block": ("block",),
    "joint": ("attention", "mlp"),
}
GRANULARITIES = tuple(GRANULARITY_PARTS)
CALIBRATION_MODES = ("one_pass", "sequential", "propagated")


@dataclass
class Selection:
    """What a strategy chose, with its evidence; the recipe records every field in results.json."""

    layers: dict[Part, list[int]]  # per part, the layers to replace
    scores: dict[Part, Scores] = field(default_factory=dict)  # the scores the strategy computed, per part
    score_used: str | None = None  # which of them ranked the layers (None: random or explicit)
    modes: dict[int, str] | None = None  # per layer, linear or drop (selection=plan); else replacement.mode
    steps: list[dict[str, Any]] | None = None  # greedy and plan: the steps, in order
    validation: list[dict[str, Any]] | None = None  # validated: every candidate set and its damage


@dataclass
class SelectionInputs:
    """What the recipe hands a strategy: the model as loaded, its statistics and what measuring needs."""

    cfg: DictConfig  # the validated run config
    config: PretrainedConfig  # the model's architecture
    model: PreTrainedModel
    stats: Mapping[Part, CalibrationResult]  # calibration statistics per part
    heldout_stats: Mapping[Part, CalibrationResult]  # statistics of the held-out windows (when a run needs them)
    ridges: Mapping[Part, Ridge]
    heldout: Callable[[], list[torch.Tensor]]  # the held-out windows of token ids (built on first use)
    calibration: Callable[[], list[torch.Tensor]]  # the calibration windows (rules that run the model on them)
    scores: Mapping[Part, Scores]  # what every run scores: the cosine, and the held-out LMMSE error when it can
    measured_key: Mapping[str, Any]  # what measured results depend on besides the strategy's own settings
    # how units are replaced while choosing, and what measured damage depends on of the replacement (mode, ridge,
    # granularity): nbl.recipe.keys.probe_replacement
    probe_settings: Mapping[str, Any]
    cache_dir: Path

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(self.stats)

    @property
    def part(self) -> Part:
        """The one part of a strategy that measures (those refuse granularity=joint)."""
        (part,) = self.stats
        return part

    def probe(self) -> Probe:
        """Damage measured on the held-out windows, sub-blocks replaced as the run replaces them (conv maps: by the
        one-token maps, whose statistics every layer has; the chosen layers' conv maps are fitted afterwards)."""
        cfg, part = self.cfg, self.part
        mode = self.probe_settings["mode"]
        return Probe(self.model, self.stats[part], self.heldout(), mode, self.ridges[part], cfg.selection.measure,
                     part)  # fmt: skip


class Strategy:
    """A rule that chooses the layers to replace. Subclasses set the class attributes and implement :meth:`select`."""

    name: ClassVar[str]
    heldout_windows: ClassVar[bool] = False  # runs the model on held-out windows of text
    heldout_statistics: ClassVar[bool] = False  # needs statistics of held-out windows
    chooses_modes: ClassVar[bool] = False  # chooses linear or drop per layer itself (replacement.mode unused)
    estimates_damage: ClassVar[bool] = False  # reads selection.damage (its single-layer damages may be estimated)
    reads_measure: ClassVar[bool] = False  # reads selection.measure (it measures damage on held-out windows)
    granularities: ClassVar[tuple[str, ...]] = GRANULARITIES
    calibration_modes: ClassVar[tuple[str, ...]] = CALIBRATION_MODES
    ordered_steps: ClassVar[bool] = False  # its steps order the units (a joint budget cuts them: nbl.select.budget)
    mode_refusal: ClassVar[str] = "selection={name} does not support calibration.mode={mode}"

    def score_name(self, selection: DictConfig) -> str | None:
        """The name under which the scores that rank the layers are recorded (None: nothing ranks them)."""
        return self.name

    def refusal(self, cfg: DictConfig) -> str | None:
        """Why ``cfg`` cannot run with this strategy (checked before anything loads), or None."""
        if cfg.calibration.mode not in self.calibration_modes:
            return self.mode_refusal.format(name=self.name, mode=cfg.calibration.mode)
        if cfg.selection.measure != "loss" and not self.reads_measure:
            readers = ", ".join(sorted(n for n in strategy_names() if STRATEGIES[n].reads_measure))
            return (f"selection.measure={cfg.selection.measure} is read by selection={readers} only, not {self.name}: "
                    "it would be recorded as a setting that changed nothing")  # fmt: skip
        if cfg.selection.damage == "estimated":
            if not self.estimates_damage:
                readers = " and ".join(sorted(n for n in strategy_names() if STRATEGIES[n].estimates_damage))
                return f"selection.damage=estimated is read by selection={readers} only, not {self.name}"
            if cfg.selection.measure != "loss":
                return "selection.damage=estimated expands the next-token loss: use selection.measure=loss"
        return None

    def model_refusal(self, cfg: DictConfig, config: Any) -> str | None:
        """Why ``cfg`` cannot run on a model of this architecture (``config``), or None."""
        if self.estimates_damage:
            from nbl.select.estimate import estimate_refusal

            return estimate_refusal(cfg, config)
        return None

    def select(self, inputs: SelectionInputs) -> Selection:
        raise NotImplementedError

    def announce_cost(self, cfg: DictConfig, n_layers: int) -> None:
        """Say what choosing will cost, where that is more than a few fits (measured strategies)."""


@dataclass(frozen=True)
class PartStatistics:
    """What a ranking reads of one part: its calibration statistics, the selection settings and, when the run
    gathered them, the held-out statistics and the ridge the maps are fitted with."""

    calibration: CalibrationResult
    selection: DictConfig
    heldout: CalibrationResult | None = None
    ridge: Ridge = 0.0


class RankingStrategy(Strategy):
    """Ranks layers (or, for granularity=joint, (layer, part) units) by a score of their statistics and replaces
    the k best; in sequential mode the scores are recomputed on the partially replaced model at every step."""

    lowest_first: ClassVar[bool]

    def layer_scores(self, stats: PartStatistics) -> dict[int, float]:
        raise NotImplementedError

    def select(self, inputs: SelectionInputs) -> Selection:
        sel, name = inputs.cfg.selection, self.score_name(inputs.cfg.selection)
        own: dict[Part, Scores] = {}
        units: dict[tuple[int, Part], float] = {}
        for part in inputs.parts:
            scores = inputs.scores[part].get(name)
            if scores is None:  # not among what every run scores: this strategy's own
                stats = PartStatistics(inputs.stats[part], sel, inputs.heldout_stats.get(part), inputs.ridges[part])
                scores = self.layer_scores(stats)
                own[part] = {name: scores}
            units.update({(i, part): s for i, s in scores.items()})
        chosen = select_layers(units, inputs.cfg.num_layers, self.lowest_first)
        return Selection(_per_part(chosen, inputs.parts), own, name)

    def choose_one(self, selection: DictConfig) -> Callable[[CalibrationResult], tuple[int, dict[int, float]]]:
        """The rule of one sequential step: statistics -> (the layer to replace next, every layer's score)."""

        def choose(stats: CalibrationResult) -> tuple[int, dict[int, float]]:
            scores = self.layer_scores(PartStatistics(stats, selection))
            (layer,) = select_layers(scores, 1, self.lowest_first)
            return layer, scores

        return choose


class MeasuredStrategy(Strategy):
    """Runs the model: replaces layers for real and measures the damage on held-out windows of text (the measure is
    ``selection.measure``). One part per layer (not granularity=joint); the maps are fitted on the one-pass
    statistics, so not in sequential mode."""

    heldout_windows = True
    reads_measure = True
    granularities = ("attention", "mlp", "block")
    calibration_modes = ("one_pass", "propagated")
    mode_refusal = "selection={name} runs the model itself: use calibration.mode one_pass or propagated"

    def steps_and_candidates(self, k: int, n_layers: int) -> tuple[int, float]:
        """How many measuring sweeps, and how many layers each tries on average."""
        return 1, n_layers

    def announce_cost(self, cfg: DictConfig, n_layers: int) -> None:
        """Warn when measuring costs more than one calibration pass per 4 layers chosen."""
        k, sel = cfg.num_layers, cfg.selection
        if sel.damage == "estimated":  # a forward, a backward with each layer recomputed, a layer per candidate
            passes = 5 * sel.holdout_sequences / cfg.calibration.num_sequences  # about 5 forwards
        else:
            steps, candidates = self.steps_and_candidates(k, n_layers)
            passes = cost_in_passes(n_layers, candidates, steps, sel.holdout_sequences, cfg.calibration.num_sequences)
        if passes > k / 4:
            log.warning(
                "selection=%s costs about %.1f calibration passes (%d held-out windows), more than one per 4 layers "
                "chosen (%.1f); fewer selection.holdout_sequences make it cheaper and noisier",
                self.name, passes, sel.holdout_sequences, k / 4,
            )  # fmt: skip


def random_selection(inputs: SelectionInputs, k: int, seed: int) -> Selection:
    """k units drawn at random among every layer's parts."""
    n = inputs.config.num_hidden_layers
    chosen = random_layers([(i, part) for part in inputs.parts for i in range(n)], k, seed)
    return Selection(_per_part(chosen, inputs.parts))


def _per_part(units: list[tuple[int, Part]], parts: tuple[Part, ...]) -> dict[Part, list[int]]:
    return {part: sorted(i for i, p in units if p == part) for part in parts}


STRATEGIES: dict[str, type[Strategy]] = {}
_discovered: list[bool] = []  # set once every strategy module has been imported


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``selection.strategy=<cls.name>``."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"two selection strategies are named {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy (the modules of ``nbl.select.strategies`` are imported on first use)."""
    if not _discovered:
        from nbl.select import strategies

        for module in pkgutil.iter_modules(strategies.__path__):
            importlib.import_module(f"{strategies.__name__}.{module.name}")
        _discovered.append(True)
    return tuple(sorted(STRATEGIES))


def get_strategy(name: str) -> Strategy:
    if name not in strategy_names():
        raise ValueError(f"unknown selection strategy {name!r}; choose from {', '.join(strategy_names())}")
    return STRATEGIES[name]()
