"""Stages that change the model: replacement (one pass, propagated or sequential refits, or a plan's modes), LoRA
healing, the checkpoint, quantization."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from nbl.calib.hooks import calibrate, shifted_statistics_bytes
from nbl.calib.layerwise import refit_propagated
from nbl.calib.passes import step_store
from nbl.calib.sequential import linearize_sequentially
from nbl.core.adapters import get_adapter
from nbl.core.checkpoint import save_linearized
from nbl.core.surgery import linearize, replaced_layers, replaced_mlps
from nbl.finetune import LoraSettings, lora_finetune
from nbl.measure.evaluation import perplexity
from nbl.quantization import quantize_model
from nbl.recipe.keys import sequential_step_fields
from nbl.recipe.state import RunState
from nbl.report import plot_loss_curve
from nbl.select.damage import layers_restored
from nbl.select.registry import RankingStrategy

log = logging.getLogger(__name__)


def replace(state: RunState) -> None:
    """Replace the chosen sub-blocks as ``calibration.mode`` says; attention may be refitted (propagated,
    sequential), other parts are fitted on the one-pass statistics."""
    cfg, model, start = state.cfg, state.model, time.perf_counter()
    steps = None
    if state.parts == ("attention",):
        layers, steps = _replace_attention(state)
        chosen = {"attention": layers}
    else:
        chosen = state.selection.layers
        for part, layers in chosen.items():
            linearize(model, state.stats[part], layers, mode=cfg.replacement.mode, ridge=state.ridges[part], part=part)
    replaced, mlps = replaced_layers(model), replaced_mlps(model)
    state.results.update(
        num_layers=sum(len(layers) for layers in chosen.values()),  # sub-blocks for granularity=joint
        replaced_layers=sorted({i for layers in chosen.values() for i in layers}),
        replaced_parts=chosen,
        replaced_modes={str(i): m for i, m in replaced.items()},  # attention (a block's map sits there)
        replaced_mlp_modes={str(i): m for i, m in mlps.items()},  # a block: "drop" here
    )
    state.results["calibration"].update(
        replace_seconds=time.perf_counter() - start, mode=cfg.calibration.mode, sequential_steps=steps
    )  # fits, and refit passes if any
    state.stats, state.heldout_stats = {}, {}  # the statistics are not needed any more


def _replace_attention(state: RunState) -> tuple[list[int], list[dict[str, Any]] | None]:
    """(the replaced layers, the sequential steps if any)."""
    cfg, model, rep = state.cfg, state.model, state.cfg.replacement
    stats, ridge, chosen = state.stats["attention"], state.ridges["attention"], state.selection.layers["attention"]
    modes = state.selection.modes
    if modes is not None:  # a plan: each layer its own mode
        for mode in ("linear", "drop"):
            linearize(model, stats, [i for i in chosen if modes[i] == mode], mode=mode, ridge=ridge)
    elif rep.mode == "conv":  # one_pass (the schema refuses the refits)
        _replace_by_conv(state, chosen)
    elif cfg.calibration.mode == "one_pass":
        linearize(model, stats, chosen, mode=rep.mode, ridge=ridge)
    elif cfg.calibration.mode == "propagated":  # the chosen layers, each map fitted on the replaced model's inputs
        store = torch.device("cpu") if cfg.calibration.offload else None
        refit_propagated(model, state.windows.calibration(), chosen, rep.mode, ridge, state.device, store,
                         gram_dtype=cfg.calibration.gram_dtype)  # fmt: skip
    else:
        return _replace_sequentially(state, chosen)
    return chosen, None


def _replace_by_conv(state: RunState, chosen: list[int]) -> None:
    """Convolution maps for the chosen layers: their shifted-input statistics in one more pass over the calibration
    windows (not cached: they depend on the selection), then the fits. With ``replacement.validate``, the one-token
    maps replace the conv maps when those do worse on the held-out windows (all chosen layers replaced together)."""
    cfg, model, start = state.cfg, state.model, time.perf_counter()
    width, ridge, d = cfg.replacement.width, state.ridges["attention"], get_adapter(model).hidden_size(state.config)
    rank = conv_rank(cfg.replacement.rank, d)
    stats = calibrate(model, state.windows.calibration(), chosen, gram_dtype=cfg.calibration.gram_dtype, width=width)
    section: dict[str, Any] = {
        "width": width,
        "rank": rank,
        "statistics_bytes": len(chosen) * shifted_statistics_bytes(d, width),  # float64 sums, held during the pass
    }
    if cfg.replacement.validate:
        heldout = torch.cat(state.windows.heldout())
        losses = {}
        for mode, fits in (("linear", state.stats["attention"]), ("conv", stats)):
            with layers_restored(model, chosen):
                linearize(model, fits, chosen, mode=mode, ridge=ridge, rank=rank if mode == "conv" else None)
                losses[mode] = math.log(perplexity(model, heldout))
        section.update(heldout_loss=losses, kept="conv" if losses["conv"] <= losses["linear"] else "linear")
        log.info("held-out loss: conv %.4f, linear %.4f: %s maps kept", losses["conv"], losses["linear"], section["kept"])
    if section.get("kept", "conv") == "conv":
        linearize(model, stats, chosen, mode="conv", ridge=ridge, rank=rank)
    else:
        linearize(model, state.stats["attention"], chosen, mode="linear", ridge=ridge)
    section["seconds"] = time.perf_counter() - start
    state.results["calibration"]["conv_pass"] = section
    log.info("conv maps (width %d, rank %s): %d layers in %.0f s", width, rank, len(chosen), section["seconds"])


def conv_rank(rank: int | float | None, d: int) -> int | None:
    """``replacement.rank`` as a rank: None (full), an integer, or a fraction of the hidden size d (at least 1)."""
    if rank is None or (isinstance(rank, float) and rank == 1.0):
        return None
    return rank if isinstance(rank, int) else max(1, round(rank * d))  # validation refused ranks above d


def _replace_sequentially(state: RunState, chosen: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
    """One layer at a time, each map fitted on re-calibrated statistics of the partially replaced model: the
    strategy re-ranks at every step, or the layers are fixed (explicit, random) and replaced front to back."""
    cfg, strategy = state.cfg, state.strategy
    choose = strategy.choose_one(cfg.selection) if isinstance(strategy, RankingStrategy) else None
    store = step_store(state.cache_dir / "sequential", lambda done: sequential_step_fields(cfg, state.config, done))

    def statistics(model: Any, done: list[int]) -> Any:  # the first step's are the one-pass statistics
        if not done:
            return state.stats["attention"]
        return state.calibrator(model, state.windows.calibration(), ("attention",))["attention"]

    steps = linearize_sequentially(
        state.model, statistics, len(chosen), choose, cfg.replacement.mode, state.ridges["attention"],
        order=None if choose else chosen, store=store,
    )  # fmt: skip
    return sorted(s.layer for s in steps), [{"layer": s.layer, "score": s.score} for s in steps]


def heal(state: RunState) -> None:
    """LoRA healing as configured (finetune=lora); the loss curve is drawn into the run folder."""
    ft = state.cfg.finetune
    if ft.method != "lora":
        state.results["finetune"] = None
        return
    settings = LoraSettings(
        rank=ft.rank, alpha=ft.alpha, dropout=ft.dropout, target_modules=tuple(ft.target_modules),
        train_maps=ft.train_maps, steps=ft.steps, lr=ft.lr,
    )  # fmt: skip
    state.model, trace = lora_finetune(state.model, state.train, settings)
    plot = plot_loss_curve(trace.losses, state.ctx.output_dir / "finetune_loss.png", f"LoRA healing (r={ft.rank})")
    state.results["finetune"] = {
        "losses": trace.losses,
        "trainable_params": trace.trainable_params,
        "tokens": sum(b.numel() for b in state.train[: ft.steps]),
        "seconds": trace.seconds,
        "plot": str(plot),
    }
    log.info("LoRA healing: loss %.3f -> %.3f in %.0f s", trace.losses[0], trace.losses[-1], trace.seconds)


def save_checkpoint(state: RunState) -> None:
    """A self-contained checkpoint (before quantization: it stays a plain linearized model)."""
    if state.cfg.save_checkpoint:
        folder = save_linearized(state.model, state.ctx.output_dir / "checkpoint", state.tokenizer,
                                 max_shard_size=state.cfg.checkpoint_shard_size)  # fmt: skip
        state.results["checkpoint"] = str(folder)


def quantize(state: RunState) -> None:
    """torchao quantization of every decoder nn.Linear (quantize.scheme); the base copy was quantized alike."""
    state.results["quantized_modules"] = len(quantize_model(state.model, state.cfg.quantize.scheme))
