"""Stages that prepare a run: its folder and ranks, then the tokenizer, the windows and the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from nbl.cache import stats_entry
from nbl.calib import distributed
from nbl.calib.passes import HookPass, LayerwisePass
from nbl.models import DTYPES, config_json, embedded_folder, random_model, resolve_device, smollm2_folder, tiny_config
from nbl.recipe.keys import calibration_fields
from nbl.recipe.launch import claim_output_dir
from nbl.recipe.schema import ConfigError
from nbl.recipe.state import RunState
from nbl.recipe.windows import Windows, finetune_batches

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from nbl.calib.distributed import Calibrator

def model_config(model_cfg: DictConfig, cache_dir: Path | None = None) -> PretrainedConfig:
    """The configured model's architecture as transformers reads it (a hub model's: with its resolved commit).
    ``cache_dir``: where the embedded model is converted (default: $NBL_CACHE)."""
    from transformers import AutoConfig

    if model_cfg.source == "embedded":
        return AutoConfig.from_pretrained(embedded_folder(model_cfg.name, cache_dir))
    if model_cfg.source == "hub":
        return AutoConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision)
    if model_cfg.source == "tiny":  # it shares the embedded model's tokenizer, hence its vocabulary
        return tiny_config(model_cfg.path, vocab_size=config_json(smollm2_folder(cache_dir, weights=False))["vocab_size"])
    raise ValueError(f"unknown model source {model_cfg.source!r}; use embedded, hub or tiny")


def load_tokenizer(model_cfg: DictConfig, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if model_cfg.source == "embedded":
        return AutoTokenizer.from_pretrained(embedded_folder(model_cfg.name, cache_dir))
    if model_cfg.source == "tiny":
        return AutoTokenizer.from_pretrained(smollm2_folder(cache_dir, weights=False))
    return AutoTokenizer.from_pretrained(model_cfg.path, revision=model_cfg.revision)


def load_model(model_cfg: DictConfig, config: PretrainedConfig, device: torch.device, seed: int = 0,
               cache_dir: Path | None = None) -> PreTrainedModel:  # fmt: skip
    """The configured model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.source == "embedded":
        model = AutoModelForCausalLM.from_pretrained(embedded_folder(model_cfg.name, cache_dir), dtype=dtype)
        return model.to(device).eval()
    if model_cfg.source == "tiny" or model_cfg.random_weights:
        with torch.device(device):
            return random_model(config, dtype, seed)
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path, revision=model_cfg.revision, dtype=dtype, device_map=model_cfg.device_map
    )
    if model_cfg.device_map is None:
        model = model.to(device)
    return model.eval()


def calibrator(cfg: DictConfig, device: torch.device) -> Calibrator:
    """The configured statistics pass: forward hooks, or layer by layer (offloaded: layers and activations wait
    on the CPU)."""
    cal = cfg.calibration
    if cal.method == "layerwise":
        store = torch.device("cpu") if cal.offload else None
        return LayerwisePass(device, store, cal.gram_dtype)
    return HookPass(cal.gram_dtype)


def set_up(state: RunState) -> None:
    """The model's config, this process's rank, the run folder (rank 0), the seed, the device."""
    cfg = state.cfg
    state.config = model_config(cfg.model, state.cache_dir)
    state.shards = distributed.setup()  # torchrun: one process per GPU, ranks > 0 only help calibrate
    if state.shards.main:
        state.run = claim_output_dir(state.ctx.output_dir)
        (state.ctx.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    state.device = resolve_device(cfg.device)
    state.calibrator = calibrator(cfg, state.device)


def load(state: RunState) -> None:
    """Tokenizer and windows (too little or unreadable text fails here, before the weights load), then the model
    (offloaded calibration: it waits on the CPU, each layer visits the device only while it calibrates)."""
    cfg = state.cfg
    state.tokenizer = load_tokenizer(cfg.model, state.cache_dir)
    ppl = cfg.eval.perplexity
    if ppl is not None and ppl.windows == "documents" and state.tokenizer.bos_token_id is None:
        raise ConfigError("eval.perplexity.windows=documents starts each window at a BOS token, and this model's "
                          "tokenizer has none: use eval.perplexity.windows=stream")  # fmt: skip
    state.windows = Windows(state.tokenizer, cfg, cfg.selection.holdout_sequences if state.needs_heldout_windows else 0)
    stored = stats_entry(state.cache_dir / "stats", calibration_fields(cfg, state.config)).is_file()
    if state.needs_heldout_windows or not stored:
        state.windows.calibration()
    if cfg.finetune.method == "lora":
        state.train = finetune_batches(state.tokenizer, cfg)
    home = torch.device("cpu") if cfg.calibration.offload else state.device
    state.model = load_model(cfg.model, state.config, home, cfg.seed, state.cache_dir)
