"""The typed schema of an experiment config: every key, its type and its allowed values.

:func:`checked_config` merges a composed config into these dataclasses (OmegaConf's structured
configs), so a wrong type (``num_layers=true``, ``layers=[1.5]``), an unknown value
(``selection.cca_target=bogus``) or an unknown key fails with the key's full name before anything
loads; ``check`` methods add the range checks types cannot express.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nbl.core.stats import GRAM_DTYPES
from nbl.models import DTYPES
from nbl.quantization import SCHEMES
from nbl.replace.registry import get_replacement, replacement_names
from nbl.select.budget import BUDGET_TARGETS
from nbl.select.plan import TARGETS
from nbl.select.registry import CALIBRATION_MODES, GRANULARITIES, get_strategy, strategy_names


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


def _choices(name: str, values: Iterable[str]) -> Any:
    """An enum of ``values``, each member named as its value: the strings a key accepts. Where the values are
    defined by the code that uses them (parts, modes, schemes, strategies), they are taken from there."""
    return Enum(name, {value: value for value in values})


ModelSource = _choices("ModelSource", ("embedded", "hub", "tiny"))
DType = _choices("DType", DTYPES)
CalibrationMode = _choices("CalibrationMode", CALIBRATION_MODES)
CalibrationMethod = _choices("CalibrationMethod", ("hooks", "layerwise"))
Windows = _choices("Windows", ("stream", "documents"))
GramDType = _choices("GramDType", GRAM_DTYPES)
Granularity = _choices("Granularity", GRANULARITIES)
Mode = _choices("Mode", replacement_names())  # the registered replacements (nbl.replace)
QuantScheme = _choices("QuantScheme", SCHEMES)
Strategy = _choices("Strategy", strategy_names())  # the registered strategies (nbl.select.strategies)
CCATargetName = _choices("CCATargetName", ("residual", "attention"))
Measure = _choices("Measure", ("loss", "kl", "js"))
DamageSource = _choices("DamageSource", ("measured", "estimated"))
PlanTarget = _choices("PlanTarget", TARGETS)
BudgetTarget = _choices("BudgetTarget", BUDGET_TARGETS)
LoggerMode = _choices("LoggerMode", ("auto", "online", "offline", "disabled"))
FinetuneMethod = _choices("FinetuneMethod", ("none", "lora"))
SpeedEngine = _choices("SpeedEngine", ("transformers", "vllm"))
EvalBackend = _choices("EvalBackend", ("hf", "vllm"))


def _positive(key: str, value: float | None, allow_none: bool = False, minimum: float = 1) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _kv_budget(key: str, gib: float) -> None:
    """A vLLM engine's KV budget in GiB: any positive amount (fractions too)."""
    if not (math.isfinite(gib) and gib > 0):
        raise ConfigError(f"{key}={gib} must be > 0 (GiB)")


@dataclass
class ModelSchema:
    name: str
    source: ModelSource
    path: str | None = None
    revision: str | None = None
    dtype: DType = DType.float32
    device_map: str | None = None
    random_weights: bool = False

    def check(self) -> None:
        if self.source is not ModelSource.embedded and not self.path:
            raise ConfigError(f"model.path is required for model.source={self.source.value}")


@dataclass
class CalibrationSchema:
    source: str
    path: str | None = None
    num_sequences: int = 32
    seq_len: int = 512
    batch_size: int = 1
    seed: int = 0
    mode: CalibrationMode = CalibrationMode.one_pass
    method: CalibrationMethod = CalibrationMethod.hooks
    offload: bool = False
    gram_dtype: GramDType = GramDType.float64
    windows: Windows = Windows.stream
    extra_parts: list[str] = field(default_factory=list)  # further parts a pass gathers and caches for later runs

    def check(self) -> None:
        unknown = [p for p in self.extra_parts if p not in ("attention", "mlp", "block")]
        if unknown:
            raise ConfigError(f"calibration.extra_parts: unknown parts {unknown}; use attention, mlp, block")
        if self.offload and self.method is not CalibrationMethod.layerwise:
            raise ConfigError("calibration.offload=true needs calibration.method=layerwise")
        _positive("calibration.num_sequences", self.num_sequences)
        _positive("calibration.seq_len", self.seq_len, minimum=2)
        _positive("calibration.batch_size", self.batch_size)
        if self.source == "local" and not self.path:
            raise ConfigError("calibration=local needs calibration.path=/path/to/text.{txt,jsonl}")
        if self.source != "local" and self.path is not None:
            raise ConfigError(
                f"calibration.path={self.path} is only read by calibration=local, "
                f"but calibration.source={self.source}: add calibration=local or drop the path"
            )


