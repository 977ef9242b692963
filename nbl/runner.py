"""The experiment recipe: load -> calibrate -> score -> select -> replace -> evaluate -> speed -> write -> log.

Each step is a plain function usable from Python without Hydra; :func:`run_experiment` chains them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

import nbl
from nbl import distributed
from nbl.accounting import BytesModel, FlopModel, kv_cache_bytes_per_token
from nbl.adapters import adapter_for_config
from nbl.cache import atomic_write_text, cache_key, cached_calibration, cached_json, grown_steps, stats_entry
from nbl.calibration import CalibrationResult
from nbl.damage import Candidate, GreedyStep, cost_in_passes, greedy_selection, single_layer_damage, validate_sets
from nbl.data import TEXT_SOURCES, load_texts, token_sequences
from nbl.distributed import calibrate_sharded
from nbl.evaluation import average_headline, headline, perplexity, run_lm_eval
from nbl.finetune import LoraSettings, lora_finetune
from nbl.layerwise import calibrate_layerwise_parts, refit_propagated
from nbl.linalg import Ridge
from nbl.models import load_smollm2, random_model, smollm2_folder, tiny_config
from nbl.offline_tasks import OFFLINE_TASKS, is_builtin_task
from nbl.plan import Metric, PlanStep, greedy_plan, reachable, target_metric
from nbl.provenance import code_identity, file_digest, model_revision, provenance
from nbl.quantization import quantize_model
from nbl.report import method_name, plot_loss_curve, summary_markdown
from nbl.schema import ConfigError, checked_config
from nbl.selection import MEASURED, auto_ridge, layer_scores, lmmse_scores, select_layers
from nbl.sequential import SequentialStep, StepStore, linearize_sequentially
from nbl.speed import decode_memory, decode_timer, interleaved, prefill, random_prompt, timed
from nbl.surgery import Part, execution_device, live_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- checks before any heavy work ------------------------------------------------------------------
def model_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The architecture of the configured model, read without loading weights."""
    if model_cfg.source == "embedded":
        return AutoConfig.from_pretrained(smollm2_folder())
    if model_cfg.source == "hub":
        return AutoConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision)
    if model_cfg.source == "tiny":
        vocab = len(AutoTokenizer.from_pretrained(smollm2_folder()))
        return tiny_config(model_cfg.path, vocab_size=vocab)
    raise ValueError(f"unknown model source {model_cfg.source!r}; use embedded, hub or tiny")


def validate(cfg: DictConfig) -> tuple[DictConfig, PretrainedConfig]:
    """Every setting checked before any weights load; returns (the typed config, the model's config).

    Types, allowed values and ranges come from :mod:`nbl.schema`; here the checks that need the
    model's architecture, the data files or lm-eval's task list.
    """
    cfg = checked_config(cfg)
    sources = [*TEXT_SOURCES, "local"]
    if cfg.calibration.source not in sources:
        raise ConfigError(f"calibration.source={cfg.calibration.source} is unknown; choose from {sources}")
    if cfg.eval.perplexity is not None:
        for key, source in [
            ("eval.perplexity.source", cfg.eval.perplexity.source),
            *(("eval.domains", d) for d in cfg.eval.domains),
        ]:
            if source not in TEXT_SOURCES:
                raise ConfigError(f"{key}: {source} is unknown; choose from {list(TEXT_SOURCES)}")
    if cfg.calibration.source == "local":
        load_texts("local", cfg.calibration.path)  # missing, undecodable or malformed file: named now
    tasks = list(cfg.eval.tasks)
    if cfg.eval.offline:
        missing = [t for t in tasks if t not in OFFLINE_TASKS]
        if missing:
            raise ConfigError(f"no packaged data for {missing}; offline tasks are {', '.join(OFFLINE_TASKS)}")
    elif tasks:
        unknown = [t for t in tasks if not is_builtin_task(t)]
        if unknown:
            raise ConfigError(f"eval.tasks: lm-eval has no tasks named {unknown}")
    config = model_config(cfg.model)
    adapter = adapter_for_config(config)  # unsupported architecture -> clear error
    n = config.num_hidden_layers
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"layers {bad} do not exist: {cfg.model.name} has layers 0..{n - 1}")
    elif not cfg.num_layers <= n * len(PARTS_OF[cfg.replacement.granularity]):
        units = n * len(PARTS_OF[cfg.replacement.granularity])
        raise ConfigError(
            f"num_layers={cfg.num_layers} is outside 0..{units} ({cfg.model.name} has {n} layers, "
            f"{units} {cfg.replacement.granularity} units)"
        )
    if cfg.selection.strategy == "plan" and cfg.layers is None:
        best = reachable(config, plan_metric(cfg, config))
        if best < cfg.selection.target_value:
            raise ConfigError(
                f"selection.target_value={cfg.selection.target_value} is out of reach: dropping every attention "
                f"layer of {cfg.model.name} gives {cfg.selection.target}={best:.4f}"
            )
    d = adapter.hidden_size(config)
    tokens = cfg.calibration.num_sequences * cfg.calibration.seq_len
    if tokens <= d:
        raise ConfigError(
            f"calibration.num_sequences x calibration.seq_len = {tokens} tokens; hidden size {d} needs more "
            "than that for a full-rank covariance"
        )
    return cfg, config


# -- steps ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(model_cfg: DictConfig):
    if model_cfg.source in ("embedded", "tiny"):
        return AutoTokenizer.from_pretrained(smollm2_folder())
    return AutoTokenizer.from_pretrained(model_cfg.path, revision=model_cfg.revision)


