"""Data-parallel calibration over torch.distributed (gloo on the CPU): the merged statistics equal one
process's, so the same layers and maps are chosen; the app under torchrun writes one result."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nbl
from nbl.calib.distributed import Shards, shard
from nbl.calib.passes import HookPass
from nbl.select.ranking import select_layers
from tests.conftest import make_tiny, token_batches


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_tiny("qwen2")  # the same seeded weights on every rank
        stats = Shards(rank, world).calibrate(HookPass(), model, token_batches(5), ("attention",))["attention"]
        if rank == 1:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reproduce_the_one_process_statistics(tmp_path):
    out = tmp_path / "rank1.safetensors"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    merged = nbl.CalibrationResult.load(out)  # as rank 1 holds it after the all-reduce
    single = nbl.calibrate(make_tiny("qwen2"), token_batches(5), progress=False)
    assert merged.num_tokens == single.num_tokens == 5 * 4 * 32
    for i in single:
        for name, t in single[i].state_dict().items():
            torch.testing.assert_close(merged[i].state_dict()[name], t, rtol=1e-10, atol=1e-8)
        assert merged.mean_cosine(i) == pytest.approx(single.mean_cosine(i), rel=1e-12)
    bounds = [{i: nbl.cca_bound(stats[i]) for i in stats} for stats in (merged, single)]
    assert select_layers(bounds[0], 2, lowest_first=True) == select_layers(bounds[1], 2, lowest_first=True)
    for i in single:
        torch.testing.assert_close(nbl.fit_lmmse(merged[i])[0], nbl.fit_lmmse(single[i])[0], rtol=1e-7, atol=1e-9)


class _FailsOnRankOne:
    """A calibrator that raises on rank 1 only (an overflow there, say)."""

    def __call__(self, model, batches, parts, check_tokens=True):
        if dist.get_rank() == 1:
            raise FloatingPointError("calibration batch 0 overflows on rank 1")
        return HookPass()(model, batches, parts, check_tokens)


def _shards_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    report = {}
    try:
        model, shards = make_tiny("llama"), Shards(rank, world)
        small = token_batches(n_batches=5, batch=1, seq=20)  # 100 tokens for d = 64: shards of 60 and 40
        stats = shards.calibrate(HookPass(), model, small, ("attention",))["attention"]
        report["tokens"] = stats.num_tokens
        report["sum_xx"] = float(stats[2].sum_xx.sum())
        try:
            shards.calibrate(_FailsOnRankOne(), model, small, ("attention",))
        except Exception as err:
            report["error"] = f"{type(err).__name__}: {err}"
        try:
            shards.calibrate(HookPass(), model, small[:3], ("attention",))  # 60 tokens in all: too few
        except ValueError as err:
            report["too_few"] = str(err)
    finally:
        dist.destroy_process_group()
        Path(f"{out}{rank}.json").write_text(json.dumps(report))


def test_small_unequal_and_failing_shards(tmp_path):
    """Shards of fewer than d tokens sum to enough; an error on one rank reaches every rank instead of leaving
    the others waiting in all_reduce; too few tokens in all are refused on every rank alike."""
    out = str(tmp_path / "rank")
    mp.start_processes(_shards_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True, start_method="spawn")
    reports = [json.loads(Path(f"{out}{r}.json").read_text()) for r in range(2)]
    single = nbl.calibrate(make_tiny("llama"), token_batches(n_batches=5, batch=1, seq=20), progress=False)
    for report in reports:
        assert report["tokens"] == single.num_tokens == 100
        assert report["sum_xx"] == pytest.approx(float(single[2].sum_xx.sum()), rel=1e-10)
        assert "calibration saw 60 real tokens for hidden size 64" in report["too_few"]
    assert reports[1]["error"].startswith("FloatingPointError: calibration batch 0 overflows on rank 1")
    assert reports[0]["error"].startswith("RuntimeError: calibration failed on another rank")


def test_shards_cover_every_batch_once():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items and parts[0] == [0, 3, 6]
    with pytest.raises(ValueError, match="cannot be shared by 8 ranks: every rank needs one"):
        shard(items, 0, 8)


@pytest.mark.slow
def test_torchrun_writes_one_result_equal_to_a_single_process_run(tmp_path, converted_models):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # 3 windows of 64 tokens, one per batch: rank 1's shard holds 64 tokens, no more than d = 64 (the sum: 192)
    args = ["-m", "nbl", "experiment=smoke", "speed=none", "calibration.num_sequences=3", "calibration.batch_size=1"]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    for launcher, name in (
        ([torchrun, "--nproc-per-node=2", "--master-port=29531"], "dist"),
        ([sys.executable], "single"),
    ):
        cache = tmp_path / f"cache_{name}"
        cache.mkdir()
        (cache / "models").symlink_to(converted_models)  # the embedded model's tokenizer, converted once
        env = {
            **os.environ,
            "TMPDIR": str(scratch),  # where the helper rank's scratch run folder goes (and must not stay)
            "NBL_CACHE": str(cache),
            "WANDB_SILENT": "true",
            "HF_HUB_OFFLINE": "1",
        }
        proc = subprocess.run(
            [*launcher, *args, f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(scratch.glob("nbl-rank*")), "the helper rank left its scratch folder"
    runs = sorted(tmp_path.rglob("results.json"))
    assert [p.parent.name for p in runs] == ["dist", "single"]  # helper ranks wrote no results
    dist_run, single_run = (json.loads(p.read_text()) for p in runs)
    assert dist_run["calibration"]["world_size"] == 2 and single_run["calibration"]["world_size"] == 1
    assert dist_run["calibration"]["tokens"] == single_run["calibration"]["tokens"]
    assert dist_run["replaced_layers"] == single_run["replaced_layers"]
    for key, value in single_run["scores"]["cca"].items():
        assert dist_run["scores"]["cca"][key] == pytest.approx(value, rel=1e-9)


def test_a_submitit_slurm_job_of_several_tasks_becomes_a_torch_distributed_world(monkeypatch):
    from nbl.calib.distributed import _export_submitit_env

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so the teardown restores what was there (usually nothing)
        monkeypatch.delenv(key)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    _export_submitit_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