@dataclass
class SelectionSchema:
    strategy: Strategy
    cca_target: CCATargetName = CCATargetName.residual
    seed: int = 0
    holdout_sequences: int = 8  # loss, greedy, lmmse, ridge=auto: held-out windows of the calibration text
    heldout_source: str | None = None  # their text (a TEXT_SOURCES name); None: the calibration text's next windows
    measure: Measure = Measure.loss  # loss, greedy, ...: damage as loss increase, or as KL / JS from the original model
    damage: DamageSource = DamageSource.measured  # loss, validated: single-layer damages measured, or estimated
    target: PlanTarget = PlanTarget.prefill  # plan: the predicted quantity to reach (nbl.select.plan.target_metric)
    target_value: float | None = None  # plan: reach at least this (a speed-up, or a fraction removed)


@dataclass
class BudgetSchema:
    target: BudgetTarget | None = None  # null: num_layers units; else as many as reach ``value`` (nbl.select.budget)
    value: float | None = None

    def check(self) -> None:
        if (self.target is None) != (self.value is None):
            raise ConfigError("budget.target and budget.value go together (null both to use num_layers)")
        if self.target is not None and self.target.value == "prefill" and not self.value > 1:
            raise ConfigError(f"budget.value={self.value} must be a prefill speed-up > 1 for budget.target=prefill")
        if self.target is not None and self.target.value == "blocks" and not (self.value >= 1 and self.value == int(self.value)):
            raise ConfigError(f"budget.value={self.value} must be a whole number of blocks for budget.target=blocks")
        if self.target is not None and self.target.value == "params" and not 0 < self.value < 1:
            raise ConfigError(f"budget.value={self.value} must be a fraction in (0, 1) for budget.target=params")


@dataclass
class ReplacementSchema:
    mode: Mode
    ridge: Any = 0.0  # a number >= 0, or "auto": per layer, the grid value with the least held-out error
    granularity: Granularity = Granularity.attention  # what one replaced unit is (nbl.core.surgery)
    width: int = 2  # mode=conv: the map sees the last `width` inputs (nbl.core.surgery.ConvMap)
    validate: bool = False  # mode=conv: keep the one-token maps where the conv maps do worse on held-out windows
    rank: Any = None  # mode=conv: None (full), an int r, or a fraction of the hidden size (0.25: d / 4)

    def check(self) -> None:
        _positive("replacement.width", self.width, minimum=2)
        if self.rank is not None:
            rank = self.rank
            if isinstance(rank, bool) or not isinstance(rank, int | float) or not (rank > 0 and math.isfinite(rank)):
                raise ConfigError(f"replacement.rank={rank!r} must be null, an integer >= 1 or a fraction in (0, 1]")
            if isinstance(rank, float) and rank > 1:
                raise ConfigError(f"replacement.rank={rank} must be an integer (a rank) or a fraction in (0, 1]")
        if self.ridge == "auto":
            return
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, int | float):
            raise ConfigError(f"replacement.ridge={self.ridge!r} must be a number >= 0 or auto")
        _positive("replacement.ridge", self.ridge, minimum=0.0)


@dataclass
class PerplexitySchema:
    source: str
    seq_len: int = 512
    num_sequences: int = 8
    windows: Windows = Windows.stream  # documents: each window starts at a document's BOS (models trained so: Gemma)

    def check(self) -> None:
        _positive("eval.perplexity.seq_len", self.seq_len, minimum=2)
        _positive("eval.perplexity.num_sequences", self.num_sequences)