def load_model(model_cfg: DictConfig, config: PretrainedConfig, device: torch.device, seed: int = 0):
    """The configured model in eval mode on ``device``."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.source == "embedded":
        return load_smollm2(dtype)[0].to(device)
    if model_cfg.source == "tiny" or model_cfg.random_weights:
        with torch.device(device):
            return random_model(config, dtype, seed)
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path, revision=model_cfg.revision, dtype=dtype, device_map=model_cfg.device_map
    )
    if model_cfg.device_map is None:
        model = model.to(device)
    return model.eval()


def calibration_batches(
    tokenizer, cal_cfg: DictConfig, heldout: int = 0, heldout_source: str | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration batches, held-out batches): the configured windows, then ``heldout`` further windows of
    the same text, tokenized once; or, with a ``heldout_source`` other than the calibration text, ``heldout``
    windows of that text. The calibration windows do not depend on ``heldout``."""
    texts = load_texts(cal_cfg.source, cal_cfg.path)
    n = cal_cfg.num_sequences
    other = heldout_source is not None and heldout_source != cal_cfg.source
    ids = token_sequences(
        tokenizer, texts, n + (0 if other else heldout), cal_cfg.seq_len, cal_cfg.seed, cal_cfg.windows
    )
    held = ids[n:]
    if other and heldout:
        held = token_sequences(
            tokenizer, load_texts(heldout_source), heldout, cal_cfg.seq_len, cal_cfg.seed, cal_cfg.windows
        )
    return list(ids[:n].split(cal_cfg.batch_size)), list(held.split(cal_cfg.batch_size))


def finetune_batches(tokenizer, cfg: DictConfig) -> list[torch.Tensor]:
    """The fine-tuning windows (finetune.steps batches of finetune.batch_size): drawn with the calibration
    windows, after them and the held-out ones, so they share no token with either."""
    cal, ft = cfg.calibration, cfg.finetune
    skip = cal.num_sequences + cfg.selection.holdout_sequences
    texts = load_texts(cal.source, cal.path)
    ids = token_sequences(tokenizer, texts, skip + ft.steps * ft.batch_size, cal.seq_len, cal.seed, cal.windows)
    return list(ids[skip:].split(ft.batch_size))


def heal(model: PreTrainedModel, batches: list[torch.Tensor], cfg: DictConfig, output_dir: Path
         ) -> tuple[PreTrainedModel, dict[str, Any]]:  # fmt: skip
    """LoRA healing as configured; the loss curve is returned and drawn into the run folder."""
    ft = cfg.finetune
    settings = LoraSettings(
        rank=ft.rank,
        alpha=ft.alpha,
        dropout=ft.dropout,
        target_modules=tuple(ft.target_modules),
        train_maps=ft.train_maps,
        steps=ft.steps,
        lr=ft.lr,
    )
    model, trace = lora_finetune(model, batches, settings)
    plot = plot_loss_curve(trace.losses, output_dir / "finetune_loss.png", f"LoRA healing (r={ft.rank})")
    info = {
        "losses": trace.losses,
        "trainable_params": trace.trainable_params,
        "tokens": sum(b.numel() for b in batches[: ft.steps]),
        "seconds": trace.seconds,
        "plot": str(plot),
    }
    log.info("LoRA healing: loss %.3f -> %.3f in %.0f s", trace.losses[0], trace.losses[-1], trace.seconds)
    return model, info


def model_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """What identifies the model's weights (part of every cache key): the resolved hub commit included."""
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields.pop("name", None)
    fields.pop("device_map", None)
    if cfg.model.random_weights or cfg.model.source == "tiny":
        fields["seed"] = cfg.seed
    elif cfg.model.source == "hub":
        fields["resolved_revision"] = model_revision(config)
    return fields


def calibration_fields(cfg: DictConfig, config: PretrainedConfig, replaced_order: list[int] | None = None) -> dict:
    """The statistics cache key: model, data, calibration settings, the partial replacement, the code.

    ``replaced_order`` (sequential mode) names the layers already replaced, in order; with the
    replacement settings it determines the partially replaced model.
    """
    cal = OmegaConf.to_container(cfg.calibration, resolve=True)
    for key in ("batch_size", "method", "offload"):  # the same sums up to float64 round-off (tested)
        cal.pop(key)
    cal.pop("extra_parts")  # which further parts a pass gathers changes none of the sums
    cal.pop("mode")  # the one-pass statistics are the first step of the sequential and propagated modes
    if replaced_order:
        cal["replaced_order"] = list(replaced_order)
        cal["replacement"] = OmegaConf.to_container(cfg.replacement, resolve=True)
    if cal["source"] == "local":
        cal["sha256"] = file_digest(cal["path"])  # the content, not the name, identifies the text
    return {"model": model_fields(cfg, config), "calibration": cal, "code": code_identity()}


# the sub-blocks each replacement.granularity calibrates and replaces
PARTS_OF: dict[str, tuple[Part, ...]] = {
    "attention": ("attention",),
    "mlp": ("mlp",),
    "block": ("block",),
    "joint": ("attention", "mlp"),
}


def calibrate(
    model: PreTrainedModel, batches: list[torch.Tensor], cfg: DictConfig, parts: tuple[Part, ...] = ("attention",)
) -> dict[Part, CalibrationResult]:
    """One calibration pass over every part asked for, as configured: forward hooks, or layer by layer
    (optionally offloaded to the CPU)."""
    cal = cfg.calibration
    if cal.method == "layerwise":
        return calibrate_layerwise_parts(
            model, batches, parts, device=resolve_device(cfg.device), store=_store(cfg), gram_dtype=cal.gram_dtype
        )
    return nbl.calibrate_parts(model, batches, parts, gram_dtype=cal.gram_dtype)


def _store(cfg: DictConfig) -> torch.device | None:
    """Where layer-by-layer passes keep layers and activations between layers."""
    return torch.device("cpu") if cfg.calibration.offload else None


