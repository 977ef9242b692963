"""Cache keys: what identifies each kind of cached result. Every key holds the code's identity (its hash and the
library versions), so an edit to the package or an upgrade recomputes; tests/test_cache_keys.py pins them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from nbl.cache import cache_key
from nbl.provenance import code_identity, content_digest, folder_fingerprint, model_revision
from nbl.replace.registry import get_replacement

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from nbl.core.surgery import Part


def digest_memo(cfg: DictConfig) -> Path:
    """Where the content digests of local files are remembered (nbl.provenance.content_digest)."""
    return Path(cfg.cache_dir) / "digests.json"


def model_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """What identifies the model's weights (part of every key): the resolved hub commit, or a local folder's content."""
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields.pop("name", None)
    fields.pop("device_map", None)
    if cfg.model.source == "embedded" and cfg.model.name != "smollm2-135m":
        fields["embedded"] = cfg.model.name  # which embedded weights (SmolLM2's keys predate a second one)
    if cfg.model.random_weights or cfg.model.source == "tiny":
        fields["seed"] = cfg.seed
    elif cfg.model.source == "hub":
        fields["resolved_revision"] = model_revision(config)
        if Path(cfg.model.path).is_dir():  # a local folder: its path says nothing about what it holds now
            fields["weights"] = folder_fingerprint(cfg.model.path, digest_memo(cfg))
    return fields


def calibration_fields(cfg: DictConfig, config: PretrainedConfig, replaced_order: list[int] | None = None) -> dict:
    """Statistics: model, text, calibration settings, the partial replacement (sequential mode), the code.

    ``replaced_order`` names the layers already replaced, in order; with the replacement settings it determines the
    partially replaced model.
    """
    cal = OmegaConf.to_container(cfg.calibration, resolve=True)
    for key in ("batch_size", "method", "offload"):  # the same sums up to float64 round-off (tested)
        cal.pop(key)
    cal.pop("extra_parts")  # which further parts a pass gathers changes none of the sums
    cal.pop("mode")  # the one-pass statistics are the first step of the sequential and propagated modes
    if replaced_order:
        cal["replaced_order"] = list(replaced_order)
        cal["replacement"] = probe_replacement(cfg)
    if cal["source"] == "local":
        cal["sha256"] = content_digest(cal["path"], digest_memo(cfg))  # the content, not the name, identifies the text
    return {"model": model_fields(cfg, config), "calibration": cal, "code": code_identity()}


def part_fields(fields: dict[str, Any], part: Part) -> dict[str, Any]:
    """Statistics of ``part`` (attention keeps the key it always had)."""
    return fields if part == "attention" else {**fields, "part": part}


def heldout_fields(cfg: DictConfig) -> dict[str, Any]:
    """Which held-out windows: how many, and of which text when it is not the calibration text."""
    fields: dict[str, Any] = {"heldout_sequences": cfg.selection.holdout_sequences}
    if cfg.selection.heldout_source not in (None, cfg.calibration.source):
        fields["heldout_source"] = cfg.selection.heldout_source
    return fields


def heldout_statistics_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """Statistics of the held-out windows."""
    return {**calibration_fields(cfg, config), **heldout_fields(cfg)}


def measured_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """What a measured selection's damages depend on besides its own settings: the statistics' key, the held-out
    windows, the damage measure."""
    return {**heldout_statistics_fields(cfg, config), "measure": cfg.selection.measure}


def sequential_step_fields(cfg: DictConfig, config: PretrainedConfig, done: list[int]) -> dict[str, Any]:
    """One sequential step: the partially replaced model (``done``: the layers replaced so far) and how it chooses."""
    selection = OmegaConf.to_container(cfg.selection, resolve=True)
    selection.pop("damage", None)  # read by loss and validated only, which refuse sequential mode: never in a step
    choice = {"selection": selection, "explicit": cfg.layers}
    return {**calibration_fields(cfg, config, done), "choice": choice}


def base_eval_fields(cfg: DictConfig, config: PretrainedConfig) -> dict[str, Any]:
    """The unmodified model's evaluation: the model, the eval settings, the code (and the quantization scheme)."""
    scheme = cfg.quantize.scheme
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    settings.pop("kv_cache_gib", None)  # the engine's budget does not change a score
    if settings.get("backend") == "hf":  # the default: keys written before the engine backend keep their names
        del settings["backend"]
    if (settings.get("perplexity") or {}).get("windows") == "stream":  # likewise, before windows could be documents
        del settings["perplexity"]["windows"]
    return {
        "model": model_fields(cfg, config),
        "eval": settings,
        "code": code_identity(),
        **({"quantize": scheme} if scheme != "none" else {}),
    }


def task_folder(cache_dir: Path) -> Path:
    """Where offline lm-eval tasks are written: the rebuilt data depends on the code and the data package."""
    return cache_dir / "lm_eval_tasks" / cache_key(code_identity())


def probe_replacement(cfg: DictConfig) -> dict[str, Any]:
    """The replacement settings measured damage and refitted statistics depend on (their cache keys hold these):
    mode, ridge, granularity. The mode is how the replacement has a unit replaced while choosing (its
    ``probe_mode``): conv maps are chosen with the one-token maps, the field's block patches with the blocks dropped,
    so their runs share those entries."""
    rep = cfg.replacement
    return {"mode": get_replacement(rep.mode).probe_mode, "ridge": rep.ridge, "granularity": rep.granularity}
