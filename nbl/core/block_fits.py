"""The closed forms of the field's block-removal methods, fitted on the residual stream of the unmodified model
(:func:`nbl.calib.stream.stream_pass`) for each removed run of blocks ``s .. e - 1`` (``e`` exclusive).

- ReplaceMe (Shopkhoev et al. 2025): the MLP output M of block s - 1 (the block before the run) is multiplied by
  T = argmin ||M T - (h_e - Y)||^2, least squares over the calibration tokens, Y = h_s - M the stream before that
  MLP, h_b the stream at boundary b. T is folded into that MLP's output projection (W <- T^T W): no added
  parameter, and blocks s .. e - 1 go.
- LinearPatch (Chen et al. 2025): the stream at the cut (boundary s) is multiplied by P = H diag(c) H^T, H an orthonormal
  Hadamard matrix and c_j = mean |(h_e H)_j| / mean |(h_s H)_j| per channel (means over a sequence's tokens,
  the ratio averaged over sequences): the rotated stream's channel magnitudes matched to those the removed
  blocks would have handed on. One d x d map per run.

Row vectors throughout, as in the papers: a token's state is h, a map is h -> h T.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from nbl.calib.stream import stream_pass
from nbl.core.adapters import get_adapter
from nbl.core.hadamard import hadamard

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from nbl.calib.hooks import Batch

Run = tuple[int, int]  # removed blocks start .. end - 1


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, d) -> (tokens, d) float64, padding left out."""
    x = x.double()
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask.bool().to(x.device)]


def check_runs(n_layers: int, runs: Sequence[Run], method: str, block_before: bool) -> None:
    """Runs in range; with ``block_before`` none starts at block 0 (ReplaceMe folds into the MLP of the block before;
    LinearPatch's patch at boundary 0 multiplies the embeddings' stream, which is fine)."""
    first = [r for r in runs if r[0] == 0]
    if block_before and first:
        raise ValueError(f"{method} needs a block before every removed run; the run {first[0]} starts at block 0")
    if any(not 0 < s < e <= n_layers for s, e in runs):
        raise ValueError(f"runs {list(runs)} out of range for {n_layers} decoder layers")


@torch.no_grad()
def replaceme_transforms(model: PreTrainedModel, batches: Iterable[Batch], runs: Sequence[Run],
                         ridge: float = 0.0) -> dict[int, torch.Tensor]:  # fmt: skip
    """Per run start s: ReplaceMe's least-squares T (d x d, float64), all runs fitted in one pass; ``ridge`` adds
    ridge * tr(M^T M) / d * I to M^T M (ReplaceMe's alpha, relative to the MLP output's scale as the maps' is)."""
    check_runs(len(get_adapter(model).layers(model)), runs, "ReplaceMe", block_before=True)
    for s, _ in runs:  # a family whose MLP output cannot take a transform is refused before the pass
        get_adapter(model).mlp_output(get_adapter(model).layers(model)[s - 1])
    d = get_adapter(model).hidden_size(model.config)
    gram = {s: torch.zeros(d, d, dtype=torch.float64) for s, _ in runs}
    cross = {s: torch.zeros(d, d, dtype=torch.float64) for s, _ in runs}

    def visit(stream: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor], mask: torch.Tensor | None) -> None:
        for s, e in runs:
            m = _tokens(mlp[s - 1], mask)
            h_e, h_s = _tokens(stream[e], mask).to(m.device), _tokens(stream[s], mask).to(m.device)  # device_map
            target = h_e - h_s + m  # h_e - Y, Y = h_s - M
            gram[s] += (m.T @ m).cpu()
            cross[s] += (m.T @ target).cpu()

    boundaries = {b for run in runs for b in run}
    stream_pass(model, batches, boundaries, visit, mlps=[s - 1 for s, _ in runs], desc="ReplaceMe least squares")
    out = {}
    for s, _ in runs:
        gram[s] += ridge * torch.trace(gram[s]) / d * torch.eye(d, dtype=torch.float64)
        solved = torch.linalg.lstsq(gram[s], cross[s], driver="gelsd")  # M^T M T = M^T (h_e - Y); rank-safe
        if not torch.isfinite(solved.solution).all():
            raise ValueError(f"ReplaceMe's transform for the run at block {s} is not finite")
        out[s] = solved.solution
    return out


@torch.no_grad()
def fold_transform(model: PreTrainedModel, layer: int, transform: torch.Tensor) -> None:
    """The MLP of ``layer`` followed by ``h -> h T``, folded into its output projection (weight W: d x f, the
    output is x W^T): W <- T^T W, bias b <- T^T b. The model keeps its parameter count."""
    proj = get_adapter(model).mlp_output(get_adapter(model).layers(model)[layer])
    t = transform.to(device=proj.weight.device, dtype=torch.float64).T
    proj.weight.copy_((t @ proj.weight.double()).to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((t @ proj.bias.double()).to(proj.bias.dtype))


@torch.no_grad()
def linearpatch_scales(model: PreTrainedModel, batches: Iterable[Batch], runs: Sequence[Run]) -> dict[int, torch.Tensor]:
    """Per run start s: LinearPatch's channel scales c (d, float64) in the Hadamard basis."""
    check_runs(len(get_adapter(model).layers(model)), runs, "LinearPatch", block_before=False)
    h = hadamard(get_adapter(model).hidden_size(model.config))
    ratios: dict[int, list[torch.Tensor]] = {s: [] for s, _ in runs}

    def visit(stream: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor], mask: torch.Tensor | None) -> None:
        for row in range(next(iter(stream.values())).shape[0]):  # one ratio per sequence
            keep = None if mask is None else mask[row : row + 1]
            for s, e in runs:
                before = (_tokens(stream[s][row : row + 1], keep).cpu() @ h).abs().mean(0)
                after = (_tokens(stream[e][row : row + 1], keep).cpu() @ h).abs().mean(0)
                ratios[s].append(after / before)

    stream_pass(model, batches, {b for run in runs for b in run}, visit, desc="LinearPatch scales")
    out = {s: torch.stack(r).mean(0) for s, r in ratios.items()}
    bad = [s for s, c in out.items() if not torch.isfinite(c).all()]
    if bad:
        raise ValueError(f"LinearPatch scales of the runs at blocks {bad} are not finite (a channel is zero there)")
    return out


def linearpatch_matrix(scales: torch.Tensor) -> torch.Tensor:
    """P = H diag(c) H^T (symmetric, d x d, float64)."""
    h = hadamard(scales.shape[0])
    return h @ torch.diag(scales) @ h.T
