"""Every setting checked before anything heavy runs: the schema's types and ranges, the strategy's own limits, and
the checks that need the model's architecture (read from its config.json alone), the data files or lm-eval's task
list. A bad config is refused within seconds, before transformers' model code or any weights load."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig

from nbl.core.adapters import adapter_for_config
from nbl.data import TEXT_SOURCES, load_texts
from nbl.measure.offline_tasks import OFFLINE_TASKS, is_builtin_task
from nbl.models import architecture, config_json, embedded_folder, resolve_device, smollm2_folder, tiny_values
from nbl.recipe.schema import ConfigError, checked_config
from nbl.replace.registry import get_replacement
from nbl.select.budget import BudgetMetric, budget_metric, budget_value, joint_bound, units_for_budget
from nbl.select.registry import GRANULARITY_PARTS, get_strategy
from nbl.serve import CPU_HEAD_SIZES


def read_architecture(model_cfg: DictConfig, cache_dir: Path | None = None) -> SimpleNamespace:
    """The configured model's architecture from its config.json (the tiny model: its fields), no weights loaded."""
    if model_cfg.source == "embedded":
        return architecture(config_json(embedded_folder(model_cfg.name, cache_dir)))
    if model_cfg.source == "hub":
        values = config_json(model_cfg.path, model_cfg.revision)
        if "nbl" in values or str(values.get("model_type", "")).startswith("nbl_") or (
            Path(model_cfg.path).is_dir() and (Path(model_cfg.path) / "nbl.json").is_file()
        ):
            raise ConfigError(
                f"model.path={model_cfg.path} is an NBL checkpoint (its config declares replaced layers), not a base "
                "model: give the unmodified model it was made from; to use the checkpoint itself, load it with "
                "nbl.load_linearized"
            )
        return architecture(values)
    if model_cfg.source == "tiny":  # it shares the embedded model's tokenizer, hence its vocabulary
        vocab = config_json(smollm2_folder(cache_dir, weights=False))["vocab_size"]
        return architecture({"model_type": model_cfg.path, **tiny_values(model_cfg.path, vocab_size=vocab)})
    raise ValueError(f"unknown model source {model_cfg.source!r}; use embedded, hub or tiny")


def validate(cfg: DictConfig) -> tuple[DictConfig, SimpleNamespace]:
    """``cfg`` typed and checked; returns (the typed config, the model's architecture). Raises ConfigError (or
    FileNotFoundError for a missing file) naming the key."""
    cfg = checked_config(cfg)
    _check_device(cfg.device)
    _check_ranks(cfg)
    _check_texts(cfg)
    _check_tasks(cfg)
    arch = read_architecture(cfg.model, Path(cfg.cache_dir))
    _resolve_budget(cfg, arch)
    _check_layers(cfg, arch)
    _check_lengths(cfg, arch)
    _check_serving(cfg, arch)
    return cfg, arch


def run_budget(cfg: DictConfig, config: Any) -> tuple[BudgetMetric, str, float]:
    """The run's budget: the metric its units are counted with, what a unit counts as, and the value to reach."""
    from nbl.replace.standard import conv_rank

    rep = cfg.replacement
    counts_as = get_replacement(rep.mode).counts_as
    d = adapter_for_config(config).hidden_size(config)
    conv = (rep.width, conv_rank(rep.rank, d)) if counts_as == "conv" else (2, None)
    metric = budget_metric(config, cfg.budget.target, cfg.speed.prompt_len, conv)
    return metric, counts_as, budget_value(config, cfg.budget.target, cfg.budget.value, cfg.speed.prompt_len)


def _resolve_budget(cfg: DictConfig, arch: SimpleNamespace) -> None:
    """With a budget, num_layers becomes the units the replacement needs to reach it (joint: the most any mix of
    sub-blocks needs; the selection stage cuts the rule's ordered steps where the budget is met)."""
    if cfg.budget.target is None:
        return
    rep, n = cfg.replacement, arch.num_hidden_layers
    try:
        metric, counts_as, value = run_budget(cfg, arch)
        if rep.granularity == "joint":
            cfg.num_layers = joint_bound(metric, n, counts_as, value)
        else:
            cfg.num_layers = units_for_budget(metric, n, rep.granularity, counts_as, value)
    except ValueError as err:
        raise ConfigError(f"budget.target={cfg.budget.target} budget.value={cfg.budget.value}: {err}") from None


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}, but this machine has no CUDA device: use device=auto or cpu")


