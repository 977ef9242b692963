"""Every layer's single-layer damage estimated from one forward and backward pass over the held-out windows, plus one
decoder layer per candidate.

Replacing layer i's part (its map fitted on the calibration statistics, or dropped) changes the layer's output h_t by
d_t: the replaced layer is run exactly on the unmodified model's input to layer i (so the MLP's response to a
changed attention output is computed, not approximated). What the layers above make of d is expanded to second
order: the summed next-token loss changes by

    sum_t g_t . d_t  +  1/2 sum_(t, t') d_t^T H_(t t') d_(t')

with g_t the gradient of the loss at layer i's output. The estimate keeps the diagonal blocks t = t' and approximates
each by the outer product of the observed gradient (H_tt ~ g_t g_t^T, an empirical Gauss-Newton term):

    damage_i ~ (1 / N) sum_t [ g_t . d_t + 1/2 (g_t . d_t)^2 ]      (N: scored tokens)

Every layer's input and gradient come out of the same pass, so the cost is one forward and one backward to the
activations (the weights take no gradient; each layer is recomputed in the backward, which bounds the memory: about
four forwards in all) plus one decoder layer per candidate (about one forward in all), whatever the number of
layers; measuring costs a forward from each layer to the top (about L / 2 forwards). The first-order term alone
ranks badly (the LMMSE error is nearly orthogonal to g on average); the square is what separates a harmless change
from a harmful one. The pass also yields what set validation measures against (every layer's inputs on the held-out
windows, and the loss of the model as it is), so a validated selection does not run the held-out forward again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from nbl.calib.carry import Carrier
from nbl.core.accounting import BytesModel
from nbl.core.adapters import adapter_for_config, get_adapter
from nbl.core.surgery import execution_device, live_layers
from nbl.models import DTYPES, resolve_device
from nbl.select.damage import Probe, Unreplaced, layers_restored

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LOGIT_VALUES = 2**25  # logits computed at once by the estimate's loss (128 MB in float32)


def estimate_peak_bytes(config: Any, heldout_tokens: int, seq_len: int, bytes_per_value: int) -> dict[str, int]:
    """What the estimate pass holds beside the model's weights, by part, in bytes (an upper estimate, from the
    architecture alone): the held-out states it hands to set validation; per sequence, the hidden states at every
    layer boundary and their gradients; one layer's activations and their gradients when its backward recomputes it
    (attention scores counted as if materialised in float32, as eager attention does); one slice of logits with its
    softmax and gradient in float32."""
    adapter = adapter_for_config(config)
    d, n, ff, vocab = adapter.hidden_size(config), config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = adapter.num_kv_heads(config) * adapter.head_dim(config)
    b = bytes_per_value
    return {
        "held-out states": n * heldout_tokens * d * b,
        "layer boundaries and gradients": 2 * (n + 1) * seq_len * d * b,
        "one layer's activations": 2 * seq_len * (9 * d + 3 * kv + 4 * ff) * b
        + 2 * config.num_attention_heads * seq_len**2 * 4,
        "logits": 3 * min(LOGIT_VALUES, seq_len * vocab) * 4,
    }


def estimate_refusal(cfg: DictConfig, config: Any) -> str | None:
    """Why ``selection.damage=estimated`` cannot fit where the run computes it (checked before anything loads), or
    None: the pass's peak (:func:`estimate_peak_bytes`) and the weights against the device's memory. With a
    device_map the weights are spread (not counted) and the held-out states are kept in host memory, checked there."""
    if cfg.selection.damage != "estimated":
        return None
    b = DTYPES[cfg.model.dtype].itemsize
    peak = estimate_peak_bytes(config, cfg.selection.holdout_sequences * cfg.calibration.seq_len,
                               cfg.calibration.seq_len, b)  # fmt: skip
    states = peak["held-out states"]
    adapter = adapter_for_config(config)
    embedding = 0 if getattr(config, "tie_word_embeddings", False) else adapter.hidden_size(config) * config.vocab_size
    weights = 0 if cfg.model.device_map else int(BytesModel(config, b).decode({}, 0)) + embedding * b
    needs = {device_memory(cfg.device): weights + sum(peak.values()) - (states if cfg.model.device_map else 0)}
    if cfg.model.device_map:
        host = device_memory("cpu")
        needs[host] = needs.get(host, 0) + states
    for (where, memory), need in needs.items():
        if need > memory:
            return (
                f"selection.damage=estimated needs about {need / 2**30:.1f} GiB on {where} (the weights "
                f"{weights / 2**30:.1f} GiB; the held-out states {states / 2**30:.1f} GiB), more than its "
                f"{memory / 2**30:.1f} GiB: lower selection.holdout_sequences or calibration.seq_len, or use a device_map"
            )
    return None


def device_memory(name: str) -> tuple[str, int]:
    """(what, bytes): the memory of the device a run computes on (``device=auto``: the GPU when there is one)."""
    device = resolve_device(name)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})", torch.cuda.get_device_properties(device).total_memory
    return "host memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class TaylorTerms:
    """One layer's sums over the held-out tokens: sum_t g_t . d_t and sum_t (g_t . d_t)^2."""

    first: float
    second: float
    tokens: int

    @property
    def damage(self) -> float:
        """The second-order estimate of the mean loss increase."""
        return (self.first + 0.5 * self.second) / self.tokens


