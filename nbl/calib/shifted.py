"""Statistics for convolution maps: per chosen layer, the attention output against the last T inputs.

A convolution map (``replacement.mode=conv``) of width T is the LMMSE fit of Attn(LN1(x))_t on
[x_t, x_(t-1), ..., x_(t-T+1)]; its sums hold (T d)^2 + 2 T d^2 numbers per layer (T = 2: 3 times the one-token
statistics), so they are gathered for the chosen layers only, in one pass over the calibration windows after
selection (on the unmodified model, as the one-pass maps are).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from nbl.calib.hooks import Batch, unpack_batch
from nbl.core.adapters import get_adapter
from nbl.core.stats import CovarianceAccumulator
from nbl.core.surgery import execution_device, shifted_features

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def statistics_bytes(d: int, width: int) -> int:
    """float64 bytes of one layer's sums for a width-``width`` map (what :func:`calibrate_shifted` holds per layer)."""
    f = width * d
    return 8 * (f * f + f * d + d * d + f + d)


@torch.no_grad()
def calibrate_shifted(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    layers: Iterable[int],
    width: int,
    progress: bool = True,
    gram_dtype: str = "float64",
) -> dict[int, CovarianceAccumulator]:
    """One pass over ``batches``: for each of ``layers``, the sums of (shifted_features(x, width), Attn(LN1(x))),
    padding tokens (attention_mask == 0) left out. Only the backbone runs."""
    adapter = get_adapter(model)
    decoder_layers = adapter.layers(model)
    d = adapter.hidden_size(model.config)
    stats = {i: CovarianceAccumulator(width * d, d, gram_dtype=gram_dtype) for i in sorted(set(layers))}
    inputs: dict[int, torch.Tensor] = {}
    mask: torch.Tensor | None = None

    def save_input(i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def accumulate(i: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            a = output[0] if isinstance(output, tuple) else output
            x = inputs.pop(i).to(a.device)
            stats[i].update(shifted_features(x, width), a, None if mask is None else mask.to(a.device))

        return hook

    handles = []
    for i in stats:
        layer = decoder_layers[i]
        handles.append(adapter.input_norm(layer).register_forward_pre_hook(save_input(i), with_kwargs=True))
        handles.append(adapter.attention(layer).register_forward_hook(accumulate(i)))
    device = execution_device(model.get_input_embeddings())
    backbone = adapter.backbone(model)
    was_training = model.training
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for batch in tqdm(batches, total=total, desc=f"calibrating (conv width {width})", disable=not progress):
            input_ids, mask = unpack_batch(batch, device)
            backbone(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for i, acc in stats.items():
        if acc.count <= width * d:
            raise ValueError(
                f"layer {i}: {acc.count} tokens for a width-{width} map of {width * d} inputs; the fit needs more: "
                "use more or longer calibration windows"
            )
        if not (torch.isfinite(acc.sum_x).all() and torch.isfinite(acc.sum_a).all()):
            raise FloatingPointError(f"layer {i}: the activations hold NaN or inf (load the model in a wider dtype)")
    return stats