def _expect_layers(model: PreTrainedModel, part: Part = "attention") -> Callable[[CalibrationResult], None]:
    """A check for cached statistics: one d x d accumulator per layer of ``model`` that keeps ``part``."""
    d = nbl.get_adapter(model).hidden_size(model.config)
    live = live_layers(model, part)

    def expect(stats: CalibrationResult) -> None:  # after stats.check(): every layer has the first one's shape
        first = stats[next(iter(stats))]
        if list(stats) != live or (first.d_in, first.d_out) != (d, d):
            raise ValueError(
                f"it holds layers {list(stats)} of size {first.d_in}, the model has {part} layers {live} of size {d}"
            )

    return expect


def calibrate_cached(
    model: PreTrainedModel,
    batches: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    config: PretrainedConfig,
    rank: int = 0,
    world: int = 1,
    parts: tuple[Part, ...] = ("attention",),
) -> tuple[dict[Part, CalibrationResult] | None, dict]:
    """Statistics of the model's ``parts`` (one cache entry each), from the cache when the same pass ran before;
    the parts not cached come from one pass. A pass the run makes anyway also gathers the uncached parts of
    ``calibration.extra_parts`` and stores them for later runs (a sweep over granularities then pays one pass).

    With several ranks (torchrun), rank 0 looks the entries up and tells the others; on a miss every rank
    calibrates its shard of the batches and the sums are all-reduced. Ranks > 0 get (None, {}).
    """
    start = time.perf_counter()
    folder = Path(cfg.cache_dir) / "stats"
    extra = tuple(p for p in cfg.calibration.extra_parts if p not in parts)
    fields = {part: part_fields(calibration_fields(cfg, config), part) for part in (*parts, *extra)}
    decision: list[Any] = [None]  # rank 0 decides what one pass gathers: the run's parts, extra ones on a miss
    if rank == 0:
        absent = {p for p in fields if not stats_entry(folder, fields[p]).is_file()}
        miss = bool(absent & set(parts))
        decision = [(miss, (*parts, *(p for p in extra if p in absent)) if miss else parts)]
    if world > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    miss, pass_parts = decision[0]

    reduced: dict[Part, CalibrationResult] | None = None
    if world > 1:
        if miss:
            reduced = calibrate_sharded(lambda shard: calibrate(model, shard, cfg, pass_parts), batches(), rank, world)
        if rank > 0:
            return None, {}

    # rank 0 after a sharded pass: its reduced sums; an entry that vanished after the lookup: alone
    one_pass = functools.cache(lambda: reduced if reduced is not None else calibrate(model, batches(), cfg, pass_parts))
    stats, hits, paths = {}, {}, {}
    for part in pass_parts:  # the extra parts are stored for later runs, not used here
        stats[part], hits[part], paths[part] = cached_calibration(
            folder, fields[part], lambda part=part: one_pass()[part], expect=_expect_layers(model, part)
        )
    stats = {p: stats[p] for p in parts}
    tokens = stats[parts[0]].num_tokens
    info = {
        "tokens": tokens,
        "cache_hit": all(hits[p] for p in parts),
        "cache_file": str(paths[parts[0]]) if len(parts) == 1 else {p: str(paths[p]) for p in parts},
        "seconds": time.perf_counter() - start,
        "world_size": world,
    }
    log.info("calibration: %s (%d tokens)", "cache hit" if info["cache_hit"] else "computed", tokens)
    return stats, info


def part_fields(fields: dict[str, Any], part: Part) -> dict[str, Any]:
    """A statistics cache key for ``part`` (attention keeps the key it always had)."""
    return fields if part == "attention" else {**fields, "part": part}


def heldout_calibration(
    model: PreTrainedModel,
    heldout: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    config: PretrainedConfig,
    parts: tuple[Part, ...] = ("attention",),
) -> dict[Part, CalibrationResult]:
    """Statistics of the held-out windows (the ``selection.holdout_sequences`` windows after the calibration
    windows): the exact held-out error of every map, from second moments. Costs holdout_sequences /
    num_sequences of a calibration pass; cached beside the calibration statistics."""
    fields = {**calibration_fields(cfg, config), **heldout_fields(cfg)}
    one_pass = functools.cache(lambda: calibrate(model, heldout(), cfg, parts))
    out = {}
    for part in parts:
        out[part], hit, _ = cached_calibration(
            Path(cfg.cache_dir) / "stats",
            part_fields(fields, part),
            lambda part=part: one_pass()[part],
            expect=_expect_layers(model, part),
        )
        log.info(
            "held-out %s statistics: %s (%d tokens)", part, "cache hit" if hit else "computed", out[part].num_tokens
        )
    return out


def measured_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """What a measured selection's damages depend on besides its own settings: the statistics' key, the
    held-out windows, the damage measure."""
    return {**calibration_fields(cfg, config), **heldout_fields(cfg), "measure": cfg.selection.measure}


def heldout_fields(cfg: DictConfig) -> dict[str, Any]:
    """Which held-out windows: how many, and of which text when it is not the calibration text."""
    fields: dict[str, Any] = {"heldout_sequences": cfg.selection.holdout_sequences}
    if cfg.selection.heldout_source not in (None, cfg.calibration.source):
        fields["heldout_source"] = cfg.selection.heldout_source
    return fields


def plan_metric(cfg: DictConfig, config: PretrainedConfig) -> Metric:
    """The quantity selection=plan must reach, at the speed settings' prompt length and mid-decode context."""
    return target_metric(config, cfg.selection.target, cfg.speed.prompt_len, mid_context(cfg.speed))