def estimated_damage(probe: Probe, candidates: Iterable[int] | None = None) -> dict[int, float]:
    """Layer -> the estimate above of the held-out loss increase when that layer's part alone is replaced (the
    probe's maps and mode; ``measure="loss"`` only). Leaves the model as it found it."""
    terms, _ = taylor_terms(probe, candidates)
    return {i: t.damage for i, t in terms.items()}


def taylor_terms(probe: Probe, candidates: Iterable[int] | None = None) -> tuple[dict[int, TaylorTerms], Unreplaced]:
    """(layer -> :class:`TaylorTerms` for every candidate, default every layer in the probe's statistics that still
    has the part; the model as it is, measured on the probe's batches), from one forward and backward pass.

    The pass runs one held-out sequence at a time, each decoder layer under activation checkpointing and the LM head
    a slice of positions at a time (:func:`estimate_peak_bytes`): its peak does not grow with the batch, and an
    offloaded model's weights leave the device after each layer, in the backward as in the forward."""
    if probe.measure != "loss":
        raise ValueError("the damage estimate expands the next-token loss: use selection.measure=loss")
    model, heldout = probe.model, probe.heldout
    live = [i for i in live_layers(model, probe.part) if i in probe.stats]
    todo = live if candidates is None else [i for i in candidates if i in live]
    n = len(get_adapter(model).layers(model))
    device = next(model.get_input_embeddings().parameters()).device
    keep = torch.device("cpu") if getattr(model, "hf_device_map", None) else device  # where held-out states stay
    rows = [(b, r) for b, ids in enumerate(heldout) for r in range(ids.shape[0])]  # one pass per sequence
    carrier = Carrier.capture(model, [heldout[b][r : r + 1] for b, r in rows], device)  # each layer's other arguments
    parts: list[list[list[torch.Tensor]]] = [[[] for _ in heldout] for _ in range(n)]  # layer, batch: its sequences
    first, second = dict.fromkeys(todo, 0.0), dict.fromkeys(todo, 0.0)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    loss_sum, tokens = 0.0, 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        for s, (b, r) in enumerate(tqdm(rows, desc="damage estimate", disable=not probe.progress)):
            ids = heldout[b][r : r + 1]
            states, grads, loss = _forward_backward(model, carrier, s, ids)
            loss_sum += loss
            tokens += ids[:, 1:].numel()
            for i in range(n):
                parts[i][b].append(states[i].to(keep))
            with torch.no_grad():
                for i in todo:  # the replaced layer run exactly; its output's change met with the gradient there
                    with layers_restored(model, [i]):
                        probe.replace([i])
                        out = carrier.call(model, i, s, states[i], states[i].device)
                    change = (grads[i + 1].double() * (out - states[i + 1].to(out.device)).double()).sum(-1)
                    first[i] += float(change.sum())
                    second[i] += float((change**2).sum())
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    terms = {i: TaylorTerms(first[i], second[i], tokens) for i in todo}
    inputs = [[torch.cat(sequences) for sequences in layer] for layer in parts]  # per layer, every batch's states
    return terms, Unreplaced(Carrier.capture(model, heldout, keep), inputs, None, loss_sum / tokens)


def _forward_backward(model: PreTrainedModel, carrier: Carrier, s: int, ids: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], float]:  # fmt: skip
    """Sequence ``s`` of the carrier through the model with gradients to the activations: (the hidden states at every
    layer's input, index L: at the final norm's input; the summed next-token loss's gradient at each of them, None
    at the embedding; that loss). Each layer runs under activation checkpointing, so the backward keeps one layer's
    activations at a time (and under accelerate offloading, one layer's weights)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    hidden = carrier.hidden[s].detach().requires_grad_(True)  # no weight takes a gradient: the input does
    states = [hidden]
    for i, layer in enumerate(layers):
        hidden = checkpoint(carrier.call, model, i, s, hidden, execution_device(layer), use_reentrant=False)
        hidden.retain_grad()
        states.append(hidden)
    norm = adapter.final_norm(model)
    normed = norm(hidden.to(execution_device(norm)))
    loss = next_token_loss(model.get_output_embeddings(), normed[:, :-1], ids[:, 1:])
    loss.backward()
    return [h.detach() for h in states], [None, *(h.grad for h in states[1:])], float(loss.detach())


def next_token_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of ``head(hidden)`` against ``targets``, LOGIT_VALUES logits at a time: each slice's
    logits are recomputed in the backward, never all kept (a 128k vocabulary makes 0.5 MB of them per token)."""
    width = max(1, LOGIT_VALUES // (hidden.shape[0] * head.out_features))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[1], width):
        piece = (hidden[:, start : start + width], targets[:, start : start + width])
        total = total + checkpoint(_slice_loss, head, *piece, use_reentrant=False).to(total.device)
    return total


def _slice_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: in float32
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), reduction="sum")
