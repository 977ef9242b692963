"""ReplaceMe's choice (Shopkhoev et al. 2025, after Gromov et al. 2024): the run of n = k consecutive blocks
s .. s + n - 1 whose ends are closest, by the angular distance arccos(cos(h_s, h_(s+n))) / pi between the stream
entering block s and the stream leaving block s + n - 1, averaged over the last token of every calibration window.
Block 0 is never removed (its MLP takes ReplaceMe's transform). Recorded per start block s as
``run_angular_distance``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from nbl.calib.stream import last_tokens, stream_pass
from nbl.select.ranking import select_layers
from nbl.select.registry import Selection, SelectionInputs, Strategy, register


def run_distances(model: Any, batches: list[torch.Tensor], n_layers: int, n: int) -> dict[int, float]:
    """Start block s (1 <= s <= L - n) -> mean angular distance between boundaries s and s + n (last tokens)."""
    sums: dict[int, float] = dict.fromkeys(range(1, n_layers - n + 1), 0.0)
    count = [0]

    def visit(stream: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor], mask: torch.Tensor | None) -> None:
        last = {b: h.double().to(stream[1].device) for b, h in stream.items()}  # (batch, d) each: the last tokens
        for s in sums:
            cos = torch.nn.functional.cosine_similarity(last[s], last[s + n], dim=-1).clamp(-1, 1)
            sums[s] += float((torch.arccos(cos) / math.pi).sum())
        count[0] += next(iter(last.values())).shape[0]

    stream_pass(model, batches, range(1, n_layers + 1), visit, desc="ReplaceMe distances", reduce=last_tokens)
    return {s: v / count[0] for s, v in sums.items()}


@register
class ReplaceMe(Strategy):
    name = "replaceme"
    granularities: ClassVar[tuple[str, ...]] = ("block",)
    calibration_modes: ClassVar[tuple[str, ...]] = ("one_pass",)
    mode_refusal = "selection={name} chooses on the unmodified model: use calibration.mode=one_pass"

    def score_name(self, selection: Any) -> str:
        return "run_angular_distance"

    def model_refusal(self, cfg: Any, config: Any) -> str | None:
        n, layers = cfg.num_layers, config.num_hidden_layers
        if not 1 <= n <= layers - 1:
            return f"selection=replaceme removes a run of 1 .. {layers - 1} blocks after block 0, not num_layers={n}"
        return None

    def select(self, inputs: SelectionInputs) -> Selection:
        n, layers = inputs.cfg.num_layers, inputs.config.num_hidden_layers
        distances = run_distances(inputs.model, inputs.calibration(), layers, n)
        (start,) = select_layers(distances, 1, lowest_first=True)
        chosen = list(range(start, start + n))
        return Selection({"block": chosen}, {"block": {"run_angular_distance": distances}}, "run_angular_distance")