def plan_cached(
    model: PreTrainedModel,
    stats: CalibrationResult,
    heldout: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    config: PretrainedConfig,
    ridge: Ridge,
) -> list[PlanStep]:
    """:func:`greedy_plan`'s steps to ``selection.target_value``, cached by everything but that value: a run
    continues (or cuts) the longest earlier run of the same inputs, so a sweep over values pays once."""
    sel = cfg.selection
    fields = {
        **measured_fields(cfg, config),
        "target": sel.target,
        "speed": {"prompt_len": cfg.speed.prompt_len, "new_tokens": cfg.speed.new_tokens},
        "ridge": OmegaConf.to_container(cfg.replacement, resolve=True)["ridge"],
    }

    def grow(earlier: list[dict]) -> list[dict]:
        start = [PlanStep(**step) for step in earlier]
        metric = plan_metric(cfg, config)
        steps = greedy_plan(model, stats, heldout(), metric, sel.target_value, sel.measure, ridge, start=start)
        return [dataclasses.asdict(step) for step in steps]

    return [PlanStep(**step) for step in grown_steps(Path(cfg.cache_dir) / "plan", fields, grow)]


def warn_measurement_cost(cfg: DictConfig, n_layers: int) -> float:
    """Tell the user when a measured selection costs more than one calibration pass per 4 layers chosen."""
    k, sel = cfg.num_layers, cfg.selection
    if sel.strategy == "plan":  # k unknown before the plan is made: say what one step costs
        passes = 2 * cost_in_passes(n_layers, n_layers, 1, sel.holdout_sequences, cfg.calibration.num_sequences)
        log.info("selection=plan: each step costs about %.1f calibration passes (linear and drop tried)", passes)
        return passes
    steps = k if sel.strategy == "greedy" else 1
    candidates = n_layers - (k - 1) / 2 if sel.strategy == "greedy" else n_layers  # the mean over the steps
    passes = cost_in_passes(n_layers, candidates, steps, sel.holdout_sequences, cfg.calibration.num_sequences)
    if passes > k / 4:
        log.warning(
            "selection=%s costs about %.1f calibration passes (%d held-out windows), more than one per 4 layers "
            "chosen (%.1f); fewer selection.holdout_sequences make it cheaper and noisier",
            sel.strategy, passes, sel.holdout_sequences, k / 4,
        )  # fmt: skip
    return passes


def greedy_cached(
    model: PreTrainedModel,
    stats: CalibrationResult,
    heldout: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    config: PretrainedConfig,
    ridge: Ridge,
) -> list[GreedyStep]:
    """:func:`greedy_selection`'s k steps, cached; a run continues the longest cached run of the same inputs
    (greedy steps do not depend on k), so a sweep over k costs the largest k's steps once."""
    fields = {**measured_fields(cfg, config), "replacement": OmegaConf.to_container(cfg.replacement, resolve=True)}
    k, rep = cfg.num_layers, cfg.replacement

    def grow(earlier: list[dict]) -> list[dict]:
        if len(earlier) >= k:
            return earlier[:k]
        start = [GreedyStep(**step) for step in earlier]
        steps = greedy_selection(
            model, stats, heldout(), k, rep.mode, ridge, start=start, measure=cfg.selection.measure,
            part=rep.granularity,
        )  # fmt: skip
        return [dataclasses.asdict(step) for step in steps]

    return [GreedyStep(**step) for step in grown_steps(Path(cfg.cache_dir) / "greedy", fields, grow)]


def damage_cached(
    model: PreTrainedModel,
    stats: CalibrationResult,
    heldout: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    config: PretrainedConfig,
    ridge: Ridge,
) -> dict[int, float]:
    """:func:`single_layer_damage` of every layer, cached (it does not depend on k: a sweep over k pays once)."""
    rep = cfg.replacement
    fields = {**measured_fields(cfg, config), "replacement": OmegaConf.to_container(rep, resolve=True)}

    def compute() -> dict:
        damage = single_layer_damage(
            model, stats, heldout(), mode=rep.mode, ridge=ridge, measure=cfg.selection.measure, part=rep.granularity
        )
        return {str(i): v for i, v in damage.items()}  # JSON keys are strings

    damage, hit = cached_json(Path(cfg.cache_dir) / "damage", fields, compute)
    log.info("single-layer damage: %s", "cache hit" if hit else "measured")
    return {int(i): float(v) for i, v in damage.items()}


def validated_choice(
    model: PreTrainedModel,
    stats: CalibrationResult,
    heldout: Callable[[], list[torch.Tensor]],
    cfg: DictConfig,
    scores: dict[str, dict[int, float]],
    ridge: Ridge,
) -> list[Candidate]:
    """selection=validated: the k layers each ranking (measured single-layer damage, cosine, the paper's CCA
    bound) puts first, each set replaced together and its damage measured on the held-out windows (listed in
    that order; the run takes the least damaging). Costs one held-out forward per distinct set beyond the
    single-layer damages."""
    k, rep = cfg.num_layers, cfg.replacement
    proposals = {
        "loss": select_layers(scores["loss"], k, "loss"),
        "cosine": select_layers(scores["cosine"], k, "cosine"),
        "cca": select_layers(scores[cca_key(cfg.selection)], k, "cca"),
    }
    found = validate_sets(
        model, stats, heldout(), proposals, rep.mode, ridge, cfg.selection.measure, rep.granularity
    )  # fmt: skip
    for c in found:
        log.info("validated: %s's %d layers %s: damage %.4f", " = ".join(c.rules), k, c.layers, c.damage)
    return found


def score_all(
    stats: CalibrationResult,
    selection: DictConfig,
    explicit: bool,
    heldout: CalibrationResult | None = None,
    ridge: Ridge = 0.0,
) -> dict[str, dict[int, float]]:
    """The scores this run needs, for every layer: the cosine (free: summed during calibration), the CCA
    bound of the configured target when it drives the selection, the held-out LMMSE error when held-out
    statistics are there. A bound costs O(d^3) (7.5 s per layer at d = 4096 on 2 CPU cores,
    docs/results.md), so none is computed for nothing."""
    scores = {"cosine": layer_scores(stats, "cosine")}
    key = score_key(selection)
    if key is not None and key.startswith("cca") and not explicit:
        scores[key] = layer_scores(stats, "cca", selection.cca_target)
    if key == "validated" and not explicit:  # the paper's ranking is one of the proposals
        scores[cca_key(selection)] = layer_scores(stats, "cca", selection.cca_target)
    if heldout is not None:
        scores["lmmse"] = lmmse_scores(stats, heldout, ridge)
    return scores


