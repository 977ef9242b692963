"""Healing after replacement: LoRA adapters (peft) trained on calibration text, then merged back.

The adapters sit on the projections the replaced model still has (attention q/k/v/o and the MLP's gate/up/down
by default); the NBL maps are frozen or trained in full (``train_maps``: a map is one d x d matrix, so the
budget grows by d^2 + d parameters per map). After training the adapters are merged into the weights and
peft's wrappers removed, so the model is again a plain linearized model (checkpoints, surgery, accounting).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from nbl.core.surgery import LinearizedDecoderLayer, MlpMap

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_maps: bool = False  # also train the NBL maps (in full)
    steps: int = 60
    lr: float = 3e-4
    weight_decay: float = 0.0


@dataclass
class FinetuneLog:
    losses: list[float] = field(default_factory=list)  # training loss per step
    trainable_params: int = 0
    seconds: float = 0.0


def map_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The parameters of every NBL map in ``model`` (attention, MLP and block maps)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        linear = getattr(module, "attn_linear", None) if isinstance(module, LinearizedDecoderLayer) else None
        if isinstance(module, MlpMap):
            linear = module.linear
        if linear is not None:
            params += list(linear.parameters())
    return params


def lora_finetune(
    model: PreTrainedModel, batches: list[torch.Tensor], settings: LoraSettings, progress: bool = True
) -> tuple[PreTrainedModel, FinetuneLog]:
    """Train LoRA adapters on ``batches`` (one optimizer step per batch of token ids, next-token loss), merge
    them; returns the merged model (the same modules as ``model``, updated in place) and the loss curve."""
    from peft import LoraConfig, get_peft_model

    if len(batches) < settings.steps:
        raise ValueError(f"{settings.steps} fine-tuning steps need {settings.steps} batches, got {len(batches)}")
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in settings.target_modules if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {settings.target_modules} is in the model")
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, bias="none"
    )
    peft_model = get_peft_model(model, config)  # freezes every base weight
    if settings.train_maps:
        for p in map_parameters(model):
            p.requires_grad_(True)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    log = FinetuneLog(trainable_params=sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    device = next(model.parameters()).device
    start = time.perf_counter()
    peft_model.train()
    try:
        bar = tqdm(batches[: settings.steps], desc="LoRA healing", disable=not progress)
        for ids in bar:
            ids = ids.to(device)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss became {value} at step {len(log.losses)}: lower lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.losses.append(value)
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
    finally:
        peft_model.eval()
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    log.seconds = time.perf_counter() - start
    return merged.eval(), log
