"""NBL checkpoints with quantized kept layers, in a format vLLM loads: compressed-tensors W8A8 int8.

    python -m nbl.serve.quantized outputs/<run>/checkpoint outputs/<run>/checkpoint-w8a8

W8A8 here is the scheme llm-compressor writes as ``W8A8`` (compressed-tensors' preset): each kept linear layer's
weights int8, symmetric, one scale per output channel (max |W_row| / 127: no calibration data needed); its inputs
quantized to int8 per token at run time (dynamic). vLLM runs it on GPUs and on its CPU backend
(``CPUInt8ScaledMMLinearKernel``). The NBL maps (``attn_linear``, ``mlp.linear``, conv maps) and the LM head stay
in the model's dtype: the maps are built without a quantization method in vLLM, and quantizing them would change
the closed-form fit. The format is compressed-tensors' own (its ``ModelCompressor``), so the folder is what
llm-compressor would write for the same scheme.

:func:`fake_w8a8` applies the same arithmetic to a model in transformers (weights rounded to their int8 grid,
inputs rounded per token), the reference a served checkpoint is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# modules left in the model's dtype: the LM head and NBL's maps (their names in every supported family)
IGNORE = ["lm_head", r"re:.*\.attn_linear$", r"re:.*\.mlp\.linear$"]


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers W8A8 quantizes: every ``nn.Linear`` of the decoder but NBL's maps and the LM head."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith((".attn_linear", ".mlp.linear"))
    }


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales, one per output channel: max |W_row| / 127 (a zero row gets 1)."""
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float()
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


def save_w8a8(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (an NBL model, or an unreplaced one) as an NBL checkpoint whose kept linear layers are
    compressed-tensors W8A8 int8; ``model`` is quantized in place (its kept weights become int8 + scales)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    from nbl.core.checkpoint import save_linearized

    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])}, ignore=IGNORE,
                                quantization_status=QuantizationStatus.FROZEN)  # fmt: skip
    apply_quantization_config(model, config)
    linears = quantized_linears(model)
    if {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")} != set(linears):
        raise RuntimeError("compressed-tensors chose other layers than the kept linear layers")  # IGNORE is stale
    with torch.no_grad():
        for linear in linears.values():
            linear.weight_scale.copy_(channel_scales(linear.weight).to(linear.weight_scale))
            linear.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    folder = save_linearized(model, folder, tokenizer)
    compressor.update_config(str(folder))
    return folder


def fake_w8a8(model: nn.Module) -> nn.Module:
    """``model`` (in place) computing what W8A8 int8 computes: each quantized layer's weight rounded to its int8
    grid, and its input rounded per token to the int8 grid of max |x| / 127. Returns the model."""
    with torch.no_grad():
        for linear in quantized_linears(model).values():
            scale = channel_scales(linear.weight)
            linear.weight.copy_((torch.round(linear.weight.float() / scale).clamp(-128, 127) * scale).to(linear.weight))
            linear.register_forward_pre_hook(_round_input)
    return model


def _round_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    x = args[0].float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return ((torch.round(x / scale).clamp(-128, 127) * scale).to(args[0].dtype), *args[1:])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="an NBL checkpoint, its kept layers as compressed-tensors W8A8 int8")
    parser.add_argument("checkpoint", type=Path, help="a folder written by nbl.save_linearized (save_checkpoint=true)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    import nbl

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint) if (args.checkpoint / "tokenizer_config.json").is_file() else None
    print(save_w8a8(nbl.load_linearized(args.checkpoint), args.out, tokenizer))
