"""Measured selection: the damage each layer's replacement does on held-out tokens, one layer at a time.

Damage is measured either as the increase of the next-token loss (``measure="loss"``) or as the increase of
the KL divergence from the unmodified model's next-token distributions (``measure="kl"``), or of the
Jensen-Shannon divergence from them (``measure="js"``, FinerCut's measure: symmetric and bounded by log 2). The
divergences measure how far the model moves from what it was, on any text; the loss also rewards a map that
happens to fit the calibration text better than the attention it replaces, which does not carry over.

The decoder layers' inputs on held-out tokens are computed once; replacing layer i then only needs layers
i..L-1, the final norm and the LM head again, so scoring every layer costs about L/2 forwards, not L.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from nbl.calib.carry import Carrier, layer_inputs
from nbl.core.adapters import get_adapter
from nbl.core.linalg import Ridge, fit_lmmse, ridge_of
from nbl.core.stats import CovarianceAccumulator
from nbl.core.surgery import Part, ReplacementMode, assign_cache_slots, linearize, live_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Measure = Literal["loss", "kl", "js"]
DIVERGENCES = ("kl", "js")  # measured from the unmodified model's distributions
Reference = list[tuple[torch.Tensor, float]]  # per batch: next-token probabilities p, and sum p log p


@dataclass
class GreedyStep:
    """One step of :func:`greedy_selection`."""

    layer: int
    damage: float  # loss increase this layer added, given the layers chosen before it
    total: float  # loss increase of all layers chosen so far (one-pass maps)


@dataclass
class Candidate:
    """A set of layers :func:`validate_sets` measured, and the rankings that proposed it."""

    rules: list[str]
    layers: list[int]
    damage: float  # measured with all of them replaced together


@dataclass(frozen=True)
class Probe:
    """What measuring damage takes: the model as it is, the statistics its maps are fitted on, the held-out batches
    of token ids, and how sub-blocks are replaced (mode, ridge, part) and damage measured. Every function taking a
    probe leaves the model as it found it.

    Each layer's map is fitted once and kept (``fitted``, in the model's dtype: d^2 + d values a layer): greedy
    selection and plans replace the same layers at every step, and lazily stored statistics would be read from
    disk and refitted (O(d^3)) each time."""

    model: PreTrainedModel
    stats: Mapping[int, CovarianceAccumulator]
    heldout: list[torch.Tensor]
    mode: ReplacementMode = "linear"
    ridge: Ridge = 0.0
    measure: Measure = "loss"
    part: Part = "attention"
    progress: bool = True
    fitted: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def maps(self, layers: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's LMMSE map (W, b), fitted once and kept."""
        dtype = next(self.model.parameters()).dtype
        for i in layers:
            if i not in self.fitted:
                w, b = fit_lmmse(self.stats[i], ridge=ridge_of(self.ridge, i))
                self.fitted[i] = (w.to(dtype), b.to(dtype))
        return self.fitted

    def replace(self, layers: Iterable[int], mode: ReplacementMode | None = None) -> None:
        """Replace ``layers``' part in the model (inside :func:`layers_restored`), as the probe says or as ``mode``."""
        layers, mode = list(layers), mode or self.mode
        maps = self.maps(layers) if mode == "linear" else self.fitted
        linearize(self.model, self.stats, layers, mode=mode, ridge=self.ridge, part=self.part, maps=maps)


@torch.no_grad()
def _measure_from(model: PreTrainedModel, start: int, carrier: Carrier, hidden: list[torch.Tensor],
                  ids: list[torch.Tensor], reference: Reference | None = None, js: bool = False) -> float:  # fmt: skip
    """Mean next-token loss when layers start..L-1 run on ``hidden`` (every batch's states at layer ``start``);
    with ``reference`` (the unmodified model's next-token distributions), the mean KL(reference || model), or with
    ``js`` the mean Jensen-Shannon divergence between them."""
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for b, batch in enumerate(ids):
        log_q = torch.log_softmax(head(carrier.final(model, start, b, hidden[b]))[:, :-1].float(), dim=-1)
        if reference is None:
            target = batch.to(log_q.device)[:, 1:]
            total -= float(log_q.gather(-1, target.unsqueeze(-1)).sum())
        elif js:
            total += float(js_divergence(reference[b][0].to(log_q.device), log_q).sum())
        else:
            probs, plogp = reference[b]
            total += plogp - float((probs.to(log_q.device) * log_q).sum())  # sum p log p - sum p log q
        count += log_q.shape[0] * log_q.shape[1]
    return total / count