@dataclass
class EvalSchema:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # questions per task (per MMLU subject); null: the full sets
    batch_size: int = 8
    num_fewshot: dict[str, int] = field(default_factory=dict)
    offline: bool = True
    evaluate_base: bool = True
    perplexity: PerplexitySchema | None = None
    domains: list[str] = field(default_factory=list)  # further texts scored like eval.perplexity (e.g. sciq)
    backend: EvalBackend = EvalBackend.hf  # vllm: tasks and perplexity on the run's checkpoint served by vLLM
    kv_cache_gib: float = 2  # vllm: the engine's KV budget

    def check(self) -> None:
        if self.backend is EvalBackend.vllm:
            _kv_budget("eval.kv_cache_gib", self.kv_cache_gib)
            if importlib.util.find_spec("vllm") is None:
                raise ConfigError('eval.backend=vllm needs vLLM: pip install -e ".[serve-cpu]" (or ".[serve]" on GPUs)')
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"eval.limit={self.limit} must be > 0 (or null for the full sets)")
        _positive("eval.batch_size", self.batch_size)
        for task, shots in self.num_fewshot.items():
            _positive(f"eval.num_fewshot.{task}", shots, minimum=0)
        if self.perplexity is not None:
            self.perplexity.check()
        elif self.domains:
            raise ConfigError(f"eval.domains={self.domains} needs eval.perplexity (its seq_len and num_sequences)")


@dataclass
class SpeedSchema:
    enabled: bool = True
    engine: SpeedEngine = SpeedEngine.transformers  # vllm: both models served by vLLM (nbl.serve)
    batch_size: int = 1
    prompt_len: int = 512
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    saturating_batch: int = 64  # vllm: prompts served at once
    batch_prompt_len: int = 128  # vllm: their length
    long_prompt_len: int = 2048  # vllm: the long-context case
    kv_cache_gib: float = 2  # vllm: the KV budget each engine gets (GiB; fractions allowed)
    enforce_eager: bool = False  # vllm: no torch.compile

    def check(self) -> None:
        if not self.enabled:
            return
        for key in ("batch_size", "prompt_len", "new_tokens", "repeats"):
            _positive(f"speed.{key}", getattr(self, key))
        _positive("speed.warmup", self.warmup, minimum=0)
        if self.engine is SpeedEngine.vllm:
            for key in ("saturating_batch", "batch_prompt_len", "long_prompt_len"):
                _positive(f"speed.{key}", getattr(self, key))
            _kv_budget("speed.kv_cache_gib", self.kv_cache_gib)
            _positive("speed.new_tokens", self.new_tokens, minimum=2)  # decode speed needs a step after the first
            if importlib.util.find_spec("vllm") is None:
                raise ConfigError('speed.engine=vllm needs vLLM: pip install -e ".[serve-cpu]" (or ".[serve]" on GPUs)')


@dataclass
class LoggerSchema:
    mode: LoggerMode = LoggerMode.auto
    project: str = "nbl"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class FinetuneSchema:
    method: FinetuneMethod = FinetuneMethod.none  # nbl.finetune: healing of the replaced model
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    train_maps: bool = False
    steps: int = 0
    batch_size: int = 1
    lr: float = 3e-4

    def check(self) -> None:
        if self.method is FinetuneMethod.none:
            return
        for key in ("rank", "steps", "batch_size"):
            _positive(f"finetune.{key}", getattr(self, key))
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"finetune.lr={self.lr} must be a positive number")
        if not self.target_modules:
            raise ConfigError("finetune.target_modules is empty: name the projections that get adapters")


@dataclass
class QuantizeSchema:
    scheme: QuantScheme = QuantScheme.none  # nbl.quantization: applied to the base and the replaced model