def _check_ranks(cfg: DictConfig) -> None:
    """Under torchrun every rank calibrates a share of the batches: it needs at least one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(cfg.calibration.num_sequences / cfg.calibration.batch_size)
    if world > batches:
        raise ConfigError(
            f"calibration.num_sequences={cfg.calibration.num_sequences} / calibration.batch_size="
            f"{cfg.calibration.batch_size} make {batches} batches for {world} ranks: every rank needs one "
            "(more sequences, or a smaller batch_size)"
        )


def _check_lengths(cfg: DictConfig, arch: SimpleNamespace) -> None:
    """No window longer than the model's context: positions past it are extrapolated, and the statistics with them."""
    context = getattr(arch, "max_position_embeddings", None)
    if context is None:
        return
    lengths = {"calibration.seq_len": cfg.calibration.seq_len}
    if cfg.eval.perplexity is not None:
        lengths["eval.perplexity.seq_len"] = cfg.eval.perplexity.seq_len
    if cfg.speed.enabled:
        lengths["speed.prompt_len + speed.new_tokens"] = cfg.speed.prompt_len + cfg.speed.new_tokens
        if cfg.speed.engine == "vllm":
            lengths["speed.long_prompt_len + speed.new_tokens"] = cfg.speed.long_prompt_len + cfg.speed.new_tokens
    for key, length in lengths.items():
        if length > context:
            raise ConfigError(f"{key} = {length} is longer than {cfg.model.name}'s context ({context} tokens)")


def _check_serving(cfg: DictConfig, arch: SimpleNamespace) -> None:
    """speed=vllm: vLLM installed, and a model its attention can run where the run computes (before calibration,
    not after it, in the engine)."""
    if not (cfg.speed.enabled and cfg.speed.engine == "vllm"):
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("speed=vllm serves both models with vLLM, which is not installed: pip install -e '.[serve]' "
                          "(GPU) or '.[serve-cpu]' (CPU)")  # fmt: skip
    head_dim = adapter_for_config(arch).head_dim(arch)
    if resolve_device(cfg.device).type == "cpu" and head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"speed=vllm on the CPU: vLLM's CPU attention takes head sizes {list(CPU_HEAD_SIZES)}, and "
            f"{cfg.model.name} has {head_dim}"
        )


def _check_texts(cfg: DictConfig) -> None:
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


def _check_tasks(cfg: DictConfig) -> None:
    tasks = list(cfg.eval.tasks)
    if cfg.eval.offline:
        missing = [t for t in tasks if t not in OFFLINE_TASKS]
        if missing:
            raise ConfigError(f"no packaged data for {missing}; offline tasks are {', '.join(OFFLINE_TASKS)}")
    elif tasks:
        unknown = [t for t in tasks if not is_builtin_task(t)]
        if unknown:
            raise ConfigError(f"eval.tasks: lm-eval has no tasks named {unknown}")


def _check_layers(cfg: DictConfig, arch: SimpleNamespace) -> None:
    """Layers, k and the calibration token count against the architecture; the strategy's own model checks."""
    adapter = adapter_for_config(arch)  # unsupported architecture -> clear error
    n = arch.num_hidden_layers
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"layers {bad} do not exist: {cfg.model.name} has layers 0..{n - 1}")
    else:
        units = n * len(GRANULARITY_PARTS[cfg.replacement.granularity])
        if not cfg.num_layers <= units:
            raise ConfigError(
                f"num_layers={cfg.num_layers} is outside 0..{units} ({cfg.model.name} has {n} layers, "
                f"{units} {cfg.replacement.granularity} units)"
            )
        refusal = get_strategy(cfg.selection.strategy).model_refusal(cfg, arch)
        if refusal is not None:
            raise ConfigError(refusal)
    d = adapter.hidden_size(arch)
    rank = cfg.replacement.rank
    if cfg.replacement.mode == "conv" and isinstance(rank, int) and rank > d:
        raise ConfigError(f"replacement.rank={rank} is above {cfg.model.name}'s hidden size {d}")
    tokens = cfg.calibration.num_sequences * cfg.calibration.seq_len
    if cfg.replacement.mode == "conv" and tokens <= cfg.replacement.width * d:
        raise ConfigError(
            f"replacement.width={cfg.replacement.width}: a conv map fits {cfg.replacement.width} x {d} inputs and needs "
            f"more calibration tokens than that (calibration.num_sequences x calibration.seq_len = {tokens})"
        )
    if tokens <= d:
        raise ConfigError(
            f"calibration.num_sequences x calibration.seq_len = {tokens} tokens; hidden size {d} needs more "
            "than that for a full-rank covariance"
        )
