"""The calibration cache: keyed by content, atomic, one computation when jobs start together."""

import multiprocessing as mp
import time
from pathlib import Path

import torch

from nbl.cache import cache_key, cached_calibration, cached_json
from nbl.calibration import CalibrationResult
from nbl.stats import CovarianceAccumulator


def _stats() -> CalibrationResult:
    acc = CovarianceAccumulator(3, 3)
    g = torch.Generator().manual_seed(0)
    acc.update(torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g))
    return CalibrationResult({0: acc}, {0: 7.5})


def _job(folder: str, counter: str, out: "mp.Queue") -> None:
    def compute() -> CalibrationResult:
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.5)  # long enough for the other jobs to arrive while this one computes
        return _stats()

    stats, hit, _ = cached_calibration(Path(folder), {"model": "m", "tokens": 10}, compute)
    out.put((hit, stats.cosine_sums[0], float(stats[0].sum_xx.sum())))


def test_concurrent_jobs_compute_once(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    counter = tmp_path / "computed"
    procs = [ctx.Process(target=_job, args=(str(tmp_path / "stats"), str(counter), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [queue.get(timeout=5) for _ in procs]
    assert counter.read_text() == "x"
    assert sorted(hit for hit, *_ in results) == [False, True, True]
    assert len({r[1:] for r in results}) == 1
    assert not list((tmp_path / "stats").glob("*.tmp*"))


def test_key_changes_with_any_field():
    base = {"model": {"path": "a", "dtype": "float32"}, "calibration": {"seq_len": 512, "seed": 0}}
    assert cache_key(base) == cache_key(
        {"calibration": {"seed": 0, "seq_len": 512}, "model": {"dtype": "float32", "path": "a"}}
    )
    assert cache_key(base) != cache_key({**base, "calibration": {"seq_len": 512, "seed": 1}})
    assert cache_key(base) != cache_key({**base, "model": {"path": "a", "dtype": "bfloat16"}})


def test_cached_json_round_trip(tmp_path):
    calls = []
    value, hit = cached_json(tmp_path, {"k": 1}, lambda: calls.append(1) or {"acc": 0.5})
    again, hit_again = cached_json(tmp_path, {"k": 1}, lambda: calls.append(1) or {"acc": 0.0})
    assert (value, hit, again, hit_again, len(calls)) == ({"acc": 0.5}, False, {"acc": 0.5}, True, 1)