@dataclass
class ExperimentSchema:
    model: ModelSchema
    calibration: CalibrationSchema
    selection: SelectionSchema
    replacement: ReplacementSchema
    eval: EvalSchema
    speed: SpeedSchema
    logger: LoggerSchema
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    quantize: QuantizeSchema = field(default_factory=QuantizeSchema)
    num_layers: int = 8
    layers: list[int] | None = None
    budget: BudgetSchema = field(default_factory=BudgetSchema)
    seed: int = 0
    device: str = "auto"
    save_checkpoint: bool = False
    checkpoint_shard_size: str = "4GB"  # the checkpoint's safetensors shards: at most this each ("500MB", "4GB")
    cache_dir: str = "~/.cache/nbl"

    def check(self) -> None:
        for part in (self.model, self.calibration, self.replacement, self.eval, self.speed, self.finetune, self.budget):
            part.check()
        _positive("num_layers", self.num_layers, minimum=0)
        _positive("selection.holdout_sequences", self.selection.holdout_sequences)
        self._check_texts()
        self._check_granularity()
        self._check_conv()
        if self.speed.enabled and self.speed.engine is SpeedEngine.vllm and self.quantize.scheme.value != "none":
            raise ConfigError("speed.engine=vllm serves saved checkpoints: a torchao-quantized model is not one")
        if self.eval.backend is EvalBackend.vllm and self.quantize.scheme.value != "none":
            raise ConfigError("eval.backend=vllm serves saved checkpoints: a torchao-quantized model is not one")
        from transformers.utils.hub import convert_file_size_to_int

        try:
            if convert_file_size_to_int(self.checkpoint_shard_size) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"checkpoint_shard_size={self.checkpoint_shard_size!r} is not a size: use '500MB' or '4GB'") from None
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers={self.layers} lists a layer twice")

    def _check_conv(self) -> None:
        """Convolution maps replace attention sub-blocks, fitted in one extra pass on the unmodified model, and keep
        a decode state that LoRA's adapters have no place for (vLLM holds it as a hybrid model's state)."""
        if self.replacement.mode is not Mode.conv:
            for key, unread in (("validate", self.replacement.validate), ("rank", self.replacement.rank is not None)):
                if unread:
                    raise ConfigError(f"replacement.{key} is read by replacement.mode=conv only")
            return
        unsupported = {
            f"replacement.granularity={self.replacement.granularity.value}": self.replacement.granularity
            is not Granularity.attention,
            f"calibration.mode={self.calibration.mode.value} (its refits are one-token maps)": self.calibration.mode
            is not CalibrationMode.one_pass,
            "finetune=lora": self.finetune.method is not FinetuneMethod.none,
        }
        for what, bad in unsupported.items():
            if bad:
                raise ConfigError(f"replacement.mode=conv does not support {what}: use replacement.mode=linear")

    def _judged_texts(self) -> set[str]:
        """The texts whose perplexity the run reports."""
        return {*(self.eval.domains or [])} | ({self.eval.perplexity.source} if self.eval.perplexity else set())

    def _check_texts(self) -> None:
        """No text the run is judged on may be one it calibrates or chooses on: the windows would be the same
        (tensor-equal), and an in-sample number would be reported as held-out."""
        from nbl.data import TEXT_SOURCES

        if self.calibration.source in self._judged_texts():
            raise ConfigError(
                f"calibration.source={self.calibration.source} is also evaluated (eval.perplexity / eval.domains): "
                "its perplexity windows would be the calibration windows; evaluate another text"
            )
        source = self.selection.heldout_source
        if source is None:
            return
        if source not in TEXT_SOURCES:
            raise ConfigError(f"selection.heldout_source={source} is unknown; choose from {sorted(TEXT_SOURCES)}")
        if source in self._judged_texts():
            raise ConfigError(
                f"selection.heldout_source={source} is also evaluated (eval.perplexity / eval.domains): a rule "
                "must not choose layers on the text it is judged on"
            )

    def _check_granularity(self) -> None:
        """Sub-blocks other than attention are fitted on the one-pass statistics (the sequential and propagated
        refits handle attention only), and a joint unit is a sub-block, not a layer."""
        granularity = self.replacement.granularity
        if granularity is Granularity.attention:
            return
        unsupported = {
            f"calibration.mode={self.calibration.mode.value}": self.calibration.mode is not CalibrationMode.one_pass,
            "explicit layers (a joint unit is a sub-block, not a layer)": granularity is Granularity.joint
            and self.layers is not None,
        }
        for what, bad in unsupported.items():
            if bad:
                raise ConfigError(_granularity_refusal(granularity.value, what))


