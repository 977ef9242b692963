"""Every layer's single-layer damage estimated at once, from one forward and backward pass over the held-out windows.

Replacing layer i's part perturbs its output a_t by e_t = m(x_t) - a_t (m: the fitted map; drop: m = 0). To second
order in e the summed next-token loss changes by

    sum_t g_t . e_t  +  1/2 sum_(t, t') e_t^T H_(t t') e_(t')

with g_t the gradient of the loss at a_t. The estimate keeps the diagonal blocks t = t' and approximates each by the
outer product of the observed gradient (H_tt ~ g_t g_t^T, an empirical Gauss-Newton term), so

    damage_i ~ (1 / N) sum_t [ g_t . e_t + 1/2 (g_t . e_t)^2 ]      (N: scored tokens)

from the gradients of the unmodified model alone: every layer's e_t and g_t come out of the same pass, so the cost is
one forward and one backward (to the activations only: the weights take no gradient), about three forwards,
whatever the number of layers; measuring costs a forward from each layer to the top (about L / 2 forwards). The
first-order term alone ranks badly (the LMMSE error is nearly orthogonal to g on average); the square is what
separates a harmless map error from a harmful one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nbl.calib.hooks import part_modules
from nbl.core.adapters import get_adapter
from nbl.core.surgery import live_layers
from nbl.select.damage import Probe


def estimated_damage(probe: Probe, candidates: Iterable[int] | None = None) -> dict[int, float]:
    """Layer -> the second-order estimate above of the held-out loss increase when that layer's part alone is
    replaced (the probe's maps and mode; ``measure="loss"`` only). Leaves the model as it found it."""
    terms = taylor_terms(probe, candidates)
    return {i: (t.first + 0.5 * t.second) / t.tokens for i, t in terms.items()}


@dataclass
class TaylorTerms:
    """One layer's sums over the held-out tokens: sum_t g_t . e_t and sum_t (g_t . e_t)^2."""

    first: float
    second: float
    tokens: int


def taylor_terms(probe: Probe, candidates: Iterable[int] | None = None) -> dict[int, TaylorTerms]:
    """Layer -> :class:`TaylorTerms` of its part's map error against the held-out loss's gradient, for every candidate
    (default: every layer in the probe's statistics that still has the part) from one forward and backward pass."""
    if probe.measure != "loss":
        raise ValueError("the damage estimate expands the next-token loss: use selection.measure=loss")
    model, part = probe.model, probe.part
    live = [i for i in live_layers(model, part) if i in probe.stats]
    todo = live if candidates is None else [i for i in candidates if i in live]
    maps = probe.maps(todo) if probe.mode == "linear" else {}
    first = dict.fromkeys(todo, 0.0)
    second = dict.fromkeys(todo, 0.0)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    inputs: dict[int, torch.Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def save_input(i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def on_output(i: int):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            x = inputs.pop(i).to(out.device)
            a = (out - x if part == "block" else out).detach()
            if probe.mode == "linear":
                w, b = maps[i]
                error = (x @ w.to(x.device).T + b.to(x.device) - a).double()
            else:  # drop: the part adds nothing
                error = -a.double()

            def on_gradient(g: torch.Tensor) -> None:  # the gradient at the part's output (a block's: at x + a)
                change = (g.double() * error).sum(-1)
                first[i] += float(change.sum())
                second[i] += float((change**2).sum())

            out.register_hook(on_gradient)

        return hook

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    tokens = 0
    try:
        for i in todo:
            entry, exit_ = part_modules(adapter, layers[i], part)
            handles.append(entry.register_forward_pre_hook(save_input(i), with_kwargs=True))
            handles.append(exit_.register_forward_hook(on_output(i)))
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        embed = model.get_input_embeddings()
        device = next(embed.parameters()).device
        for ids in tqdm(probe.heldout, desc="damage estimate", disable=not probe.progress):
            ids = ids.to(device)
            embeds = embed(ids).detach().requires_grad_(True)  # the graph starts here: no weight takes a gradient
            logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: in float32
            target = ids[:, 1:].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            loss.backward()
            tokens += target.numel()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return {i: TaylorTerms(first[i], second[i], tokens) for i in todo}
