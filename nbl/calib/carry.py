"""Hidden states carried through the decoder one layer at a time.

Layer-by-layer calibration, propagated refits and measured damage all run decoder layers outside the model's own
forward. What a layer is called with besides its hidden states (attention masks, rotary embeddings, position ids)
is recorded here, for every layer, from one pass of the model's own forward in which stand-ins replace the layers:
so whatever a family computes per layer (a sliding-window mask for some layers and a full one for others, say) is
exactly what each layer gets, and no caller needs to know it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nbl.calib.hooks import Batch, unpack_batch
from nbl.core.adapters import get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DROPPED_KWARGS = ("past_key_values", "use_cache")  # layers run here never read or write a KV cache


def to_device(value: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """A tensor, or a tuple of them (rotary cos/sin), on ``device``; anything else as it is. ``memo`` makes each
    distinct object move once (the layers of one attention type share their mask)."""
    if memo is not None and id(value) in memo:
        return memo[id(value)]
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
    elif isinstance(value, tuple):
        moved = tuple(to_device(v, device, memo) for v in value)
    else:
        return value
    if memo is not None:
        memo[id(value)] = moved
    return moved


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device of ``module``'s first parameter, or ``default`` for a module without any (a dropped block)."""
    param = next(module.parameters(), None)
    return default if param is None else param.device


class _StandIn(nn.Module):
    """Takes a decoder layer's place for one forward: records what the layer is called with, returns its input."""

    def __init__(self, index: int, record: Callable[[int, torch.Tensor, dict[str, Any]], None]) -> None:
        super().__init__()
        self.index, self.record = index, record

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.record(self.index, hidden_states, kwargs)
        return hidden_states


class Carrier:
    """Every batch's hidden states at one depth of the decoder (on ``store``), and each layer's other arguments.

    ``hidden[b]`` enters the next layer to run; ``masks[b]`` is batch b's padding mask (1 = a real token), which
    statistics use to skip padding.
    """

    def __init__(
        self,
        hidden: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        layer_kwargs: list[list[dict[str, Any]]],
        store: torch.device,
    ) -> None:
        self.hidden, self.masks, self.store = hidden, masks, store
        self._layer_kwargs = layer_kwargs  # [layer][batch]

    def __len__(self) -> int:
        return len(self.hidden)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: PreTrainedModel, batches: Iterable[Batch], store: torch.device) -> Carrier:
        """Run the model's forward with stand-ins for its decoder layers (embedding, masks and rotary only), where
        the embedding's weights are; keep layer 0's hidden states and every layer's arguments on ``store``."""
        layers = get_adapter(model).layers(model)
        originals = list(layers)
        embed_device = next(model.get_input_embeddings().parameters()).device
        hidden: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        kwargs: list[list[dict[str, Any]]] = [[] for _ in originals]
        memo: dict[int, Any] = {}

        def record(i: int, states: torch.Tensor, given: dict[str, Any]) -> None:
            if i == 0:
                hidden.append(states.to(store))
            kept = {k: to_device(v, store, memo) for k, v in given.items() if k not in DROPPED_KWARGS}
            kwargs[i].append(kept)

        try:
            for i in range(len(originals)):
                layers[i] = _StandIn(i, record)
            for batch in batches:
                input_ids, mask = unpack_batch(batch, embed_device)
                masks.append(None if mask is None else mask.to(store))
                get_adapter(model).backbone(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
                memo.clear()  # each batch has its own masks and rotary tensors
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        return cls(hidden, masks, kwargs, store)

    def kwargs(self, layer: int, batch: int, device: torch.device) -> dict[str, Any]:
        """What layer ``layer`` is called with, besides the hidden states, for batch ``batch``, on ``device``."""
        memo: dict[int, Any] = {}
        return {k: to_device(v, device, memo) for k, v in self._layer_kwargs[layer][batch].items()}

    def call(self, model: PreTrainedModel, i: int, batch: int, hidden: torch.Tensor, device: torch.device
             ) -> torch.Tensor:  # fmt: skip
        """Decoder layer i on ``hidden`` (batch ``batch``'s states at its input), computed on ``device``."""
        out = get_adapter(model).layers(model)[i](hidden.to(device), **self.kwargs(i, batch, device))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def advance(self, model: PreTrainedModel, i: int, device: torch.device | None = None) -> None:
        """Run layer i on every batch (where its weights are, unless ``device``); its outputs are carried on."""
        layer = get_adapter(model).layers(model)[i]
        device = device or module_device(layer, self.store)
        for b, hidden in enumerate(self.hidden):
            self.hidden[b] = self.call(model, i, b, hidden, device).to(self.store)

    def snapshot(self) -> list[torch.Tensor]:
        """The hidden states carried now (the tensors themselves: advancing replaces them, never writes into them)."""
        return list(self.hidden)

    @torch.no_grad()
    def final(self, model: PreTrainedModel, start: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states when layers start..L-1 run on batch ``batch``'s ``hidden``, computed
        where the LM head is."""
        adapter = get_adapter(model)
        device = next(model.get_output_embeddings().parameters()).device
        for i in range(start, len(adapter.layers(model))):
            hidden = self.call(model, i, batch, hidden, device)
        return adapter.final_norm(model)(hidden)


def layer_inputs(model: PreTrainedModel, batches: Iterable[Batch], device: torch.device
                 ) -> tuple[Carrier, list[list[torch.Tensor]]]:  # fmt: skip
    """What each decoder layer receives on ``batches``, from one forward: (the carrier, per layer the hidden states
    of every batch at its input)."""
    carrier = Carrier.capture(model, batches, device)
    inputs: list[list[torch.Tensor]] = []
    for i in range(len(get_adapter(model).layers(model))):
        inputs.append(carrier.snapshot())
        carrier.advance(model, i)
    return carrier, inputs


