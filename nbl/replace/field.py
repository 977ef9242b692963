"""The field's training-free replacements for removed runs of blocks (:mod:`nbl.core.block_fits`): ReplaceMe's
folded least-squares transform and LinearPatch's Hadamard-scaled patch. Both take any block selection: each maximal
run of consecutive chosen blocks gets its own transform or patch, fitted on the unmodified model."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, ClassVar

import torch

from nbl.calib.stream import runs
from nbl.core.block_fits import check_runs, fold_transform, linearpatch_matrix, linearpatch_scales, replaceme_transforms
from nbl.core.surgery import Part, linearize
from nbl.recipe.state import RunState
from nbl.replace.registry import Replacement, register

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


class _BlockRuns(Replacement):
    needs = ("calibration_windows",)  # one pass of its own over the calibration windows
    granularities: ClassVar[tuple[str, ...]] = ("block",)
    block_before: ClassVar[bool] = False  # every run needs a block before it (to fold into)

    reads_ridge: ClassVar[bool] = False

    def refusal(self, cfg: DictConfig) -> str | None:
        if self.block_before and cfg.layers is not None and 0 in cfg.layers:
            return f"replacement.mode={self.name} folds into the block before each removed run: layers may not hold 0"
        ridge = cfg.replacement.ridge
        if ridge == "auto" or (ridge != 0 and not self.reads_ridge):
            reads = "a number (ridge=auto chooses per layer among maps it does not fit)" if self.reads_ridge else "0"
            return f"replacement.ridge={ridge}: replacement.mode={self.name} takes {reads}"
        return super().refusal(cfg)

    def model_refusal(self, layers: list[int], n_layers: int) -> str | None:
        try:
            check_runs(n_layers, runs(layers), self.name, self.block_before)
        except ValueError as err:
            return str(err)
        return None

    def _runs(self, state: RunState) -> list[tuple[int, int]]:
        chosen = state.selection.layers["block"]
        refusal = self.model_refusal(chosen, state.config.num_hidden_layers)
        if refusal is not None:
            raise ValueError(f"replacement.mode={self.name}: {refusal} (selection=replaceme never removes block 0; "
                             "replacement=linearpatch or drop take any run)")
        return runs(chosen)


@register
class ReplaceMe(_BlockRuns):
    name = "replaceme"
    block_before = True
    reads_ridge = True  # ReplaceMe's alpha
    adds_parameters = False
    saved_as = "ordinary"
    served_by = "any engine: an ordinary checkpoint of the family with fewer layers"
    publication = "ReplaceMe (Shopkhoev et al. 2025), the least-squares (LSTSQ) variant"

    def apply(self, state: RunState) -> dict[Part, list[int]]:
        start, found = time.perf_counter(), self._runs(state)
        ridge = float(state.cfg.replacement.ridge)
        transforms = replaceme_transforms(state.model, state.windows.calibration(), found, ridge)
        for s, transform in transforms.items():
            fold_transform(state.model, s - 1, transform)
        chosen = state.selection.layers["block"]
        linearize(state.model, state.stats["block"], chosen, mode="drop", part="block")
        state.results["calibration"]["replaceme"] = {
            "runs": [list(r) for r in found],
            "folded_into": [s - 1 for s, _ in found],  # the MLPs whose output projection holds a transform
            "transform_identity_distance": {str(s): _distance_from_identity(t) for s, t in transforms.items()},
            "seconds": time.perf_counter() - start,
        }
        return {"block": list(chosen)}


@register
class LinearPatch(_BlockRuns):
    name = "linearpatch"
    adds_parameters = True  # one d x d patch per run
    counts_as = "drop"  # in a budget; its one map per run counts in the recorded predictions
    served_by = "transformers; vLLM with the nbl plugin (the patch is a linear block map)"
    publication = "LinearPatch (Chen et al. 2025), the training-free variant (Hadamard rotation + channel scales)"

    def apply(self, state: RunState) -> dict[Part, list[int]]:
        start, found = time.perf_counter(), self._runs(state)
        scales = linearpatch_scales(state.model, state.windows.calibration(), found)
        dtype = next(state.model.parameters()).dtype
        maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for s, c in scales.items():  # x -> x P at the cut = block s as x -> x + x (P - I), P symmetric
            patch = linearpatch_matrix(c) - torch.eye(c.shape[0], dtype=torch.float64)
            maps[s] = (patch.to(dtype), torch.zeros(c.shape[0], dtype=dtype))
        model, stats = state.model, state.stats["block"]
        linearize(model, stats, list(maps), mode="linear", part="block", maps=maps)
        linearize(model, stats, [i for s, e in found for i in range(s + 1, e)], mode="drop", part="block")
        state.results["calibration"]["linearpatch"] = {
            "runs": [list(r) for r in found],
            "scale_range": {str(s): [float(c.min()), float(c.max())] for s, c in scales.items()},
            "seconds": time.perf_counter() - start,
        }
        return {"block": list(state.selection.layers["block"])}


def _distance_from_identity(transform: torch.Tensor) -> float:
    """||T - I||_F / ||I||_F: how far the fitted transform is from leaving the MLP's output as it was."""
    eye = torch.eye(transform.shape[0], dtype=transform.dtype)
    return float(torch.linalg.matrix_norm(transform - eye) / torch.linalg.matrix_norm(eye))


