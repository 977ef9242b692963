"""The residual stream between decoder layers, read during one pass: what the block-removal methods of the field
(ReplaceMe, LinearPatch) compute their choices and patches from.

Boundary ``b`` is the stream entering decoder layer ``b``; boundary ``L`` (the number of layers) is the stream
leaving the last layer, before the final norm. Removing blocks ``s .. e - 1`` joins boundary ``s`` to boundary
``e``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from nbl.calib.hooks import Batch, unpack_batch
from nbl.core.adapters import get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# per batch: the stream at the requested boundaries, the requested layers' MLP outputs, the attention mask (or None)
Visit = Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor], "torch.Tensor | None"], None]


@torch.no_grad()
def stream_pass(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    boundaries: Iterable[int],
    visit: Visit,
    mlps: Iterable[int] = (),
    desc: str = "stream",
    reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> None:
    """Run the backbone over ``batches`` (no LM head); for each batch call ``visit`` with the stream at
    ``boundaries`` and what the MLPs of the layers ``mlps`` add to it (each (batch, seq, d), as the model computes
    them; with ``reduce``, the stream as ``reduce(states, mask)`` makes it when it is read: e.g. the last tokens
    alone, so a pass over every boundary of a large model holds only what its visitor reads)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    wanted, mlp_layers = sorted(set(boundaries)), sorted(set(mlps))
    bad = [b for b in wanted if not 0 <= b <= n] + [i for i in mlp_layers if not 0 <= i < n]
    if bad:
        raise IndexError(f"boundaries and layers {bad} out of range for a model with {n} decoder layers")
    scale = adapter.residual_scale(model.config)
    stream: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def keep_input(b: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            states = args[0] if args else kwargs["hidden_states"]
            stream[b] = states if reduce is None else reduce(states, mask[0])

        return hook

    def keep_output(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            mlp_out[i] = out if scale == 1.0 else out * scale  # what the MLP adds to the stream

        return hook

    device = next(model.get_input_embeddings().parameters()).device
    with ExitStack() as hooks:
        for b in wanted:
            module = layers[b] if b < n else adapter.final_norm(model)
            hooks.callback(module.register_forward_pre_hook(keep_input(b), with_kwargs=True).remove)
        for i in mlp_layers:
            hooks.callback(adapter.mlp(layers[i]).register_forward_hook(keep_output(i)).remove)
        for batch in tqdm(list(batches), desc=desc):
            ids, mask[0] = unpack_batch(batch, device)
            adapter.backbone(model)(input_ids=ids, attention_mask=mask[0], use_cache=False)
            visit(dict(stream), dict(mlp_out), mask[0])
            stream.clear()
            mlp_out.clear()


def runs(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted layers as maximal runs of consecutive ones, each ``(start, end)`` with ``end`` exclusive."""
    out: list[tuple[int, int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def last_tokens(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, d) -> (batch, d): each sequence's last token that is not padding."""
    if mask is None:
        return states[:, -1]
    last = mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
    return states[torch.arange(states.shape[0], device=states.device), last.to(states.device)]