def _granularity_refusal(granularity: str, what: str) -> str:
    return (
        f"replacement.granularity={granularity} does not support {what} yet: "
        "use replacement.granularity=attention, or selection cca / cosine / lmmse / random in one pass"
    )


def check_strategy(cfg: DictConfig) -> None:
    """What the chosen strategy cannot do with ``cfg`` (its granularities, calibration modes and own settings), and
    settings that only some strategies read, set where none reads them."""
    strategy = None if cfg.layers is not None else get_strategy(cfg.selection.strategy)  # explicit: none runs
    heldout_read = cfg.replacement.ridge == "auto" or cfg.replacement.validate or (
        strategy is not None and (strategy.heldout_windows or strategy.heldout_statistics)
    )
    if cfg.selection.heldout_source is not None and not heldout_read:
        chosen_by = "explicit layers" if strategy is None else f"selection={strategy.name}"
        raise ConfigError(
            f"selection.heldout_source={cfg.selection.heldout_source} is read by no part of this run ({chosen_by}, "
            f"replacement.ridge={cfg.replacement.ridge}): drop it, or choose a rule that measures on held-out text"
        )
    maps = cfg.replacement.mode == "linear" or (strategy is not None and strategy.chooses_modes)
    if cfg.finetune.method != "none" and cfg.finetune.train_maps and not maps:
        raise ConfigError("finetune.train_maps=true, but replacement=drop leaves no maps to train")
    refusal = get_replacement(cfg.replacement.mode).refusal(cfg)
    if refusal is not None:
        raise ConfigError(refusal)
    if strategy is None:
        if cfg.budget.target is not None:
            raise ConfigError("budget chooses how many units a rule replaces: explicit layers=[...] take none")
        return
    granularity = cfg.replacement.granularity
    if granularity not in strategy.granularities:
        if len(strategy.granularities) == 1:  # a method defined on one kind of unit (shortgpt: blocks)
            raise ConfigError(f"selection={strategy.name} chooses {strategy.granularities[0]} units: add "
                              f"replacement.granularity={strategy.granularities[0]} (got {granularity})")  # fmt: skip
        raise ConfigError(_granularity_refusal(granularity, f"selection={strategy.name}"))
    if strategy.chooses_modes and cfg.replacement.mode not in ("linear", "drop"):
        raise ConfigError(f"selection={strategy.name} chooses linear or drop per layer itself: not "
                          f"replacement.mode={cfg.replacement.mode}")  # fmt: skip
    _check_budget(cfg, strategy)
    refusal = strategy.refusal(cfg)
    if refusal is not None:
        raise ConfigError(refusal)


def _check_budget(cfg: DictConfig, strategy: Any) -> None:
    """A budget replaces num_layers for rules that choose a count of units (explicit layers and plans do not)."""
    if cfg.budget.target is None:
        return
    if strategy.chooses_modes:
        raise ConfigError(f"selection={strategy.name} meets its own selection.target: budget is for rules that take k")
    if cfg.replacement.granularity == "joint" and not strategy.ordered_steps:
        raise ConfigError(f"budget with replacement.granularity=joint needs a rule whose steps order the sub-blocks "
                          f"(selection=finercut), not selection={strategy.name}")  # fmt: skip


def checked_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` validated against :class:`ExperimentSchema`, values coerced to their types (enums as strings).

    Raises :class:`ConfigError` naming the offending key.
    """
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(ExperimentSchema), plain)
        obj: Any = OmegaConf.to_object(typed)
    except OmegaConfBaseException as err:
        raise ConfigError(_first_line(err)) from None
    obj.check()
    checked = OmegaConf.create(OmegaConf.to_container(typed, enum_to_str=True))
    check_strategy(checked)
    return checked


def _first_line(err: OmegaConfBaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = getattr(err, "full_key", None)
    return f"config key {key}: {lines[0]}" if key else lines[0]
