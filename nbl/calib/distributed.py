"""Data-parallel calibration over torch.distributed: each rank calibrates its shard of the batches, then the
float64 sums are all-reduced, so every rank holds the statistics of all batches.

Under ``torchrun`` (one process per GPU; several nodes through SLURM) the recipe calls :func:`setup`; the
:class:`Shards` it returns makes the decisions that must agree (rank 0 looks the cache up, the others follow) and
runs a calibrator on this rank's share. Rank 0 then scores, fits, evaluates and writes the results; the other
ranks stop after calibration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
import torch.distributed as dist

from nbl.calib.hooks import Batch, check_token_count
from nbl.calib.result import CalibrationResult
from nbl.core.adapters import get_adapter
from nbl.core.surgery import Part

if TYPE_CHECKING:
    from transformers import PreTrainedModel

T = TypeVar("T")


def _export_submitit_env() -> None:
    """Inside a SLURM job started by submitit (Hydra's slurm launcher) with several tasks, set the variables
    torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class Calibrator(Protocol):
    """One statistics pass over ``batches``: every part asked for, for every layer that still has it."""

    def __call__(self, model: PreTrainedModel, batches: Sequence[Batch], parts: tuple[Part, ...],
                 check_tokens: bool = True) -> dict[Part, CalibrationResult]: ...  # fmt: skip


@dataclass(frozen=True)
class Shards:
    """This process's place among the ranks of a torch.distributed run (rank 0 of 1: a plain run)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, decide: Callable[[], T]) -> T:
        """Rank 0's answer on every rank (only rank 0 calls ``decide``): decisions all ranks must share."""
        box = [decide() if self.main else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def calibrate(self, calibrator: Calibrator, model: PreTrainedModel, batches: Sequence[Batch],
                  parts: tuple[Part, ...], check_tokens: bool = True) -> dict[Part, CalibrationResult]:  # fmt: skip
        """``calibrator`` on this rank's share of ``batches``, the sums then added up over ranks.

        A shard may hold d tokens or fewer: the token count is checked on the sum. An error on one rank (an
        overflow, a bad batch) is raised on every rank before any of them waits in a collective for it.
        """
        if self.world == 1:
            return dict(calibrator(model, list(batches), parts, check_tokens))
        mine, error = None, None
        try:
            mine = calibrator(model, shard(batches, self.rank, self.world), parts, check_tokens=False)
        except Exception as err:  # every rank must learn of it, or the others wait in all_reduce for good
            error = err
        if _any_rank(error is not None):
            raise error or RuntimeError("calibration failed on another rank (see that rank's log)")
        reduced = {part: all_reduce_statistics(stats) for part, stats in mine.items()}
        if check_tokens:  # every rank holds the same sums: all raise, or none
            d = get_adapter(model).hidden_size(model.config)
            for stats in reduced.values():
                check_token_count(stats, d)
        return reduced


def setup() -> Shards:
    """This process's :class:`Shards`; initialises the default process group when torchrun, or a SLURM job of
    several tasks launched through submitit, started several processes."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return Shards(dist.get_rank(), dist.get_world_size())
    return Shards()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share: every ``world``-th item starting at ``rank`` (each item on exactly one rank)."""
    if len(items) < world:
        raise ValueError(
            f"{len(items)} calibration batches cannot be shared by {world} ranks: every rank needs one "
            "(more calibration.num_sequences, or a smaller calibration.batch_size)"
        )
    return list(items[rank::world])


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank calls this, with its own flag)."""
    box = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def _device() -> torch.device:
    """Where collectives run: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_reduce_statistics(result: CalibrationResult) -> CalibrationResult:
    """Sum every rank's statistics in place, one layer at a time (a layer's sums are 3 d^2 + 2 d floats)."""
    device = _device()
    for i, acc in result.accumulators.items():
        state = acc.state_dict()
        names = [n for n in state if n != "count"]
        flat = torch.cat([state[n].reshape(-1).to(torch.float64) for n in names])
        extra = torch.tensor([float(acc.count), result.cosine_sums[i]], dtype=torch.float64)
        packed = torch.cat([flat, extra]).to(device)
        dist.all_reduce(packed)
        packed = packed.to(acc.sum_x.device)
        offset = 0
        for n in names:
            t = getattr(acc, n)
            t.copy_(packed[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        acc.count = round(float(packed[offset]))
        result.cosine_sums[i] = float(packed[offset + 1])
    return result
