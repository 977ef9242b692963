"""Data-parallel calibration over torch.distributed: each rank calibrates its shard of the batches, then the
float64 sums are all-reduced, so every rank holds the statistics of all batches.

Under ``torchrun`` (one process per GPU; several nodes through SLURM) the runner calls :func:`setup`;
rank 0 then scores, fits, evaluates and writes the results, the other ranks stop after calibration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from nbl.calibration import CalibrationResult

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


def setup() -> tuple[int, int]:
    """(rank, world size); initialises the default process group when torchrun, or a SLURM job of several
    tasks launched through submitit, started several processes."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share: every ``world``-th item starting at ``rank`` (each item on exactly one rank)."""
    if len(items) < world:
        raise ValueError(f"{len(items)} calibration batches cannot be shared by {world} ranks: lower batch_size")
    return list(items[rank::world])


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


def calibrate_sharded(
    calibrate: Callable[[list], Mapping[str, CalibrationResult]], batches: Sequence, rank: int, world: int
) -> dict[str, CalibrationResult]:
    """``calibrate`` (statistics per part) on this rank's shard, then summed over ranks (world == 1: plain
    ``calibrate``)."""
    if world == 1:
        return dict(calibrate(list(batches)))
    return {part: all_reduce_statistics(stats) for part, stats in calibrate(shard(batches, rank, world)).items()}