def js_divergence(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per position, JS(p, q) = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, in nats (0 <= JS <= log 2);
    terms where a probability is 0 count 0."""
    q = log_q.exp()
    log_m = torch.log((p + q) / 2)
    kl_p = torch.xlogy(p, p) - torch.where(p > 0, p * log_m, 0.0)
    kl_q = torch.where(q > 0, q * (log_q - log_m), 0.0)
    return (kl_p + kl_q).sum(-1) / 2


@dataclass
class Unreplaced:
    """What damage is measured against, on the model as it is: every layer's inputs on the held-out batches, the
    reference distributions (kl), and the measure itself (``base``)."""

    carrier: Carrier
    inputs: list[list[torch.Tensor]]  # per layer, every batch's hidden states at its input
    reference: Reference | None
    base: float
    js: bool = False

    @classmethod
    def measure(cls, model: PreTrainedModel, heldout: list[torch.Tensor], measure: Measure,
                reference: Reference | None = None) -> Unreplaced:  # fmt: skip
        carrier, inputs = layer_inputs(model, heldout, _device(model))
        if measure in DIVERGENCES and reference is None:
            reference = _reference(model, carrier, inputs[0])
        elif measure == "loss":
            reference = None
        js = measure == "js"
        return cls(carrier, inputs, reference, _measure_from(model, 0, carrier, inputs[0], heldout, reference, js), js)

    def damage(self, model: PreTrainedModel, start: int, heldout: list[torch.Tensor]) -> float:
        """The increase of the measure when the model as it is now runs from layer ``start`` (the layers below
        ``start`` must be unchanged)."""
        return _measure_from(model, start, self.carrier, self.inputs[start], heldout, self.reference, self.js) - self.base


@torch.no_grad()
def single_layer_damage(
    probe: Probe,
    candidates: Iterable[int] | None = None,
    desc: str = "single-layer damage",
    reference: Reference | None = None,
    unreplaced: Unreplaced | None = None,
) -> dict[int, float]:
    """Layer -> increase of the damage measure on the held-out batches when that layer's part alone is replaced in
    the model as it is. Lower = safer to replace. ``candidates``: the layers to try (default: every layer in the
    statistics that still has the part); ``reference`` (kl): the distributions KL is measured from (default: the
    model's as it is); ``unreplaced``: the model as it is, measured already on the probe's batches."""
    model, heldout = probe.model, probe.heldout
    unreplaced = unreplaced or Unreplaced.measure(model, heldout, probe.measure, reference)
    live = [i for i in live_layers(model, probe.part) if i in probe.stats]
    todo = live if candidates is None else [i for i in candidates if i in live]
    damage = {}
    for i in tqdm(todo, desc=desc, disable=not probe.progress):
        with layers_restored(model, [i]):  # replaced in place for the measurement only
            probe.replace([i])
            damage[i] = unreplaced.damage(model, i, heldout)
    return damage


@torch.no_grad()
def reference_states(model: PreTrainedModel, heldout: list[torch.Tensor]) -> Reference:
    """The model's next-token distributions on every held-out batch, computed once (tokens x vocabulary
    floats: 4 x 512 tokens of a 128 k vocabulary hold 1 GB)."""
    carrier = Carrier.capture(model, heldout, _device(model))
    return _reference(model, carrier, carrier.snapshot())


def _reference(model: PreTrainedModel, carrier: Carrier, hidden: list[torch.Tensor]) -> Reference:
    head = model.get_output_embeddings()
    out = []
    for b, states in enumerate(hidden):
        log_p = torch.log_softmax(head(carrier.final(model, 0, b, states))[:, :-1].float(), dim=-1)
        probs = log_p.exp()
        out.append((probs, float((probs * log_p).sum())))
    return out


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.get_input_embeddings().parameters()).device


@torch.no_grad()
def greedy_selection(
    probe: Probe, k: int, candidates: Iterable[int] | None = None, start: Sequence[GreedyStep] = ()
) -> list[GreedyStep]:
    """Choose k layers one at a time: each step adds the candidate whose replacement raises the held-out damage
    of the model with the earlier choices already replaced the least (interactions between replaced layers
    count; single-layer damage ignores them). With ``measure="kl"`` the damage is the KL from the unmodified
    model.

    Maps are fitted on the probe's statistics (the one-pass statistics; refitting every candidate on the partially
    replaced model's inputs would cost a calibration pass per candidate). Cost: k steps of one forward plus,
    per remaining candidate, the layers from it to the top. ``start``: the first steps of an earlier run with
    the same inputs (greedy steps do not depend on k), continued from there.
    """
    pool = sorted(probe.stats) if candidates is None else sorted(set(candidates))
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot choose k={k} layers out of {len(pool)} candidates")
    steps: list[GreedyStep] = list(start[:k])
    reference = reference_states(probe.model, probe.heldout) if probe.measure in DIVERGENCES else None
    with layers_restored(probe.model, pool):
        probe.replace([s.layer for s in steps])
        for n in range(len(steps), k):
            left = [i for i in pool if i not in {s.layer for s in steps}]
            damage = single_layer_damage(probe, left, f"greedy step {n + 1}/{k}", reference)
            best = min(damage, key=lambda i: (damage[i], i))
            probe.replace([best])
            steps.append(GreedyStep(best, damage[best], (steps[-1].total if steps else 0.0) + damage[best]))
    return steps


@dataclass
class JointStep:
    """One step of :func:`greedy_joint_drop`: a sub-block removed."""

    layer: int
    part: str  # "attention" or "mlp"
    damage: float  # increase of the measure this removal added, given the earlier ones
    total: float  # the measure's increase over the unmodified model with all removals so far (the sum of damages)


@torch.no_grad()
def greedy_joint_drop(
    model: PreTrainedModel,
    stats: Mapping[Part, Mapping[int, CovarianceAccumulator]],
    heldout: list[torch.Tensor],
    k: int,
    measure: Measure = "js",
    start: Sequence[JointStep] = (),
    progress: bool = True,
) -> list[JointStep]:
    """Remove k attention or MLP sub-blocks one at a time (FinerCut's rule): each step drops, of every sub-block left,
    the one whose removal moves the model's next-token distributions least from the unmodified model's (JS by
    default), given the earlier removals. ``start``: the first steps of an earlier run, continued. Each step costs
    one forward of the held-out batches plus, per candidate, the layers from it to the top."""
    units = [(i, part) for part in ("attention", "mlp") for i in stats[part]]
    if not 0 <= k <= len(units):
        raise ValueError(f"cannot remove k={k} sub-blocks out of {len(units)}")
    steps: list[JointStep] = list(start[:k])
    reference = reference_states(model, heldout) if measure in DIVERGENCES else None
    probes = {part: Probe(model, stats[part], heldout, "drop", measure=measure, part=part, progress=progress)
              for part in ("attention", "mlp")}  # fmt: skip
    with layers_restored(model, sorted({i for i, _ in units})):
        for step in steps:
            probes[step.part].replace([step.layer])
        while len(steps) < k:
            done = {(s.layer, s.part) for s in steps}
            unreplaced = Unreplaced.measure(model, heldout, measure, reference)
            damage: dict[tuple[int, str], float] = {}
            left = [u for u in units if u not in done]
            for i, part in tqdm(left, desc=f"joint step {len(steps) + 1}/{k}", disable=not progress):
                with layers_restored(model, [i]):
                    probes[part].replace([i])
                    damage[(i, part)] = unreplaced.damage(model, i, heldout)
            best = min(damage, key=lambda u: (damage[u], u))
            probes[best[1]].replace([best[0]])
            steps.append(JointStep(best[0], best[1], damage[best], (steps[-1].total if steps else 0.0) + damage[best]))
    return steps


@torch.no_grad()
def validate_sets(
    probe: Probe, proposals: Mapping[str, Sequence[int]], unreplaced: Unreplaced | None = None
) -> list[Candidate]:
    """Each proposed set of layers replaced together, its damage on the held-out batches; a set proposed by several
    rules is measured once. Cost: one forward of the held-out tokens (none when ``unreplaced``, the model as it is
    measured on the probe's batches, is given), plus per distinct set the layers from its lowest one to the top."""
    unreplaced = unreplaced or Unreplaced.measure(probe.model, probe.heldout, probe.measure)
    measured: dict[tuple[int, ...], Candidate] = {}
    for rule, layers in proposals.items():
        key = tuple(sorted(layers))
        if key in measured:
            measured[key].rules.append(rule)
            continue
        if not key:
            continue
        with layers_restored(probe.model, key):
            probe.replace(key)
            damage = unreplaced.damage(probe.model, key[0], probe.heldout)
        measured[key] = Candidate([rule], list(key), damage)
    return list(measured.values())


@contextmanager
def layers_restored(model: PreTrainedModel, indices: Iterable[int]) -> Iterator[None]:
    """Whatever the block replaces among the decoder layers ``indices`` (attention, MLP, whole block), they are
    the originals again after it (also on errors), with the cache slots of the original layout."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    originals = {i: (layers[i], adapter.path(layers[i], "mlp")) for i in indices}
    try:
        yield
    finally:
        for i, (layer, mlp_path) in originals.items():
            layers[i] = layer
            adapter.set_mlp_path(layer, mlp_path)  # an MLP replacement swaps modules inside the layer
        assign_cache_slots(model)


def cost_in_passes(n_layers: int, candidates: int, steps: int, heldout_tokens: int, calibration_tokens: int) -> float:
    """What measuring costs, in calibration passes: each step runs the held-out tokens through the model once
    and, per candidate, through the layers from that candidate to the top (about half of them on average)."""
    forwards = steps * (1 + candidates * (n_layers + 1) / (2 * n_layers))
    return forwards * heldout_tokens / calibration_tokens
