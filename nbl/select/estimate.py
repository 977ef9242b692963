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
activations (the weights take no gradient; about three forwards in all) plus one decoder layer per candidate (about
one forward in all), whatever the number of layers; measuring costs a forward from each layer to the top (about
L / 2 forwards). The first-order term alone ranks badly (the LMMSE error is nearly orthogonal to g on average); the
square is what separates a harmless change from a harmful one. The pass also yields what set validation measures
against (every layer's inputs on the held-out windows, and the loss of the model as it is), so a validated selection
does not run the held-out forward again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nbl.calib.carry import Carrier
from nbl.core.adapters import get_adapter
from nbl.core.surgery import live_layers
from nbl.select.damage import Probe, Unreplaced, layers_restored


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
    has the part; the model as it is, measured on the probe's batches), from one forward and backward pass."""
    if probe.measure != "loss":
        raise ValueError("the damage estimate expands the next-token loss: use selection.measure=loss")
    model, heldout = probe.model, probe.heldout
    live = [i for i in live_layers(model, probe.part) if i in probe.stats]
    todo = live if candidates is None else [i for i in candidates if i in live]
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n = len(layers)
    device = next(model.get_input_embeddings().parameters()).device
    carrier = Carrier.capture(model, heldout, device)  # each layer's other arguments, per batch
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per layer, every batch's hidden states at its input
    first, second = dict.fromkeys(todo, 0.0), dict.fromkeys(todo, 0.0)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    loss_sum, tokens = 0.0, 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        for b, ids in enumerate(tqdm(heldout, desc="damage estimate", disable=not probe.progress)):
            states, grads = _forward_backward(model, ids.to(device))
            loss_sum += states.pop("loss")
            tokens += ids[:, 1:].numel()
            for i in range(n):
                inputs[i].append(states[i])
            with torch.no_grad():
                for i in todo:  # the replaced layer run exactly; its output's change met with the gradient there
                    with layers_restored(model, [i]):
                        probe.replace([i])
                        out = carrier.call(model, i, b, states[i], states[i].device)
                    change = (grads[i + 1].double() * (out - states[i + 1].to(out.device)).double()).sum(-1)
                    first[i] += float(change.sum())
                    second[i] += float((change**2).sum())
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    terms = {i: TaylorTerms(first[i], second[i], tokens) for i in todo}
    return terms, Unreplaced(carrier, inputs, None, loss_sum / tokens)


def _forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict, dict[int, torch.Tensor]]:
    """One batch through the model with gradients to the activations: (the hidden states at every layer's input,
    index L: at the final norm's input, and "loss": the summed next-token loss; the loss's gradient at each of them)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    states: dict = {}
    grads: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            states[i] = h.detach()
            if i > 0:  # the gradient at layer i's input is the gradient at layer i - 1's output
                h.register_hook(lambda g: grads.__setitem__(i, g.detach()))

        return hook

    modules = [*layers, adapter.final_norm(model)]
    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # no weight takes a gradient
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: in float32
        target = ids[:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    states["loss"] = float(loss.detach())
    return states, grads