def cca_key(selection: DictConfig) -> str:
    """The name of the CCA bound's scores for the configured target."""
    return "cca" if selection.cca_target == "residual" else "cca_attention"


def score_key(selection: DictConfig) -> str | None:
    """Which of :func:`score_all`'s scores drives the selection (None: random)."""
    if selection.strategy == "cca":
        return cca_key(selection)
    return None if selection.strategy == "random" else selection.strategy


def choose_units(cfg: DictConfig, part_scores: dict[Part, dict[str, dict[int, float]]], n_layers: int
                 ) -> dict[Part, list[int]]:  # fmt: skip
    """The layers to replace, per part. One part: :func:`choose_layers`. Several (granularity=joint): the
    k sub-blocks of best score among all parts' together (LLM-Drop's joint layer drop, with cosine)."""
    if len(part_scores) == 1:
        ((part, scores),) = part_scores.items()
        return {part: choose_layers(cfg, scores, n_layers)}
    key = score_key(cfg.selection)
    if key is None:
        units = {(i, part): 0.0 for part in part_scores for i in range(n_layers)}
        chosen = select_layers(units, cfg.num_layers, "random", seed=cfg.selection.seed)
    else:
        units = {(i, part): s for part, scores in part_scores.items() for i, s in scores[key].items()}
        chosen = select_layers(units, cfg.num_layers, cfg.selection.strategy)
    return {part: sorted(i for i, p in chosen if p == part) for part in part_scores}


def choose_layers(cfg: DictConfig, scores: dict[str, dict[int, float]], n_layers: int) -> list[int]:
    if cfg.layers is not None:
        return sorted(cfg.layers)
    key = score_key(cfg.selection)
    if key in ("greedy", "plan", "validated"):  # the layers the steps / the winning set chose
        return sorted(scores[key])
    if key is None:
        return select_layers(dict.fromkeys(range(n_layers), 0.0), cfg.num_layers, "random", seed=cfg.selection.seed)
    return select_layers(scores[key], cfg.num_layers, cfg.selection.strategy)


def evaluate(model: PreTrainedModel, tokenizer, eval_cfg: DictConfig, cache_dir: Path) -> dict[str, Any]:
    """lm-eval tasks and perplexity of one model."""
    tasks = run_lm_eval(
        model,
        tokenizer,
        list(eval_cfg.tasks),
        # rebuilt task data depends on the code and the data package: one folder per code identity
        cache_dir / "lm_eval_tasks" / cache_key(code_identity()),
        offline=eval_cfg.offline,
        limit=eval_cfg.limit,
        batch_size=eval_cfg.batch_size,
        num_fewshot=dict(eval_cfg.num_fewshot or {}),
    )
    out: dict[str, Any] = {"tasks": tasks, "average": average_headline(tasks)}
    if eval_cfg.perplexity:
        ppl = eval_cfg.perplexity
        texts = load_texts(ppl.source)
        ids = token_sequences(tokenizer, texts, ppl.num_sequences, ppl.seq_len, seed=0)
        out["perplexity"] = perplexity(model, ids)
        out["perplexity_text"] = ppl.source if ppl.source != "wikipedia" else "wikipedia (WikiText-2 stand-in)"
        for domain in eval_cfg.domains:  # further texts, same window count and length
            ids = token_sequences(tokenizer, load_texts(domain), ppl.num_sequences, ppl.seq_len, seed=0)
            out.setdefault("domains", {})[domain] = perplexity(model, ids)
    return out


def measure_speed(base: PreTrainedModel, replaced: PreTrainedModel, speed_cfg: DictConfig) -> dict[str, Any]:
    """Interleaved base vs replaced: prefill and cached-decode tokens/s, ratios, FLOP-model predictions."""
    device = next(base.parameters()).device
    prompt = random_prompt(base, speed_cfg.batch_size, speed_cfg.prompt_len)
    times = interleaved(
        {
            "prefill_base": timed(lambda: prefill(base, prompt), device),
            "prefill_nbl": timed(lambda: prefill(replaced, prompt), device),
            "decode_base": decode_timer(base, prompt, speed_cfg.new_tokens),
            "decode_nbl": decode_timer(replaced, prompt, speed_cfg.new_tokens),
        },
        repeats=speed_cfg.repeats,
        warmup=speed_cfg.warmup,
    )
    n_prefill = speed_cfg.batch_size * speed_cfg.prompt_len
    n_decode = speed_cfg.batch_size * speed_cfg.new_tokens
    predicted = predicted_speedups(base.config, nbl.replaced_layers(replaced), speed_cfg, nbl.replaced_mlps(replaced))
    memory = {name: decode_memory(m, prompt, speed_cfg.new_tokens) for name, m in (("base", base), ("nbl", replaced))}
    return {
        "device": str(device),
        "prefill_tok_s_base": n_prefill / times["prefill_base"].median_s,
        "prefill_tok_s_nbl": n_prefill / times["prefill_nbl"].median_s,
        "decode_tok_s_base": n_decode / times["decode_base"].median_s,
        "decode_tok_s_nbl": n_decode / times["decode_nbl"].median_s,
        "prefill_speedup": times["prefill_base"].median_s / times["prefill_nbl"].median_s,
        "decode_speedup": times["decode_base"].median_s / times["decode_nbl"].median_s,
        "prefill_speedup_predicted": predicted["prefill_speedup"],
        "decode_speedup_predicted": predicted["decode_speedup"],
        **{f"{key}_{name}": value for name, m in memory.items() for key, value in m.items()},
        "repeats": speed_cfg.repeats,
        "settings": OmegaConf.to_container(speed_cfg, resolve=True),
    }


