"""Stages that change the model: replacement (one pass, propagated or sequential refits, or a plan's modes), LoRA
healing, the checkpoint, quantization."""

from __future__ import annotations

import logging
import time

from nbl.core.checkpoint import save_linearized
from nbl.core.pruned import save_pruned
from nbl.core.surgery import replaced_layers, replaced_mlps
from nbl.finetune import LoraSettings, lora_finetune
from nbl.quantization import quantize_model
from nbl.recipe.state import RunState
from nbl.replace.registry import get_replacement
from nbl.report import plot_loss_curve

log = logging.getLogger(__name__)


def replace(state: RunState) -> None:
    """Replace the chosen sub-blocks as ``replacement.mode`` says (:mod:`nbl.replace`), and record what was
    replaced and how the replacement is saved and served."""
    cfg, model, start = state.cfg, state.model, time.perf_counter()
    state.results["calibration"]["sequential_steps"] = None
    replacement = get_replacement(cfg.replacement.mode)
    chosen = replacement.apply(state)
    replaced, mlps = replaced_layers(model), replaced_mlps(model)
    state.results.update(
        num_layers=sum(len(layers) for layers in chosen.values()),  # sub-blocks for granularity=joint
        replaced_layers=sorted({i for layers in chosen.values() for i in layers}),
        replaced_parts=chosen,
        replaced_modes={str(i): m for i, m in replaced.items()},  # attention (a block's map sits there)
        replaced_mlp_modes={str(i): m for i, m in mlps.items()},  # a block: "drop" here
        replacement_method=replacement.describe(),
    )
    state.results["calibration"].update(replace_seconds=time.perf_counter() - start, mode=cfg.calibration.mode)
    state.stats, state.heldout_stats = {}, {}  # the statistics are not needed any more


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
    """A self-contained checkpoint (before quantization: it stays a plain linearized model): an NBL checkpoint, or
    the family's own with fewer layers where the replacement says so (:mod:`nbl.core.pruned`)."""
    cfg = state.cfg
    if not cfg.save_checkpoint:
        return
    replacement = get_replacement(cfg.replacement.mode)
    folder, size = state.ctx.output_dir / "checkpoint", cfg.checkpoint_shard_size
    if replacement.saved_as == "ordinary":  # the family's own checkpoint, fewer layers: any engine serves it
        save_pruned(state.model, folder, state.tokenizer, max_shard_size=size, replacement=replacement.name)
    else:
        save_linearized(state.model, folder, state.tokenizer, max_shard_size=size)
    state.results["checkpoint"] = str(folder)
    state.results["checkpoint_kind"] = replacement.saved_as


def quantize(state: RunState) -> None:
    """torchao quantization of every decoder nn.Linear (quantize.scheme); the base copy was quantized alike."""
    state.results["quantized_modules"] = len(quantize_model(state.model, state.cfg.quantize.scheme))