def mid_context(speed_cfg: DictConfig) -> int:
    """The context length of the middle decoding step: where the predictions evaluate decode speed."""
    return speed_cfg.prompt_len + speed_cfg.new_tokens // 2


def predicted_speedups(
    config: PretrainedConfig, replaced: dict[int, str], speed_cfg: DictConfig, mlps: dict[int, str] | None = None
) -> dict[str, float]:
    """Speed-ups the FLOP and bytes models predict for this replacement (``replaced``: attention modes,
    ``mlps``: MLP modes) at the speed settings' prompt length and mid-decode context, recorded whether or not
    speed is measured: the x axis of damage-vs-speed plots."""
    context, mlps = mid_context(speed_cfg), mlps or {}
    flops = FlopModel(config)
    return {
        "prefill_speedup": flops.prefill_speedup(replaced, speed_cfg.prompt_len, mlps),
        "decode_speedup": flops.decode_speedup(replaced, context, mlps),
        "decode_bytes_speedup": BytesModel(config).decode_speedup(replaced, context, mlps),
    }


def replace(
    model: PreTrainedModel,
    cfg: DictConfig,
    stats: CalibrationResult,
    chosen: list[int],
    batches: Callable[[], list[torch.Tensor]],
    recalibrate: Callable[[PreTrainedModel, list[int]], CalibrationResult],
    store: StepStore | None = None,
    ridge: Ridge = 0.0,
    plan: dict[int, str] | None = None,
) -> tuple[list[int], dict[int, str], list[dict[str, float]] | None]:
    """Replace layers as ``calibration.mode`` says. Returns (layers, their modes, the sequential steps).

    one_pass: ``chosen`` with maps fitted on ``stats``. propagated: ``chosen`` (from the one-pass scores or
    explicit) in one layer-by-layer pass, each map fitted on the inputs the earlier replacements produce.
    sequential: one layer at a time, each map fitted on re-calibrated statistics of the partially replaced
    model; the layers are the explicit ones (front to back) or chosen step by step by the strategy.
    ``ridge``: the resolved ridge (a number, or one per layer for ``replacement.ridge=auto``). ``plan``
    (selection=plan): layer -> "linear" or "drop", fitted on ``stats``.
    """
    rep = cfg.replacement
    if plan is not None:  # selection=plan: each layer its own mode
        for mode in ("linear", "drop"):
            nbl.linearize(model, stats, [i for i in chosen if plan[i] == mode], mode=mode, ridge=ridge)
        return chosen, nbl.replaced_layers(model), None
    if cfg.calibration.mode == "one_pass":
        return chosen, nbl.linearize(model, stats, chosen, mode=rep.mode, ridge=ridge), None
    if cfg.calibration.mode == "propagated":
        refit_propagated(
            model,
            batches(),
            chosen,
            mode=rep.mode,
            ridge=ridge,
            device=resolve_device(cfg.device),
            store=_store(cfg),
            gram_dtype=cfg.calibration.gram_dtype,
        )
        return chosen, nbl.replaced_layers(model), None
    steps = linearize_sequentially(
        model,
        lambda m, order: stats if not order else recalibrate(m, order),
        len(chosen),
        cfg.selection.strategy,
        mode=rep.mode,
        ridge=ridge,
        cca_target=cfg.selection.cca_target,
        seed=cfg.selection.seed,
        order=chosen if cfg.layers is not None else None,
        store=store,
    )
    layers = sorted(s.layer for s in steps)
    return layers, nbl.replaced_layers(model), [{"layer": s.layer, "score": s.score} for s in steps]


def sequential_store(cfg: DictConfig, config: PretrainedConfig) -> StepStore:
    """Cache for sequential steps that keeps, per step, the choice and the chosen layer's statistics only.

    A step is identified by the calibration key of the partially replaced model (the layers replaced so
    far, in order) and by how it chooses; a sweep over k replays the shorter runs' steps without a pass.
    k steps store k single-layer entries (3 d^2 + 2 d floats each), not k copies of every layer.
    """
    folder = Path(cfg.cache_dir) / "sequential"

    def store(done: list[int], compute: Callable[[], SequentialStep]) -> SequentialStep:
        fields = {
            **calibration_fields(cfg, config, done),
            "choice": {"selection": OmegaConf.to_container(cfg.selection, resolve=True), "explicit": cfg.layers},
        }
        fresh: list[SequentialStep] = []

        def record() -> dict:
            fresh.append(compute())
            return {"layer": fresh[0].layer, "score": fresh[0].score, "scores": fresh[0].scores}

        choice, _ = cached_json(folder, fields, record)
        layer = int(choice["layer"])

        def one_layer() -> CalibrationResult:
            step = fresh[0] if fresh else compute()
            if step.layer != layer:
                raise RuntimeError(f"step {len(done)} chose layer {step.layer} again where its record says {layer}")
            return CalibrationResult({layer: step.statistics}, {layer: 0.0})

        stats, _, _ = cached_calibration(folder, {**fields, "layer": layer}, one_layer)
        scores = {int(i): float(v) for i, v in choice["scores"].items()}
        return SequentialStep(layer, float(choice["score"]), scores, stats[layer])

    return store


# -- the recipe ----------------------------------------------------------------------------------------
@dataclass
class RunContext:
    output_dir: Path
    wandb_group: str | None = None
    overrides: list[str] | None = None  # the command-line overrides of this job (Hydra's job overrides)


RUN_MARKER = "nbl-run.json"


def claim_output_dir(folder: Path) -> dict[str, Any]:
    """Make ``folder`` this run's own: refuse one that already holds another run's marker or results.

    The marker is created exclusively, so two processes given the same folder cannot both write there.
    """
    folder.mkdir(parents=True, exist_ok=True)
    run = {"run_id": folder.name, "pid": os.getpid(), "host": platform.node(), "started": _now()}
    if (folder / "results.json").exists():
        raise FileExistsError(f"{folder} already holds a results.json: choose another output folder")
    try:
        with open(folder / RUN_MARKER, "x") as f:
            f.write(json.dumps(run, indent=2) + "\n")
    except FileExistsError:
        raise FileExistsError(
            f"{folder} is used by another run ({folder / RUN_MARKER}): choose another output folder"
        ) from None
    return run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_experiment(cfg: DictConfig, ctx: RunContext) -> dict[str, Any]:
    from nbl.tracking import Tracker

    cfg, config = validate(cfg)  # before any weights are loaded
    rank, world = distributed.setup()  # torchrun: one process per GPU, ranks > 0 only help calibrate
    if rank == 0:
        run = claim_output_dir(ctx.output_dir)
        (ctx.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    strategy = cfg.selection.strategy if cfg.layers is None else None
    measured = strategy in MEASURED
    auto = cfg.replacement.ridge == "auto"
    uses_heldout_stats = auto or strategy == "lmmse"
    extra = cfg.selection.holdout_sequences if measured or uses_heldout_stats else 0
    windows = functools.cache(  # built at most once
        lambda: calibration_batches(tokenizer, cfg.calibration, extra, cfg.selection.heldout_source)
    )

    def batches() -> list[torch.Tensor]:
        return windows()[0]

    def heldout() -> list[torch.Tensor]:
        return windows()[1]

    if extra or not stats_entry(Path(cfg.cache_dir) / "stats", calibration_fields(cfg, config)).is_file():
        windows()  # too little or unreadable text fails here, before the weights load
    train = finetune_batches(tokenizer, cfg) if cfg.finetune.method == "lora" else None
    # offloaded: the weights wait on the CPU and each layer visits the device only while it calibrates
    model = load_model(cfg.model, config, torch.device("cpu") if cfg.calibration.offload else device, cfg.seed)
    n_layers = config.num_hidden_layers

    parts = PARTS_OF[cfg.replacement.granularity]
    all_stats, calibration_info = calibrate_cached(model, batches, cfg, config, rank=rank, world=world, parts=parts)
    if all_stats is None:  # a helper rank: its shard is in rank 0's statistics
        return {}
    stats_device = execution_device(model.get_input_embeddings())  # score and fit where the model computes
    all_stats = {p: s.to(stats_device) for p, s in all_stats.items()}
    start = time.perf_counter()
    held = heldout_calibration(model, heldout, cfg, config, parts) if uses_heldout_stats else {}
    held = {p: s.to(stats_device) for p, s in held.items()}
    ridges = {p: auto_ridge(all_stats[p], held[p]) if auto else float(cfg.replacement.ridge) for p in parts}
    part_scores = {
        p: score_all(all_stats[p], cfg.selection, cfg.layers is not None, held.get(p), ridges[p]) for p in parts
    }
    # the measured strategies and the refitting modes replace attention only (checked by the schema)
    stats, ridge, scores = all_stats[parts[0]], ridges[parts[0]], part_scores[parts[0]]
    rep = cfg.replacement
    greedy_steps = validation = None
    if measured:
        warn_measurement_cost(cfg, n_layers)
    if strategy in ("loss", "validated"):  # each layer replaced alone, its loss increase on held-out windows
        scores["loss"] = damage_cached(model, stats, heldout, cfg, config, ridge)
    if strategy == "validated":  # the top k of three rankings, each set measured replaced together
        validation = validated_choice(model, stats, heldout, cfg, scores, ridge)
        best = min(validation, key=lambda c: c.damage)
        scores["validated"] = dict.fromkeys(best.layers, best.damage)
        validation = [dataclasses.asdict(c) for c in validation]
    elif strategy == "plan":  # keep / linear / drop per layer, to the target at the least damage
        plan = plan_cached(model, stats, heldout, cfg, config, ridge)
        scores["plan"] = {step.layer: step.damage for step in plan}
        greedy_steps = [dataclasses.asdict(step) for step in plan]
    elif strategy == "greedy":  # layers added one at a time, each the least damaging given the earlier ones
        greedy = greedy_cached(model, stats, heldout, cfg, config, ridge)
        scores["greedy"] = {step.layer: step.damage for step in greedy}
        greedy_steps = [dataclasses.asdict(step) for step in greedy]
    selection_seconds = time.perf_counter() - start
    chosen_parts = choose_units(cfg, part_scores, n_layers)
    cache_dir = Path(cfg.cache_dir)

    wants_eval = bool(cfg.eval.tasks or cfg.eval.perplexity)
    scheme = cfg.quantize.scheme
    base = None  # the unmodified model beside the replaced one: for the speed test, and quantized for its eval
    if cfg.speed.enabled:
        if cfg.model.device_map is not None:
            log.warning("speed test skipped: a sharded model (device_map) cannot be copied for an interleaved run")
        else:
            base = copy.deepcopy(model)
    if scheme != "none" and base is None and cfg.eval.evaluate_base and wants_eval:
        base = copy.deepcopy(model)
    if base is not None:
        quantize_model(base, scheme)

    eval_base = None
    if cfg.eval.evaluate_base and wants_eval:
        fields = {
            "model": model_fields(cfg, config),
            "eval": OmegaConf.to_container(cfg.eval, resolve=True),
            "code": code_identity(),
            **({"quantize": scheme} if scheme != "none" else {}),
        }
        evaluated = base if scheme != "none" else model
        eval_base, _ = cached_json(
            cache_dir / "base_eval", fields, lambda: evaluate(evaluated, tokenizer, cfg.eval, cache_dir)
        )

    def recalibrate(partial_model: PreTrainedModel, order: list[int]) -> CalibrationResult:
        return calibrate(partial_model, batches(), cfg)["attention"]  # the store below keeps what a later run reuses

    store = sequential_store(cfg, config)
    start = time.perf_counter()
    plan_modes = {s["layer"]: s["mode"] for s in greedy_steps} if strategy == "plan" else None
    sequential = None
    if parts == ("attention",):
        chosen, _, sequential = replace(
            model, cfg, stats, chosen_parts["attention"], batches, recalibrate, store, ridge, plan_modes
        )
        chosen_parts = {"attention": chosen}
    else:  # one pass, every part's maps fitted on its own statistics
        for p, layers in chosen_parts.items():
            nbl.linearize(model, all_stats[p], layers, mode=rep.mode, ridge=ridges[p], part=p)
    replaced, replaced_mlps = nbl.replaced_layers(model), nbl.replaced_mlps(model)
    chosen = sorted({i for layers in chosen_parts.values() for i in layers})
    calibration_info["replace_seconds"] = time.perf_counter() - start  # fits, and refit passes if any
    del stats, all_stats
    finetune = None
    if train is not None:
        model, finetune = heal(model, train, cfg, ctx.output_dir)
    checkpoint = None
    if cfg.save_checkpoint:  # before quantization: the checkpoint stays a plain linearized model
        checkpoint = str(nbl.save_linearized(model, ctx.output_dir / "checkpoint", tokenizer))
    quantized = quantize_model(model, scheme)
    eval_nbl = evaluate(model, tokenizer, cfg.eval, cache_dir) if wants_eval else None
    speed = measure_speed(base, model, cfg.speed) if cfg.speed.enabled and base is not None else None
    del base

    params = nbl.parameter_report(model).as_dict()
    params["kv_bytes_per_token_base"] = kv_cache_bytes_per_token(config, {}, next(model.parameters()).element_size())
    params["kv_bytes_per_token"] = nbl.model_kv_bytes_per_token(model)
    how = "explicit" if cfg.layers is not None else "strategy"
    results: dict[str, Any] = {
        "model": cfg.model.name,
        "selection": {**OmegaConf.to_container(cfg.selection, resolve=True), "layers_from": how},
        "replacement": OmegaConf.to_container(cfg.replacement, resolve=True),
        "num_layers": sum(len(layers) for layers in chosen_parts.values()),  # sub-blocks for granularity=joint
        "replaced_layers": chosen,
        "replaced_parts": chosen_parts,
        "replaced_modes": {str(i): m for i, m in replaced.items()},  # attention (a block's map sits there)
        "replaced_mlp_modes": {str(i): m for i, m in replaced_mlps.items()},  # a block: "drop" here
        "scores": {  # joint: "<part>/<score>"
            (name if len(parts) == 1 else f"{p}/{name}"): {str(i): s for i, s in s_.items()}
            for p in parts
            for name, s_ in part_scores[p].items()  # the measured scores were added to the first part's
        },
        "score_used": score_key(cfg.selection) if how == "strategy" else None,
        "selection_seconds": selection_seconds,
        "greedy_steps": greedy_steps,
        "validation": validation,
        "ridge": {str(i): r for i, r in ridge.items()} if isinstance(ridge, dict) else ridge,
        "calibration": {**calibration_info, "mode": cfg.calibration.mode, "sequential_steps": sequential},
        "eval": eval_nbl["tasks"] if eval_nbl else {},
        "eval_base": eval_base["tasks"] if eval_base else {},
        "average": eval_nbl["average"] if eval_nbl else None,
        "average_base": eval_base["average"] if eval_base else None,
        "perplexity": {
            "nbl": (eval_nbl or {}).get("perplexity"),
            "base": (eval_base or {}).get("perplexity"),
            "text": (eval_nbl or {}).get("perplexity_text"),
            "domains": {
                d: {
                    "nbl": (eval_nbl or {}).get("domains", {}).get(d),
                    "base": (eval_base or {}).get("domains", {}).get(d),
                }
                for d in cfg.eval.domains
            },
        },
        "predicted": predicted_speedups(config, replaced, cfg.speed, replaced_mlps),
        "finetune": finetune,
        "quantized_modules": len(quantized),  # nn.Linear modules quantized in each model (quantize.scheme)
        "speed": speed,
        "params": params,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": ctx.overrides,
        "provenance": {
            **provenance(),
            "model_revision": model_revision(config),
            **run,
            "finished": _now(),
        },
    }
    if results["average"] is not None and results["average_base"]:
        results["retention"] = results["average"] / results["average_base"]
    results["summary_row"] = _summary_row(results)
    if checkpoint is not None:
        results["checkpoint"] = checkpoint

    atomic_write_text(ctx.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    summary = summary_markdown(results)
    (ctx.output_dir / "summary.md").write_text(summary)
    print(summary)

    tracker = Tracker(
        cfg.logger.mode,
        cfg.logger.project,
        {**results["config"], "provenance": results["provenance"]},
        ctx.output_dir,
        entity=cfg.logger.entity,
        group=cfg.logger.group or ctx.wandb_group,
        tags=list(cfg.logger.tags),
        name=ctx.output_dir.name,
    )
    try:
        tracker.log_results(results)
    finally:
        tracker.finish()
    results["wandb_run_folder"] = tracker.run_folder
    return results


def _summary_row(results: dict[str, Any]) -> dict[str, Any]:
    speed = results.get("speed") or {}
    return {
        "method": method_name(results),
        "k": results["num_layers"],
        "sparsity": results["params"]["sparsity"],
        "avg_acc": results.get("average"),
        "avg_acc_base": results.get("average_base"),
        "perplexity": results["perplexity"]["nbl"],
        "perplexity_base": results["perplexity"]["base"],
        "prefill_x": speed.get("prefill_speedup"),
        "decode_x": speed.get("decode_speedup"),
        **{f"acc/{t}": headline(t, m) for t, m in results["eval"].items()},
    }
